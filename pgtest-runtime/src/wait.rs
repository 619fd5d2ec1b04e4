//! Waiting: every wait of the runtime for something another process or the
//! server holds is one loop here, but a test's wait for a lock file, which
//! blocks a thread of its own instead (see [`crate::lock`]). It looks, pauses (growing pauses, each
//! give or take a quarter so that waiters spread out, never past the
//! deadline), and looks again, until what it waits for is there or the
//! deadline passes; then it says what it waited for and who held it at
//! its last look, for the caller's error.
//!
//! ```text
//! let taken = wait_until(deadline, "free slots", Pace::Local, async || {
//!     Ok::<_, Error>(match files.try_take(count, &mut slots)? {
//!         true => Look::Ready(()),
//!         false => Look::Held("other tests".to_owned()),
//!     })
//! })
//! .await?;
//! ```

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

/// One look at what a wait waits for.
pub(crate) enum Look<T> {
    /// There: the wait ends with it.
    Ready(T),
    /// Not yet: who or what holds it, for the message if the wait runs out.
    Held(String),
}

/// How quickly to look again.
#[derive(Clone, Copy)]
pub(crate) enum Pace {
    /// Something on this machine (a lock file, a process): 1 ms, doubling
    /// to 20 ms.
    Local,
    /// The server, which each look costs work: 10 ms, doubling to 1 s.
    Server,
}

/// A wait that ran out.
#[derive(Debug, Clone)]
pub(crate) struct Expired {
    /// What it waited for.
    pub(crate) what: String,
    /// Who held it at the last look.
    pub(crate) holder: String,
    /// How long it waited.
    pub(crate) after: Duration,
}

impl fmt::Display for Expired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "waited {:.1} s for {}, held by {}",
            self.after.as_secs_f64(),
            self.what,
            self.holder
        )
    }
}

/// Looks until `look` finds what it waits for, or `deadline` passes: the
/// outer error is `look`'s own, the inner one the wait's end.
pub(crate) async fn wait_until<T, E>(
    deadline: Instant,
    what: &str,
    pace: Pace,
    mut look: impl AsyncFnMut() -> Result<Look<T>, E>,
) -> Result<Result<T, Expired>, E> {
    let mut wait = Wait::until(deadline, what, pace);
    loop {
        match look().await? {
            Look::Ready(found) => return Ok(Ok(found)),
            Look::Held(holder) => {
                if let Err(expired) = wait.pause(holder).await {
                    return Ok(Err(expired));
                }
            }
        }
    }
}

/// [`wait_until`] for code that runs outside any runtime (the embedded
/// server's start and stop, the processes of its user).
pub(crate) fn wait_until_blocking<T, E>(
    deadline: Instant,
    what: &str,
    mut look: impl FnMut() -> Result<Look<T>, E>,
) -> Result<Result<T, Expired>, E> {
    let mut wait = Wait::until(deadline, what, Pace::Local);
    loop {
        match look()? {
            Look::Ready(found) => return Ok(Ok(found)),
            Look::Held(holder) => {
                if let Err(expired) = wait.pause_blocking(holder) {
                    return Ok(Err(expired));
                }
            }
        }
    }
}

/// The state of one wait, for the loop a caller writes itself where
/// [`wait_until`] cannot serve: a future spawned onto the runtime, whose
/// look borrows the caller mutably (the compiler cannot prove such an
/// async closure's future `Send` for every lifetime).
pub(crate) struct Wait<'a> {
    what: &'a str,
    deadline: Instant,
    started: Instant,
    pauses: Pauses,
}

impl<'a> Wait<'a> {
    pub(crate) fn until(deadline: Instant, what: &'a str, pace: Pace) -> Self {
        Self {
            what,
            deadline,
            started: Instant::now(),
            pauses: Pauses::new(pace),
        }
    }

    /// What the wait waits for is held by `holder`: pauses before the next
    /// look, or ends the wait once the deadline has passed.
    pub(crate) async fn pause(&mut self, holder: String) -> Result<(), Expired> {
        let pause = self.next(holder)?;
        tokio::time::sleep(pause).await;
        Ok(())
    }

    /// [`Self::pause`], outside any runtime.
    pub(crate) fn pause_blocking(&mut self, holder: String) -> Result<(), Expired> {
        let pause = self.next(holder)?;
        std::thread::sleep(pause);
        Ok(())
    }

    fn next(&mut self, holder: String) -> Result<Duration, Expired> {
        self.pauses
            .next_until(self.deadline)
            .ok_or_else(|| Expired {
                what: self.what.to_owned(),
                holder,
                after: self.started.elapsed(),
            })
    }
}

/// Growing pauses, each give or take a quarter.
struct Pauses {
    pause: Duration,
    most: Duration,
}

impl Pauses {
    fn new(pace: Pace) -> Self {
        let (first, most) = match pace {
            Pace::Local => (Duration::from_millis(1), Duration::from_millis(20)),
            Pace::Server => (Duration::from_millis(10), Duration::from_secs(1)),
        };
        Self { pause: first, most }
    }

    /// The next pause, ending by `deadline`; none once it has passed.
    fn next_until(&mut self, deadline: Instant) -> Option<Duration> {
        let left = deadline.checked_duration_since(Instant::now())?;
        if left.is_zero() {
            return None;
        }
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let spread = self.pause / 2;
        let pause = self.pause - self.pause / 4 + spread.mul_f64(f64::from(nanos % 1000) / 1000.0);
        self.pause = (self.pause * 2).min(self.most);
        Some(pause.min(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_ends_when_its_look_finds_it_and_names_the_holder_when_it_runs_out() {
        let mut looks = 0;
        let found = wait_until_blocking(
            Instant::now() + Duration::from_secs(5),
            "the third look",
            || {
                looks += 1;
                Ok::<_, ()>(match looks {
                    3 => Look::Ready(looks),
                    _ => Look::Held(format!("look {looks}")),
                })
            },
        );
        assert_eq!(found.unwrap().unwrap(), 3);

        let started = Instant::now();
        let limit = Duration::from_millis(100);
        let expired = wait_until_blocking(started + limit, "a lock", || {
            Ok::<Look<()>, ()>(Look::Held("process 42".to_owned()))
        })
        .unwrap()
        .unwrap_err();
        assert!(started.elapsed() >= limit);
        assert!(started.elapsed() < limit * 5, "{:?}", started.elapsed());
        assert_eq!(expired.holder, "process 42");
        assert!(
            expired
                .to_string()
                .contains("for a lock, held by process 42"),
            "{expired}"
        );
    }

    #[test]
    fn an_error_of_the_look_ends_the_wait_at_once() {
        let ended = wait_until_blocking(Instant::now() + Duration::from_secs(5), "x", || {
            Err::<Look<()>, _>("gone")
        });
        assert_eq!(ended.unwrap_err(), "gone");
    }
}
