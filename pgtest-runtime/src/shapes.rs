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
            (options: PgPoolOptions, connect: PgConnectOptions), (ctx: TestContext) or nothing; \
            with database(…) groups, a pool (or a connection) per group, then the tenant if \
            wanted"
)]
pub trait TestFn {
    /// What the body returns.
    type Output: TestTermination;
    /// Whether the body needs a database at all.
    const NEEDS_DATABASE: bool;
    /// Whether the body gets a way to open connections of its own, which
    /// `isolation = "transaction"` cannot give.
    const OPENS_CONNECTIONS: bool;
    /// How many databases the body takes, when its signature says.
    const DATABASES: Option<usize> = Some(1);
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
    const DATABASES: Option<usize> = None;
    fn call(self, context: Option<TestContext>) -> impl Future<Output = Self::Output> {
        self(expect_context(context))
    }
}

/// The signatures of a test of several databases: a pool, or a connection,
/// per database, then the tenant if wanted.
macro_rules! several {
    ($count:literal: $($index:tt)*) => {
        impl<Fut: Future<Output: TestTermination>> TestFn for fn($(several!(@pool $index)),*) -> Fut {
            type Output = Fut::Output;
            const NEEDS_DATABASE: bool = true;
            const OPENS_CONNECTIONS: bool = true;
            const DATABASES: Option<usize> = Some($count);
            fn call(self, context: Option<TestContext>) -> impl Future<Output = Self::Output> {
                let [$($index),*] = pools(context);
                self($($index),*)
            }
        }

        impl<Fut: Future<Output: TestTermination>> TestFn
            for fn($(several!(@pool $index),)* Tenant) -> Fut
        {
            type Output = Fut::Output;
            const NEEDS_DATABASE: bool = true;
            const OPENS_CONNECTIONS: bool = true;
            const DATABASES: Option<usize> = Some($count);
            fn call(self, context: Option<TestContext>) -> impl Future<Output = Self::Output> {
                let tenant = context.as_ref().map(TestContext::tenant).unwrap_or_default();
                let [$($index),*] = pools(context);
                self($($index,)* tenant)
            }
        }

        impl<Fut: Future<Output: TestTermination>> TestFn
            for fn($(several!(@connection $index)),*) -> Fut
        {
            type Output = Fut::Output;
            const NEEDS_DATABASE: bool = true;
            const OPENS_CONNECTIONS: bool = false;
            const DATABASES: Option<usize> = Some($count);
            async fn call(self, context: Option<TestContext>) -> Self::Output {
                let [$($index),*] = connections(context).await;
                self($($index),*).await
            }
        }

        impl<Fut: Future<Output: TestTermination>> TestFn
            for fn($(several!(@connection $index),)* Tenant) -> Fut
        {
            type Output = Fut::Output;
            const NEEDS_DATABASE: bool = true;
            const OPENS_CONNECTIONS: bool = false;
            const DATABASES: Option<usize> = Some($count);
            async fn call(self, context: Option<TestContext>) -> Self::Output {
                let tenant = context.as_ref().map(TestContext::tenant).unwrap_or_default();
                let [$($index),*] = connections(context).await;
                self($($index,)* tenant).await
            }
        }
    };
    (@pool $index:tt) => { PgPool };
    (@connection $index:tt) => { PoolConnection<Postgres> };
}

several!(2: a b);
several!(3: a b c);
several!(4: a b c d);

/// The pools of a test of `N` databases, in order.
fn pools<const N: usize>(context: Option<TestContext>) -> [PgPool; N] {
    let all = expect_context(context).into_all();
    let pools: Vec<PgPool> = all.into_iter().map(TestContext::into_pool).collect();
    pools
        .try_into()
        .unwrap_or_else(|_| unreachable!("the runner checks the number of databases"))
}

/// The connections of a test of `N` databases, in order.
async fn connections<const N: usize>(
    context: Option<TestContext>,
) -> [PoolConnection<Postgres>; N] {
    let mut connections = Vec::with_capacity(N);
    for context in expect_context(context).into_all() {
        connections.push(context.into_connection().await);
    }
    connections
        .try_into()
        .unwrap_or_else(|_| unreachable!("the runner checks the number of databases"))
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
