use pgtest::{PgPool, pg_test};

#[pg_test(env(migrations = false), env(migrations = false))]
async fn sqlx_proposal_spelling(app: PgPool, audit: PgPool) {
    let _ = (app, audit);
}

fn main() {}
