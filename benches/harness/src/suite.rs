//! The generated suite: a realistic schema and the same test bodies in seven
//! flavours, written under `target/` (never committed).

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

/// The ways of writing the same tests: `#[pg_test]` in each isolation
/// mode (shared, database, transaction), `#[pgtest::sqlx_test]` (the
/// drop-in: a database each, a pool that opens connections as sqlx's
/// does), `#[sqlx::test]`, plain (a pool per test on a pre-migrated
/// database), and the floor: the least any library must do per test, one
/// connection opened for the test on that database (no pool, no budget, no
/// tenant), closed at its end.
pub(crate) const FLAVOURS: [&str; 7] = [
    "pgtest",
    "pgtestdb",
    "pgtesttx",
    "pgtestsqlx",
    "sqlx",
    "plain",
    "floor",
];

const MIGRATIONS: [(&str, &str); 6] = [
    (
        "0001_orgs_and_users.sql",
        "create type plan as enum ('free', 'team', 'enterprise');
create table orgs (id uuid primary key, name text not null, plan plan not null default 'free',
    created_at timestamptz not null default now());
create table users (id bigint generated always as identity primary key,
    org_id uuid not null references orgs (id) on delete cascade, email text not null,
    name text not null, unique (org_id, email));
create index users_org on users (org_id);",
    ),
    (
        "0002_projects.sql",
        "create table projects (id bigint generated always as identity primary key,
    org_id uuid not null references orgs (id) on delete cascade, name text not null,
    owner_id bigint references users (id), archived boolean not null default false,
    unique (org_id, name));
create table project_members (project_id bigint not null references projects (id) on delete cascade,
    user_id bigint not null references users (id) on delete cascade, role text not null,
    primary key (project_id, user_id));",
    ),
    (
        "0003_tasks.sql",
        "create table tasks (id bigint generated always as identity primary key,
    project_id bigint not null references projects (id) on delete cascade, title text not null,
    assignee_id bigint references users (id), done boolean not null default false,
    updated_at timestamptz not null default now());
create index tasks_project on tasks (project_id);
create index tasks_assignee on tasks (assignee_id) where not done;
create table task_comments (id bigint generated always as identity primary key,
    task_id bigint not null references tasks (id) on delete cascade,
    author_id bigint not null references users (id), body text not null);
create table labels (id bigint generated always as identity primary key,
    org_id uuid not null references orgs (id) on delete cascade, name text not null);
create table task_labels (task_id bigint not null references tasks (id) on delete cascade,
    label_id bigint not null references labels (id) on delete cascade, primary key (task_id, label_id));",
    ),
    (
        "0004_audit.sql",
        "create table audit_log (id bigint generated always as identity primary key, org_id uuid not null,
    entity text not null, entity_id bigint not null, action text not null,
    at timestamptz not null default now());
create index audit_org on audit_log (org_id, at);
create function touch_task() returns trigger language plpgsql as $$
begin
    new.updated_at := now();
    insert into audit_log (org_id, entity, entity_id, action)
    select p.org_id, 'task', new.id, tg_op from projects p where p.id = new.project_id;
    return new;
end $$;
create trigger tasks_touch before insert or update on tasks for each row execute function touch_task();",
    ),
    (
        "0005_billing.sql",
        "create table invoices (id bigint generated always as identity primary key,
    org_id uuid not null references orgs (id) on delete cascade, amount_cents bigint not null,
    issued_on date not null default current_date);
create table payments (id bigint generated always as identity primary key,
    invoice_id bigint not null references invoices (id) on delete cascade, amount_cents bigint not null);
create table api_keys (id bigint generated always as identity primary key,
    org_id uuid not null references orgs (id) on delete cascade, prefix text not null unique,
    created_by bigint references users (id));",
    ),
    (
        "0006_settings.sql",
        "create table org_settings (org_id uuid primary key references orgs (id) on delete cascade,
    timezone text not null default 'UTC', weekly_digest boolean not null default true);
create table webhooks (id bigint generated always as identity primary key,
    org_id uuid not null references orgs (id) on delete cascade, url text not null);
create table webhook_deliveries (id bigint generated always as identity primary key,
    webhook_id bigint not null references webhooks (id) on delete cascade, status int not null);
create index deliveries_webhook on webhook_deliveries (webhook_id);",
    ),
];

/// The body every flavour runs, with `pool` and `org` (a `Uuid`) in scope:
/// sequential inserts scoped by the org, then reads back.
pub(crate) const BODY: &str = r#"
    sqlx::query("insert into orgs (id, name, plan) values ($1, 'acme', 'team')").bind(org).execute(&pool).await.unwrap();
    let mut users = Vec::new();
    for name in ["ada", "grace", "linus"] {
        let id: i64 = sqlx::query_scalar("insert into users (org_id, email, name) values ($1, $2, $3) returning id")
            .bind(org).bind(format!("{name}@example.com")).bind(name).fetch_one(&pool).await.unwrap();
        users.push(id);
    }
    let project: i64 = sqlx::query_scalar("insert into projects (org_id, name, owner_id) values ($1, 'launch', $2) returning id")
        .bind(org).bind(users[0]).fetch_one(&pool).await.unwrap();
    for (title, who) in [("design", users[1]), ("build", users[2]), ("ship", users[0])] {
        sqlx::query("insert into tasks (project_id, title, assignee_id) values ($1, $2, $3)")
            .bind(project).bind(title).bind(who).execute(&pool).await.unwrap();
    }
    let open: i64 = sqlx::query_scalar(
        "select count(*) from tasks t join projects p on p.id = t.project_id where p.org_id = $1 and not t.done")
        .bind(org).fetch_one(&pool).await.unwrap();
    assert_eq!(open, 3);
    let audited: i64 = sqlx::query_scalar("select count(*) from audit_log where org_id = $1")
        .bind(org).fetch_one(&pool).await.unwrap();
    assert_eq!(audited, 3);
"#;

/// Writes the suite's crate into `dir`: `tests` tests per flavour, spread
/// over `binaries` test binaries each. With `via_library`, the bodies call
/// a function of the suite's library that runs the same queries (as tests
/// that go through application code do) instead of running them inline;
/// the transaction and floor flavours, which take a connection, stay
/// inline.
pub(crate) fn write(
    dir: &Path,
    pgtest: &Path,
    tests: usize,
    binaries: usize,
    via_library: bool,
) -> anyhow::Result<()> {
    write_crate(dir, "bench-suite", pgtest)?;
    fs::create_dir_all(dir.join("src"))?;
    fs::write(
        dir.join("src/lib.rs"),
        format!(
            "//! The bodies' queries, for `--via-library`.\n\nuse sqlx::PgPool;\nuse sqlx::types::Uuid;\n\n\
             /// The scenario every test runs.\npub async fn scenario(pool: &PgPool, org: Uuid) {{{}}}\n",
            BODY.replace("&pool", "pool")
        ),
    )?;
    let body = match via_library {
        true => "\n    bench_suite::scenario(&pool, org).await;\n",
        false => BODY,
    };
    for binary in 0..binaries {
        let count = tests / binaries + usize::from(binary < tests % binaries);
        for flavour in FLAVOURS {
            let names = (0..count).map(|test| format!("case_{binary}_{test}"));
            fs::write(
                dir.join("tests").join(format!("{flavour}_{binary}.rs")),
                test_file(flavour, names, body)?,
            )?;
        }
    }
    Ok(())
}

/// A crate named `name` in `dir` with the suite's dependencies and
/// migrations, and an empty `tests/`.
pub(crate) fn write_crate(dir: &Path, name: &str, pgtest: &Path) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(dir.join("tests"));
    fs::create_dir_all(dir.join("tests"))?;
    fs::create_dir_all(dir.join("migrations"))?;
    for (name, sql) in MIGRATIONS {
        fs::write(dir.join("migrations").join(name), sql)?;
    }
    fs::write(
        dir.join("Cargo.toml"),
        format!(
            r#"[package]
name = "{name}"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
sqlx = {{ version = "0.9", default-features = false, features = ["postgres", "runtime-tokio", "migrate", "macros", "uuid"] }}

[dev-dependencies]
pgtest = {{ path = "{pgtest}" }}
tokio = {{ version = "1", features = ["macros", "rt"] }}

[workspace]
"#,
            pgtest = pgtest.display()
        ),
    )?;
    Ok(())
}

/// A test file of `flavour` (one of [`FLAVOURS`], or `body`: the body
/// alone, in an async fn whose future a plain `#[test]` would poll once but
/// does not run, so that it is compiled and linked as a runner's would be) with a test
/// of each name running `body` (the transaction and floor flavours run
/// [`BODY`] on their connection).
pub(crate) fn test_file(
    flavour: &str,
    names: impl Iterator<Item = String>,
    body: &str,
) -> anyhow::Result<String> {
    let mut file = String::from("use sqlx::types::Uuid;\n");
    match flavour {
        "pgtesttx" => {}
        "floor" => file.push_str("use sqlx::{Connection, PgConnection};\n"),
        _ => file.push_str("use sqlx::PgPool;\n"),
    }
    if flavour == "body" {
        // What any way of running the bodies compiles: their futures, polled.
        file.push_str(
            "\nfn poll_once<F: std::future::Future>(future: F) {\n    let mut future = std::pin::pin!(future);\n    let mut context = std::task::Context::from_waker(std::task::Waker::noop());\n    let _ = future.as_mut().poll(&mut context);\n}\n",
        );
    }
    for name in names {
        match flavour {
            "pgtest" => write!(
                file,
                "\n#[pgtest::pg_test(migrations = \"./migrations\")]\nasync fn {name}(pool: PgPool, tenant: pgtest::Tenant) {{\n    let org: Uuid = tenant.id();{body}}}\n"
            )?,
            "pgtestdb" => write!(
                file,
                "\n#[pgtest::pg_test(isolation = \"database\", migrations = \"./migrations\")]\nasync fn {name}(pool: PgPool) {{\n    let org = Uuid::new_v4();{body}}}\n"
            )?,
            "pgtesttx" => write!(
                file,
                "\n#[pgtest::pg_test(isolation = \"transaction\", migrations = \"./migrations\")]\nasync fn {name}(mut conn: sqlx::pool::PoolConnection<sqlx::Postgres>) {{\n    let org = Uuid::new_v4();{}}}\n",
                BODY.replace("&pool", "&mut *conn")
            )?,
            "sqlx" => write!(
                file,
                "\n#[sqlx::test(migrations = \"./migrations\")]\nasync fn {name}(pool: PgPool) {{\n    let org = Uuid::new_v4();{body}}}\n"
            )?,
            "pgtestsqlx" => write!(
                file,
                "\n#[pgtest::sqlx_test(migrations = \"./migrations\")]\nasync fn {name}(pool: PgPool) {{\n    let org = Uuid::new_v4();{body}}}\n"
            )?,
            "floor" => write!(
                file,
                "\n#[tokio::test]\nasync fn {name}() {{\n    let mut conn = PgConnection::connect(&std::env::var(\"PLAIN_DATABASE_URL\").unwrap()).await.unwrap();\n    let org = Uuid::new_v4();{}    conn.close().await.unwrap();\n}}\n",
                BODY.replace("&pool", "&mut conn")
            )?,
            "plain" => write!(
                file,
                "\n#[tokio::test]\nasync fn {name}() {{\n    let pool = PgPool::connect(&std::env::var(\"PLAIN_DATABASE_URL\").unwrap()).await.unwrap();\n    let org = Uuid::new_v4();{body}    pool.close().await;\n}}\n"
            )?,
            "body" => write!(
                file,
                "\nasync fn {name}_body(pool: PgPool) {{\n    let org = Uuid::new_v4();{body}}}\n\n#[test]\nfn {name}() {{\n    std::hint::black_box((|pool: PgPool| poll_once({name}_body(pool))) as fn(PgPool));\n}}\n"
            )?,
            other => anyhow::bail!("no such flavour: {other}"),
        }
    }
    Ok(file)
}

/// The migrations, for migrating the plain flavour's database.
pub(crate) fn migrations_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("migrations")
}
