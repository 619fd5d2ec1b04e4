//! The gates of the pools of this thread, where a test's runtime runs (and
//! so do its pools' hooks): what the runner and a test's arguments do with
//! them, as the runtime is about to wait, as the body starts, and as the
//! body asks for options to build a pool of its own.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::gate::gates;

/// How long the gates wait for a connection the test was prepared on to
/// come back to its pool.
const RETURN_WAIT: Duration = Duration::from_secs(1);

/// What the gates do when the test's runtime is about to wait (see
/// [`super::gate::Gate::at_park`]). The runner's runtime calls it (tokio's
/// `on_thread_park`).
pub(crate) fn at_park() {
    for gate in gates() {
        gate.at_park();
    }
}

/// Hands the pools of this thread that keep a permit ahead to the test's
/// body as sqlx's `connect_with` hands a pool over: one connection, idle
/// (the one its test was prepared on once it is back, else a new one),
/// and from then on a permit ahead.
pub(crate) async fn before_body() {
    let waiting = gates()
        .into_iter()
        .filter(|gate| gate.one_ahead && !gate.handed_over.load(Ordering::Acquire));
    for gate in waiting {
        // With no permit free, a connection on its way back is waited for,
        // not replaced (and the gate lends none meanwhile).
        gate.handing_over.store(true, Ordering::Release);
        let acquired = tokio::time::timeout(RETURN_WAIT, gate.pool.acquire()).await;
        if let Ok(Ok(mut connection)) = acquired {
            connection.return_to_pool().await;
        }
        gate.handing_over.store(false, Ordering::Release);
        gate.handed_over.store(true, Ordering::Release);
        gate.top_up();
    }
}

/// Options for a pool the test builds itself on `pool`'s permits: a child
/// of it, with the options of its kind (see [`super::gate::Gate::own_pool`]). `pool`'s
/// connections are closed first (idle, or once back), so that their
/// permits are the new pool's to take.
pub(crate) async fn own_pool_options(pool: &PgPool) -> PgPoolOptions {
    while pool.size() > 0 {
        let back = tokio::time::timeout(RETURN_WAIT, pool.acquire()).await;
        match back {
            Ok(Ok(connection)) => drop(connection.close().await),
            _ => break,
        }
    }
    let of = pool.options();
    let options = PgPoolOptions::new()
        .max_connections(of.get_max_connections())
        .min_connections(of.get_min_connections())
        .acquire_timeout(of.get_acquire_timeout())
        .idle_timeout(of.get_idle_timeout())
        .max_lifetime(of.get_max_lifetime())
        .test_before_acquire(of.get_test_before_acquire())
        .parent(pool.clone());
    let gate = gates()
        .into_iter()
        .find(|gate| Arc::ptr_eq(&gate.pool.connect_options(), &pool.connect_options()));
    match gate {
        Some(gate) => gate.own_pool(options),
        None => options,
    }
}
