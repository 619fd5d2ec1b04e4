//! How many server slots a runner's keeper aims to hold, from what it sees
//! (see [`crate::share`] for the guarantees).
//!
//! With `n` runners announced and a budget of `b` slots, a runner's fair
//! share is `ceil(b / n)`. While another runner wants more than it holds,
//! no runner aims above its fair share (nor below its minimum), and a
//! runner whose tests do not wait gives back what they do not use. While
//! no other runner wants more, a runner whose tests wait takes whatever is
//! free, up to the whole budget, and one whose tests do not wait keeps what
//! it has: a runner alone ends with the whole budget.

/// What a keeper sees at one look.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    /// Server slots in all.
    pub(crate) budget: u32,
    /// Runners announced, this one included.
    pub(crate) runners: u32,
    /// Whether another runner wants more than it holds.
    pub(crate) others_want: bool,
    /// Server slots this runner holds (its keeper's own included).
    pub(crate) held: u32,
    /// Slots its tests hold now (the reserve aside).
    pub(crate) in_use: u32,
    /// Whether its tests wait for slots.
    pub(crate) hungry: bool,
    /// The least it holds while its run lasts: its keeper's own slot, the
    /// reserve, one for a test and one for a sweep.
    pub(crate) minimum: u32,
}

/// `ceil(budget / runners)`.
pub(crate) fn fair(budget: u32, runners: u32) -> u32 {
    budget.div_ceil(runners.max(1))
}

/// The most this runner may hold now.
pub(crate) fn cap(view: &View) -> u32 {
    match view.others_want {
        true => fair(view.budget, view.runners).max(view.minimum),
        false => view.budget,
    }
}

/// How many server slots this runner aims to hold.
pub(crate) fn target(view: &View) -> u32 {
    let cap = cap(view);
    let aim = match (view.hungry, view.others_want) {
        (true, _) => cap,
        // What its tests use, and room for one more to start.
        (false, true) => (view.in_use + view.minimum).min(view.held),
        (false, false) => view.held,
    };
    aim.min(cap).max(view.minimum).min(view.budget)
}

/// Whether this runner says it wants more than it holds.
pub(crate) fn wants(view: &View) -> bool {
    view.hungry && view.held < cap(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(runners: u32, others_want: bool, held: u32, in_use: u32, hungry: bool) -> View {
        View {
            budget: 44,
            runners,
            others_want,
            held,
            in_use,
            hungry,
            minimum: 6,
        }
    }

    #[test]
    fn a_runner_alone_aims_at_the_whole_budget() {
        assert_eq!(target(&view(1, false, 6, 1, true)), 44);
        assert!(wants(&view(1, false, 6, 1, true)));
        assert!(!wants(&view(1, false, 44, 39, true)));
    }

    #[test]
    fn while_others_want_no_runner_aims_above_its_fair_share() {
        // Four runners: ceil(44 / 4) = 11.
        assert_eq!(target(&view(4, true, 44, 38, true)), 11);
        assert_eq!(target(&view(4, true, 8, 2, true)), 11);
        // At its fair share it stops saying it wants more.
        assert!(!wants(&view(4, true, 11, 5, true)));
        // Three left: 15.
        assert_eq!(target(&view(3, true, 11, 5, true)), 15);
        for held in 0..=44 {
            for runners in 1..=6 {
                let aim = target(&view(runners, true, held, held.min(10), true));
                assert!(aim <= fair(44, runners).max(6), "{runners} {held} {aim}");
            }
        }
    }

    #[test]
    fn a_runner_whose_tests_do_not_wait_gives_back_what_they_do_not_use() {
        assert_eq!(target(&view(2, true, 30, 4, false)), 10);
        // Never below its minimum.
        assert_eq!(target(&view(2, true, 30, 0, false)), 6);
        // Nobody else wants: it keeps what it has.
        assert_eq!(target(&view(2, false, 30, 0, false)), 30);
    }
}
