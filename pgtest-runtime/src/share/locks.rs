//! The server's side of the budget across machines: the session advisory
//! locks in the lock database that stand for server slots, for runners and
//! for runners that want more, and what `pg_locks` says of them. Each is a
//! pair of keys: a class of pgtest's, and a number.

use sqlx::postgres::PgConnection;

/// A server slot: the second key is its number, from 0.
const SLOT_CLASS: i32 = 0x7067_7331;
/// A runner, announced: the second key is its keeper's own.
const RUNNER_CLASS: i32 = 0x7067_7332;
/// A runner that wants more slots than it holds.
const WANT_CLASS: i32 = 0x7067_7333;

/// pgtest's advisory locks granted in this database, as `pg_locks` shows
/// them (`objsubid` 2: locks taken with two keys): `ours (class, key, pid)`.
macro_rules! with_ours {
    ($sql:literal) => {
        concat!(
            "with ours as (select l.classid::int8 as class, l.objid::int8 as key, l.pid \
             from pg_locks l where l.locktype = 'advisory' and l.granted and l.objsubid = 2 \
             and l.database = (select oid from pg_database where datname = current_database())) ",
            $sql
        )
    };
}

/// What the server says of the runners now.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Census {
    /// Runners announced, this one included.
    pub(crate) runners: u32,
    /// Whether another runner wants more than it holds.
    pub(crate) others_want: bool,
}

pub(crate) async fn census(connection: &mut PgConnection) -> sqlx::Result<Census> {
    let sql = with_ours!(
        "select (select count(distinct pid) from ours where class = $1)::int4, \
                exists (select 1 from ours where class = $2 and pid <> pg_backend_pid())"
    );
    let (runners, others_want): (i32, bool) = sqlx::query_as(sql)
        .bind(i64::from(RUNNER_CLASS))
        .bind(i64::from(WANT_CLASS))
        .fetch_one(connection)
        .await?;
    Ok(Census {
        runners: u32::try_from(runners).unwrap_or(1).max(1),
        others_want,
    })
}

/// Announces this session as a runner, with a number of its own; returns
/// the number.
pub(crate) async fn announce(connection: &mut PgConnection) -> sqlx::Result<i32> {
    loop {
        let id = (uuid::Uuid::new_v4().as_u128() as i32) & i32::MAX;
        let taken: bool = sqlx::query_scalar("select pg_try_advisory_lock($1, $2)")
            .bind(RUNNER_CLASS)
            .bind(id)
            .fetch_one(&mut *connection)
            .await?;
        if taken {
            return Ok(id);
        }
    }
}

/// Says, or stops saying, that the runner `id` wants more.
pub(crate) async fn want(connection: &mut PgConnection, id: i32, wants: bool) -> sqlx::Result<()> {
    let sql = match wants {
        true => "select pg_try_advisory_lock($1, $2)",
        false => "select pg_advisory_unlock($1, $2)",
    };
    sqlx::query(sql)
        .bind(WANT_CLASS)
        .bind(id)
        .execute(connection)
        .await
        .map(drop)
}

/// Takes at most `count` free server slots of the `capacity` there are,
/// looking at them in a random order (so that runners spread out); the
/// numbers of those it took.
pub(crate) async fn take_slots(
    connection: &mut PgConnection,
    capacity: u32,
    count: u32,
) -> sqlx::Result<Vec<i32>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    // Locked one by one: a volatile filter under a limit may be run on a
    // row the query then does not return, and a lock taken that way would
    // be held by no one's count.
    let free: Vec<i32> = sqlx::query_scalar(with_ours!(
        "select g from generate_series(0, $1 - 1) g \
         where not exists (select 1 from ours where class = $2 and key = g) \
         order by random()"
    ))
    .bind(i32::try_from(capacity).unwrap_or(i32::MAX))
    .bind(i64::from(SLOT_CLASS))
    .fetch_all(&mut *connection)
    .await?;
    let mut taken = Vec::new();
    for slot in free {
        if taken.len() as u32 == count {
            break;
        }
        let locked: bool = sqlx::query_scalar("select pg_try_advisory_lock($1, $2)")
            .bind(SLOT_CLASS)
            .bind(slot)
            .fetch_one(&mut *connection)
            .await?;
        if locked {
            taken.push(slot);
        }
    }
    Ok(taken)
}

/// Gives back the server slots `slots`.
pub(crate) async fn release_slots(
    connection: &mut PgConnection,
    slots: &[i32],
) -> sqlx::Result<()> {
    if slots.is_empty() {
        return Ok(());
    }
    sqlx::query("select pg_advisory_unlock($2, s) from unnest($1::int4[]) s")
        .bind(slots)
        .bind(SLOT_CLASS)
        .execute(connection)
        .await
        .map(drop)
}

/// Takes one free server slot of `capacity` for this session's own
/// connection (a helper's that works beside other machines' runners);
/// whether it did. It is held until the session ends.
pub(crate) async fn hold_slot_for_self(
    connection: &mut PgConnection,
    capacity: u32,
) -> sqlx::Result<bool> {
    Ok(!take_slots(connection, capacity, 1).await?.is_empty())
}
