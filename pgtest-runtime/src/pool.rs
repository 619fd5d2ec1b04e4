//! A test's pool: lazy, carrying the tenant, the test's name and role on
//! every connection, and covered by the connection budget as it grows.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::budget::Slots;
use crate::runner::TestSpec;
use crate::server::Server;
use crate::{Error, Tenant};

/// The longest `application_name` PostgreSQL keeps.
const MAX_APPLICATION_NAME: usize = 63;

/// A wait for a slot worth telling the user about when the test fails.
const NOTABLE_WAIT: Duration = Duration::from_millis(100);

/// The pool of a test and the slots that cover it.
pub(crate) struct TestPool {
    /// The pool the test gets.
    pub(crate) pool: PgPool,
    /// Its slots, shared with the pool's `after_connect` hook.
    pub(crate) cover: Arc<Cover>,
}

/// The slots of one test, grown by its pool's `after_connect` hook so that
/// the pool always holds a slot for the next connection it may open.
pub(crate) struct Cover {
    /// The pool's maximum.
    max: u32,
    /// Connections the test opens beside the pool (an admin connection).
    others: AtomicU32,
    /// Connections the pool opened so far.
    opened: AtomicU32,
    /// `None` before the test takes its slots and after it gives them back.
    slots: tokio::sync::Mutex<Option<Slots>>,
    /// Whether the hook ever waited for a slot, for the failure message.
    waited: AtomicBool,
    /// The budget's error, when growing failed.
    failure: Mutex<Option<String>>,
}

impl Cover {
    /// Holds `slots`, taken with [`crate::budget::Budget::upfront`] for
    /// this pool and `others` connections beside it.
    pub(crate) async fn hold(&self, slots: Slots, others: u32) {
        self.others.store(others, Ordering::Release);
        *self.slots.lock().await = Some(slots);
    }

    /// The pool's maximum.
    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// Gives the slots back; the pool opens nothing more once closed.
    pub(crate) async fn release(&self) -> Option<Slots> {
        self.slots.lock().await.take()
    }

    /// Whether growing the pool ever had to wait for a slot.
    pub(crate) fn waited(&self) -> bool {
        self.waited.load(Ordering::Relaxed)
    }

    /// What the budget said when growing failed.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Called once a connection is open: takes the slot the pool's next
    /// connection needs, so that it is held before that one opens.
    async fn connected(&self) -> Result<(), Error> {
        let opened = self.opened.fetch_add(1, Ordering::AcqRel) + 1;
        let needed = self.others.load(Ordering::Acquire) + (opened + 1).min(self.max);
        let mut slots = self.slots.lock().await;
        let Some(slots) = slots.as_mut() else {
            return Ok(());
        };
        let started = Instant::now();
        while slots.count() < needed {
            if let Err(error) = slots.grow().await {
                *self.failure.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(error.to_string());
                return Err(error);
            }
        }
        if started.elapsed() > NOTABLE_WAIT {
            self.waited.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// A lazy pool of at most `max` connections on `database`, each carrying
/// the tenant, the test's name and the test's role.
pub(crate) fn test_pool(
    server: &Server,
    database: &str,
    tenant: Tenant,
    spec: &TestSpec,
    max: u32,
    acquire_timeout: Duration,
) -> TestPool {
    let mut startup = vec![(Tenant::SETTING, tenant.to_string())];
    if let Some(role) = spec.role {
        startup.push(("role", role.to_owned()));
    }
    let options = server
        .options_for(database)
        .application_name(&application_name(spec.name))
        .options(startup);
    let cover = Arc::new(Cover {
        max,
        others: AtomicU32::new(0),
        opened: AtomicU32::new(0),
        slots: tokio::sync::Mutex::new(None),
        waited: AtomicBool::new(false),
        failure: Mutex::new(None),
    });
    let hook = Arc::clone(&cover);
    let pool = PgPoolOptions::new()
        .max_connections(max)
        .min_connections(0)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .after_connect(move |_, _| {
            let cover = Arc::clone(&hook);
            Box::pin(async move {
                cover
                    .connected()
                    .await
                    .map_err(|error| sqlx::Error::Protocol(error.to_string()))
            })
        })
        .connect_lazy_with(options);
    TestPool { pool, cover }
}

/// The test's path, shortened from the left to what PostgreSQL keeps.
fn application_name(test: &str) -> String {
    let mut start = test.len().saturating_sub(MAX_APPLICATION_NAME);
    while !test.is_char_boundary(start) {
        start += 1;
    }
    test[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::application_name;

    #[test]
    fn a_long_test_name_keeps_its_end() {
        let name = format!("{}::the_test", "module".repeat(20));
        let shown = application_name(&name);
        assert_eq!(shown.len(), 63);
        assert!(shown.ends_with("::the_test"));
    }
}
