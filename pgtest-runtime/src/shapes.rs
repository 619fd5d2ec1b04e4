//! The test signatures `#[pg_test]` accepts: one [`TestFn`] impl each, and
//! what a body may return.

use std::future::Future;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use crate::{Tenant, TestContext};
use pgtest_core::TestTermination;

/// A test body that `#[pg_test]` can call: one impl per supported signature.
#[diagnostic::on_unimplemented(
    message = "`#[pg_test]` does not support a test with the signature `{Self}`",
    note = "a #[pg_test] fn is async and takes (pool: PgPool), (pool: PgPool, tenant: Tenant), \
            (conn: PoolConnection<Postgres>), (conn: PoolConnection<Postgres>, tenant: Tenant), \
            (options: PgPoolOptions, connect: PgConnectOptions), (ctx: TestContext) or nothing"
)]
pub trait TestFn {
    /// What the body returns.
    type Output: TestTermination;
    /// Whether the body needs a database at all.
    const NEEDS_DATABASE: bool;
    /// Whether the body gets a way to open connections of its own, which
    /// `isolation = "transaction"` cannot give.
    const OPENS_CONNECTIONS: bool;
    /// Calls the body.
    fn call(self, context: Option<TestContext>) -> impl Future<Output = Self::Output>;
}

impl<Fut: Future<Output: TestTermination>> TestFn for fn(PgPool) -> Fut {
    type Output = Fut::Output;
    const NEEDS_DATABASE: bool = true;
    const OPENS_CONNECTIONS: bool = true;
    fn call(self, context: Option<TestContext>) -> impl Future<Output = Self::Output> {
        self(expect_context(context).into_pool())
    }
}

impl<Fut: Future<Output: TestTermination>> TestFn for fn(PgPool, Tenant) -> Fut {
    type Output = Fut::Output;
    const NEEDS_DATABASE: bool = true;
    const OPENS_CONNECTIONS: bool = true;
    fn call(self, context: Option<TestContext>) -> impl Future<Output = Self::Output> {
        let context = expect_context(context);
        let tenant = context.tenant();
        self(context.into_pool(), tenant)
    }
}

impl<Fut: Future<Output: TestTermination>> TestFn for fn(PoolConnection<Postgres>) -> Fut {
    type Output = Fut::Output;
    const NEEDS_DATABASE: bool = true;
    const OPENS_CONNECTIONS: bool = false;
    async fn call(self, context: Option<TestContext>) -> Self::Output {
        self(expect_context(context).into_connection().await).await
    }
}

impl<Fut: Future<Output: TestTermination>> TestFn for fn(PoolConnection<Postgres>, Tenant) -> Fut {
    type Output = Fut::Output;
    const NEEDS_DATABASE: bool = true;
    const OPENS_CONNECTIONS: bool = false;
    async fn call(self, context: Option<TestContext>) -> Self::Output {
        let context = expect_context(context);
        let tenant = context.tenant();
        self(context.into_connection().await, tenant).await
    }
}

impl<Fut: Future<Output: TestTermination>> TestFn for fn(PgPoolOptions, PgConnectOptions) -> Fut {
    type Output = Fut::Output;
    const NEEDS_DATABASE: bool = true;
    const OPENS_CONNECTIONS: bool = true;
    async fn call(self, context: Option<TestContext>) -> Self::Output {
        let pool = expect_context(context).into_pool();
        // A pool built from these options is a child of the test's pool:
        // it takes its permits, so its connections are covered by the
        // test's slots too.
        let options = crate::pool::own_pool_options(&pool).await;
        self(options, (*pool.connect_options()).clone()).await
    }
}

impl<Fut: Future<Output: TestTermination>> TestFn for fn(TestContext) -> Fut {
    type Output = Fut::Output;
    const NEEDS_DATABASE: bool = true;
    const OPENS_CONNECTIONS: bool = true;
    fn call(self, context: Option<TestContext>) -> impl Future<Output = Self::Output> {
        self(expect_context(context))
    }
}

impl<Fut: Future<Output: TestTermination>> TestFn for fn() -> Fut {
    type Output = Fut::Output;
    const NEEDS_DATABASE: bool = false;
    const OPENS_CONNECTIONS: bool = false;
    fn call(self, _: Option<TestContext>) -> impl Future<Output = Self::Output> {
        self()
    }
}

fn expect_context(context: Option<TestContext>) -> TestContext {
    context.expect("NEEDS_DATABASE is true, so the runner prepared a context")
}
