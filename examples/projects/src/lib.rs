//! A small multi-tenant project tracker: organisations own projects.
//!
//! Its test suite (`tests/projects.rs`) shows `#[pg_test]` in use.

use sqlx::postgres::PgRow;
use sqlx::types::Uuid;
use sqlx::{FromRow, PgPool, Row};

/// A project of an organisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    /// The project's id.
    pub id: i64,
    /// The organisation that owns it.
    pub org_id: Uuid,
    /// Its name, unique within the organisation.
    pub name: String,
    /// Whether it is archived.
    pub archived: bool,
}

impl FromRow<'_, PgRow> for Project {
    fn from_row(row: &PgRow) -> sqlx::Result<Self> {
        Ok(Self {
            id: row.try_get("id")?,
            org_id: row.try_get("org_id")?,
            name: row.try_get("name")?,
            archived: row.try_get("archived")?,
        })
    }
}

/// Creates an organisation.
pub async fn create_org(pool: &PgPool, id: Uuid, name: &str) -> sqlx::Result<()> {
    sqlx::query("insert into orgs (id, name) values ($1, $2)")
        .bind(id)
        .bind(name)
        .execute(pool)
        .await?;
    Ok(())
}

/// Adds a project to an organisation.
pub async fn add_project(pool: &PgPool, org_id: Uuid, name: &str) -> sqlx::Result<Project> {
    sqlx::query_as("insert into projects (org_id, name) values ($1, $2) returning *")
        .bind(org_id)
        .bind(name)
        .fetch_one(pool)
        .await
}

/// Archives a project; `false` when the organisation has no such project.
pub async fn archive_project(pool: &PgPool, org_id: Uuid, project_id: i64) -> sqlx::Result<bool> {
    let done = sqlx::query("update projects set archived = true where org_id = $1 and id = $2")
        .bind(org_id)
        .bind(project_id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// The organisation's active projects, by name.
pub async fn active_projects(pool: &PgPool, org_id: Uuid) -> sqlx::Result<Vec<Project>> {
    sqlx::query_as("select * from projects where org_id = $1 and not archived order by name")
        .bind(org_id)
        .fetch_all(pool)
        .await
}

/// Every project the connection may see: with row-level security, only the
/// current organisation's.
pub async fn visible_projects(pool: &PgPool) -> sqlx::Result<Vec<Project>> {
    sqlx::query_as("select * from projects order by name")
        .fetch_all(pool)
        .await
}
