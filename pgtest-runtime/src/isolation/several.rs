//! A test of several databases (the attribute's `database(…)` groups):
//! each database prepared in the test's isolation mode as a test of one
//! would be (its own migrations, fixtures and seeds; the test's one
//! tenant), after the test has taken the slots for all its pools at once,
//! so that it never holds one database's slots while it waits for
//! another's (see [`crate::budget`]).

use std::path::Path;
use std::sync::Arc;

use super::{Prepared, Teardown, prepare_one, shared};
use crate::budget::{self, Budget};
use crate::migrations::Migrations;
use crate::pool::Account;
use crate::session::Session;
use crate::{Error, Tenant};
use pgtest_core::{DatabaseSpec, Isolation, TestSpec};

/// The most connections a pool of a test of several databases opens when
/// the attribute does not say: as a test of one (five) would, but no more
/// than lets the test's pools together grow by the budget's reserve
/// beyond one connection each, so that the test takes one slot per pool up
/// front, as a test of one database does.
fn default_max(budget: &Budget, pools: u32) -> u32 {
    ((budget.reserve() + pools) / pools).clamp(1, 5)
}

pub(super) async fn prepare(
    session: &Arc<Session>,
    spec: &TestSpec,
    tenant: Tenant,
) -> Result<Prepared, Error> {
    let budget = &session.budget;
    let count = spec.databases.len() as u32;
    let max = match spec.max_connections {
        Some(max) => max,
        None if spec.isolation == Isolation::Transaction => 1,
        None => default_max(budget, count),
    };
    // In `isolation = "database"`, a pool may have an admin connection
    // beside it while its database is claimed or copied.
    let others = u32::from(spec.isolation == Isolation::Database);
    // The run's shared databases (or the templates of database mode)
    // built first, holding no slots: a test that waits for a build holding
    // slots (one database's, grown into the reserve say) would keep the
    // builder, who builds on the reserve, waiting for it.
    for database in spec.databases {
        let one = one_of(spec, database, max);
        let migrations =
            Migrations::load(one.migrations, Path::new(one.manifest_dir), &session.home).await?;
        match spec.isolation {
            Isolation::Database => {
                super::database::build_holding_nothing(session, &one, &migrations).await?;
            }
            _ => shared::build_holding_nothing(session, &one, &migrations).await?,
        }
    }
    let upfront = budget.upfront_many(&vec![(max, others); spec.databases.len()]);
    let slots = budget.take(upfront, spec.name).await?;
    let account = Account::holding(slots);
    let mut prepared = Vec::with_capacity(spec.databases.len());
    let all = async {
        for database in spec.databases {
            let one = one_of(spec, database, max);
            prepared.push(prepare_one(session, &one, tenant).await?);
        }
        Ok::<(), Error>(())
    };
    let done = account.scope(budget::prepaid(all)).await;
    if let Err(error) = done {
        // Those prepared already are given back as a passed test's would.
        for Prepared { context, teardown } in prepared {
            let pool = context.pool().clone();
            drop(context);
            let _ = teardown.finish(true, &pool).await;
        }
        return Err(error);
    }
    let mut prepared = prepared.into_iter();
    let Some(Prepared { context, teardown }) = prepared.next() else {
        unreachable!("a test of several databases has one at least");
    };
    let (contexts, teardowns): (Vec<_>, Vec<_>) = prepared
        .map(|Prepared { context, teardown }| {
            let pool = context.pool().clone();
            (context, (pool, teardown))
        })
        .unzip();
    Ok(Prepared {
        context: context.with_more(contexts),
        teardown: Teardown {
            more: teardowns,
            ..teardown
        },
    })
}

/// The spec of `database`, one of `spec`'s: the test's, with the
/// database's migrations, fixtures and seeds, and a pool of `max`.
fn one_of(spec: &TestSpec, database: &'static DatabaseSpec, max: u32) -> TestSpec {
    TestSpec {
        name: spec.name,
        package: spec.package,
        manifest_dir: spec.manifest_dir,
        migrations: database.migrations,
        max_connections: Some(max),
        role: spec.role,
        seeds: database.seeds,
        fixtures: database.fixtures,
        isolation: spec.isolation,
        pool: spec.pool,
        flavor: spec.flavor,
        databases: &[],
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::default_max;
    use crate::budget::Budget;
    use crate::state::ServerDir;

    #[test]
    fn pools_of_a_test_of_several_databases_take_one_slot_each_up_front() {
        let dir = ServerDir::unchecked(&std::env::temp_dir());
        let budget = Budget::new(dir, 17, Duration::from_secs(1));
        for pools in 2..=6 {
            let max = default_max(&budget, pools);
            let upfront = budget.upfront_many(&vec![(max, 0); pools as usize]);
            assert_eq!(upfront, pools, "{pools} pools of {max}");
            assert!(max >= 1);
        }
        assert_eq!(default_max(&budget, 2), 3);
        // Two pools of five, as two tests of one database would have: they
        // could grow by eight, so the test takes six up front.
        assert_eq!(budget.upfront_many(&[(5, 0), (5, 0)]), 6);
        assert_eq!(budget.upfront_many(&[(3, 1), (3, 1)]), 4);
    }
}
