use pgtest::{PgPool, pg_test};

#[pg_test(migrations = false, database(migrations = false), database(migrations = false))]
async fn migrations_outside_the_groups(app: PgPool, audit: PgPool) {
    let _ = (app, audit);
}

fn main() {}
