use pgtest::{PgPool, Tenant, pg_test};

#[pg_test(database(migrations = false), database(migrations = false))]
async fn one_pool_two_groups(app: PgPool, tenant: Tenant) {
    let _ = (app, tenant);
}

fn main() {}
