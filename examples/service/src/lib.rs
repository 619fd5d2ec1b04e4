//! A small job service: a batch runs on a number of workers, background
//! tasks on the application's pool that each hold a connection for the
//! whole batch, as a service's workers do. The tests call these functions
//! and never see a task, a join or a transaction.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

/// Runs `batch` on `workers` workers that each take a connection from
/// `pool` and keep it until every worker holds one, then record their part.
/// Returns how many parts the batch has. Needs `workers` connections at once:
/// on a smaller pool it waits until the pool's acquire timeout.
pub async fn run_batch(pool: &PgPool, batch: &str, workers: usize) -> Result<i64, sqlx::Error> {
    let all_in = Arc::new(Barrier::new(workers));
    let mut tasks = JoinSet::new();
    for worker in 0..workers {
        let (pool, all_in, batch) = (pool.clone(), Arc::clone(&all_in), batch.to_owned());
        tasks.spawn(async move {
            let mut connection = pool.acquire().await?;
            all_in.wait().await;
            sqlx::query("insert into jobs (batch, worker) values ($1, $2)")
                .bind(&batch)
                .bind(worker as i32)
                .execute(&mut *connection)
                .await
                .map(|_| ())
        });
    }
    // The first error ends the batch; dropping the set stops the others.
    while let Some(done) = tasks.join_next().await {
        done.expect("a worker panicked")?;
    }
    parts(pool, batch).await
}

/// How many parts of `batch` are recorded.
pub async fn parts(pool: &PgPool, batch: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select count(*) from jobs where batch = $1")
        .bind(batch)
        .fetch_one(pool)
        .await
}
