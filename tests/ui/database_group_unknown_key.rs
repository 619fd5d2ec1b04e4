use pgtest::{PgPool, pg_test};

#[pg_test(database(migrations = false), database(migrations = false, max_connections = 2))]
async fn test_level_key_in_a_group(app: PgPool, audit: PgPool) {
    let _ = (app, audit);
}

fn main() {}
