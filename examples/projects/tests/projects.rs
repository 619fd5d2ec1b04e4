//! The project tracker's suite: every test shares one migrated database and
//! keeps to its own organisation, the test's tenant.

use pgtest::{Tenant, TestContext, pg_test};
use pgtest_example_projects::{
    active_projects, add_project, archive_project, create_org, visible_projects,
};
use sqlx::PgPool;

#[pg_test]
async fn a_new_org_has_no_projects(pool: PgPool, tenant: Tenant) -> anyhow::Result<()> {
    create_org(&pool, tenant.id(), "acme").await?;
    assert!(active_projects(&pool, tenant.id()).await?.is_empty());
    Ok(())
}

#[pg_test(seed = "fixtures/acme.sql")]
async fn projects_are_listed_by_name(pool: PgPool, tenant: Tenant) -> anyhow::Result<()> {
    add_project(&pool, tenant.id(), "bridges").await?;
    let names: Vec<String> = active_projects(&pool, tenant.id())
        .await?
        .into_iter()
        .map(|project| project.name)
        .collect();
    assert_eq!(names, ["anvils", "bridges", "rockets"]);
    Ok(())
}

#[pg_test(seed = "fixtures/acme.sql")]
async fn archived_projects_are_not_active(pool: PgPool, tenant: Tenant) -> anyhow::Result<()> {
    let anvils = active_projects(&pool, tenant.id()).await?.remove(0);
    assert!(archive_project(&pool, tenant.id(), anvils.id).await?);
    let names: Vec<String> = active_projects(&pool, tenant.id())
        .await?
        .into_iter()
        .map(|project| project.name)
        .collect();
    assert_eq!(names, ["rockets"]);
    Ok(())
}

#[pg_test(seed = "fixtures/acme.sql")]
async fn a_project_name_is_unique_within_its_org(pool: PgPool, tenant: Tenant) {
    let error = add_project(&pool, tenant.id(), "anvils").await.unwrap_err();
    let code = error
        .as_database_error()
        .and_then(|e| e.code())
        .map(|code| code.into_owned());
    assert_eq!(code.as_deref(), Some("23505"), "{error}");
}

/// As `app_user`, row-level security shows only the tenant's projects, even
/// though other tests' projects share the table.
#[pg_test(seed = "fixtures/acme.sql", role = "app_user")]
async fn row_level_security_hides_other_orgs(ctx: TestContext) -> anyhow::Result<()> {
    let projects = visible_projects(ctx.pool()).await?;
    assert_eq!(projects.len(), 2, "{projects:?}");
    assert!(
        projects
            .iter()
            .all(|project| project.org_id == ctx.tenant().id())
    );
    Ok(())
}

#[pg_test(role = "app_user")]
async fn row_level_security_refuses_rows_for_another_org(
    pool: PgPool,
    tenant: Tenant,
) -> anyhow::Result<()> {
    create_org(&pool, tenant.id(), "acme").await?;
    let other = Tenant::new();
    create_org(&pool, other.id(), "globex").await?;
    let error = add_project(&pool, other.id(), "spying").await.unwrap_err();
    assert!(error.to_string().contains("row-level security"), "{error}");
    Ok(())
}
