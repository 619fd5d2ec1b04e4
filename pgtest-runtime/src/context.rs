//! What a test receives: its pool, its tenant and where they point.

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

use crate::Tenant;

/// Everything pgtest prepared for one test.
///
/// Take it as the only argument of a `#[pg_test]` fn when the test needs
/// more than the pool and the tenant:
///
/// ```no_run
/// use pgtest::{TestContext, pg_test};
///
/// #[pg_test(migrations = false)]
/// async fn knows_where_it_runs(ctx: TestContext) {
///     assert!(ctx.database().starts_with("pgtest_"));
///     assert!(ctx.test_name().ends_with("knows_where_it_runs"));
///     let one: i32 = sqlx::query_scalar("select 1").fetch_one(ctx.pool()).await.unwrap();
///     assert_eq!(one, 1);
/// }
/// ```
#[derive(Debug)]
pub struct TestContext {
    pool: PgPool,
    tenant: Tenant,
    database: String,
    test_name: &'static str,
    /// The connection inside the test's transaction, in
    /// `isolation = "transaction"`.
    connection: Option<PoolConnection<Postgres>>,
    /// The contexts of the test's further databases.
    more: Vec<TestContext>,
}

impl TestContext {
    pub(crate) fn new(
        pool: PgPool,
        tenant: Tenant,
        database: String,
        test_name: &'static str,
    ) -> Self {
        Self {
            pool,
            tenant,
            database,
            test_name,
            connection: None,
            more: Vec::new(),
        }
    }

    /// The context of a test of several databases: this one's, then
    /// `more`'s.
    pub(crate) fn with_more(mut self, more: Vec<TestContext>) -> Self {
        self.more = more;
        self
    }

    /// The contexts of the test's further databases, in the order of its
    /// `database(…)` groups after the first (whose pool is
    /// [`Self::pool`]); empty for a test of one database.
    ///
    /// ```no_run
    /// use pgtest::{TestContext, pg_test};
    ///
    /// #[pg_test(database(migrations = false), database(migrations = false))]
    /// async fn sees_two_databases(ctx: TestContext) {
    ///     let audit = &ctx.more_databases()[0];
    ///     assert_ne!(ctx.database(), audit.database());
    ///     assert_eq!(ctx.tenant(), audit.tenant());
    /// }
    /// ```
    pub fn more_databases(&self) -> &[TestContext] {
        &self.more
    }

    /// This context and its further databases', in order.
    pub(crate) fn into_all(mut self) -> Vec<TestContext> {
        let more = std::mem::take(&mut self.more);
        std::iter::once(self).chain(more).collect()
    }

    /// The context of a test that runs inside a transaction on `connection`.
    pub(crate) fn with_connection(mut self, connection: PoolConnection<Postgres>) -> Self {
        self.connection = Some(connection);
        self
    }

    /// The test's own pool. Every connection carries the tenant.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The test's tenant.
    pub fn tenant(&self) -> Tenant {
        self.tenant
    }

    /// The name of the database the pool points at.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The test's full path, such as `my_crate::tests::lists_projects`.
    pub fn test_name(&self) -> &'static str {
        self.test_name
    }

    /// Takes the pool out of the context.
    pub fn into_pool(self) -> PgPool {
        self.pool
    }

    /// The connection for a test that takes one: the transaction's, or one
    /// from the pool.
    ///
    /// # Panics
    ///
    /// When the pool cannot give one; the message names the test.
    pub(crate) async fn into_connection(self) -> PoolConnection<Postgres> {
        if let Some(connection) = self.connection {
            return connection;
        }
        self.pool.acquire().await.unwrap_or_else(|error| {
            panic!(
                "pgtest: test `{}` could not get its connection: {error}",
                self.test_name
            )
        })
    }
}
