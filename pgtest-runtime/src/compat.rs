//! What differs between the sqlx versions the runtime is built against
//! (this crate for 0.9, `pgtest-runtime-sqlx08` from the same sources for
//! 0.8): the one module that looks at which.

use sqlx::migrate::Migrator;

/// The sqlx this runtime is built against, for messages.
#[cfg(not(pgtest_sqlx08))]
pub(crate) const SQLX_VERSION: &str = "0.9";
/// The sqlx this runtime is built against, for messages.
#[cfg(pgtest_sqlx08)]
pub(crate) const SQLX_VERSION: &str = "0.8";

/// A statement pgtest built itself (names and texts quoted by
/// [`crate::catalog`]), or a user's script, run as it is.
#[cfg(not(pgtest_sqlx08))]
pub(crate) fn raw(sql: &str) -> sqlx::RawSql {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
}

/// A statement pgtest built itself, or a user's script, run as it is.
#[cfg(pgtest_sqlx08)]
pub(crate) fn raw(sql: &str) -> sqlx::RawSql<'_> {
    sqlx::raw_sql(sql)
}

/// A query pgtest built itself from names it read from the catalog
/// (quoted by the server or by [`crate::catalog`]), for typed results.
#[cfg(not(pgtest_sqlx08))]
pub(crate) fn query(
    sql: &str,
) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
}

/// A query pgtest built itself, for typed results.
#[cfg(pgtest_sqlx08)]
pub(crate) fn query(
    sql: &str,
) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql)
}

/// A migrator without migrations.
#[cfg(not(pgtest_sqlx08))]
pub(crate) fn no_migrations() -> Migrator {
    Migrator::with_migrations(Vec::new())
}

/// A migrator without migrations (sqlx 0.8 has no constructor for one).
#[cfg(pgtest_sqlx08)]
pub(crate) fn no_migrations() -> Migrator {
    Migrator {
        migrations: std::borrow::Cow::Borrowed(&[]),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    }
}
