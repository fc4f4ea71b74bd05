//! Partition ownership on PostgreSQL, with session advisory locks and no table.
//!
//! Each relay keeps one connection of its own. On it, it holds a *member* lock (its presence:
//! the database drops it the moment the session ends, whether the relay exited, crashed or lost
//! the network) and one lock per partition it owns. Every rebalance reads the members from
//! `pg_locks`, computes this relay's share ([`outbox_core::assign`]), takes the free partitions of
//! its share and unlocks those outside it that have nothing in flight. A partition is therefore
//! claimed by one relay at a time, and a dead relay's partitions are free at once, with no
//! heartbeat written anywhere.

use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{Assignment, Ownership, PARTITIONS, StoreError, StoreResult, assign};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, Row};

use crate::store::{PgStore, bounded};

/// The server probes an idle ownership session after 10 s and drops it after three unanswered
/// probes 5 s apart. A relay cut off by a partition (rather than exiting) holds its member and
/// partition locks until its session ends; with the operating system's defaults that would
/// take over two hours, during which no other relay may claim those partitions.
const SERVER_KEEPALIVES: [(&str, &str); 3] = [
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
];

/// Granted locks of two advisory namespaces in this database, as (namespace, key) pairs: one
/// read of `pg_locks` (about 1.5 ms with a thousand locks held, as it visits every lock
/// partition) for both the members and the partitions.
const LOCKS: &str = "SELECT classid::int8 AS ns, objid::int8 AS key FROM pg_locks \
    WHERE locktype = 'advisory' AND objsubid = 2 AND granted \
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
      AND classid IN (($1::int8)::oid, ($2::int8)::oid)";

const TRY_LOCK: &str = "SELECT coalesce(array_agg(p), '{}') FROM unnest($2::int[]) AS p WHERE pg_try_advisory_lock($1, p)";

const UNLOCK: &str = "SELECT count(*) FROM unnest($2::int[]) AS p WHERE pg_advisory_unlock($1, p)";

fn db(e: sqlx::Error) -> StoreError {
    StoreError::database(e)
}

/// One relay's membership and partitions.
pub(crate) struct PgOwnership {
    options: PgConnectOptions,
    timeout: Duration,
    members_ns: i32,
    partitions_ns: i32,
    /// The session holding the locks, with this relay's member key; `None` once lost.
    session: Option<(PgConnection, i32)>,
    owned: Vec<bool>,
}

impl PgOwnership {
    pub(crate) fn new(store: &PgStore) -> Self {
        Self {
            options: (*store.pool().connect_options())
                .clone()
                .options(SERVER_KEEPALIVES),
            timeout: store.query_timeout(),
            members_ns: store.lock_ns("members"),
            partitions_ns: store.lock_ns("partitions"),
            session: None,
            owned: vec![false; PARTITIONS as usize],
        }
    }

    /// Connects and takes a member key no other live relay holds.
    async fn join(&mut self) -> StoreResult<()> {
        let mut conn = PgConnection::connect_with(&self.options)
            .await
            .map_err(db)?;
        loop {
            let key = (rand::random::<u32>() & 0x7fff_ffff) as i32;
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(self.members_ns)
                .bind(key)
                .fetch_one(&mut conn)
                .await
                .map_err(db)?;
            if got {
                self.owned.fill(false);
                self.session = Some((conn, key));
                return Ok(());
            }
        }
    }

    async fn step(&mut self, busy: &(dyn Fn(i32) -> bool + Sync)) -> StoreResult<Assignment> {
        if self.session.is_none() {
            self.join().await?;
        }
        let (members_ns, partitions_ns) = (self.members_ns, self.partitions_ns);
        let Some((conn, me)) = self.session.as_mut() else {
            return Ok(Assignment::none());
        };
        let (members, partitions_held) = lock_keys(conn, members_ns, partitions_ns).await?;
        let share = assign(&members, i64::from(*me));
        let take: Vec<i32> = partitions(|p| share[p] && !self.owned[p]);
        let (mut taken, mut given) = (0, 0);
        if !take.is_empty() {
            let got: Vec<i32> = sqlx::query_scalar(TRY_LOCK)
                .bind(partitions_ns)
                .bind(&take)
                .fetch_one(&mut *conn)
                .await
                .map_err(db)?;
            taken = got.len();
            for p in got {
                self.owned[p as usize] = true;
            }
        }
        let give: Vec<i32> = partitions(|p| self.owned[p] && !share[p] && !busy(p as i32));
        if !give.is_empty() {
            sqlx::query(UNLOCK)
                .bind(partitions_ns)
                .bind(&give)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
            given = give.len();
            for p in give {
                self.owned[p as usize] = false;
            }
        }
        // The count was read before this step's changes: a step that changed nothing (nearly
        // all of them) saw what is still true; one that did reads the locks again.
        let held = if taken + given == 0 {
            partitions_held
        } else {
            lock_keys(conn, members_ns, partitions_ns).await?.1
        };
        let claimable: Vec<bool> = (0..share.len())
            .map(|p| share[p] && self.owned[p])
            .collect();
        Ok(Assignment {
            settled: share == self.owned,
            claimable: (!claimable.iter().all(|&c| c)).then(|| claimable.into()),
            complete: held == PARTITIONS as usize,
        })
    }
}

/// The partitions for which `f` holds.
fn partitions(f: impl Fn(usize) -> bool) -> Vec<i32> {
    (0..PARTITIONS as usize)
        .filter(|&p| f(p))
        .map(|p| p as i32)
        .collect()
}

/// The member keys and the number of partitions held, by any relay.
async fn lock_keys(
    conn: &mut PgConnection,
    members_ns: i32,
    partitions_ns: i32,
) -> StoreResult<(Vec<i64>, usize)> {
    let rows = sqlx::query(LOCKS)
        .bind(i64::from(members_ns))
        .bind(i64::from(partitions_ns))
        .fetch_all(conn)
        .await
        .map_err(db)?;
    let (mut members, mut partitions) = (Vec::new(), 0);
    for row in rows {
        if row.try_get::<i64, _>("ns").map_err(db)? == i64::from(members_ns) {
            members.push(row.try_get::<i64, _>("key").map_err(db)?);
        } else {
            partitions += 1;
        }
    }
    Ok((members, partitions))
}

#[async_trait]
impl Ownership for PgOwnership {
    async fn rebalance(&mut self, busy: &(dyn Fn(i32) -> bool + Sync)) -> StoreResult<Assignment> {
        let result = bounded(self.timeout, self.step(busy)).await;
        if result.is_err() {
            // The session may be gone, and its locks with it: start over on a new one.
            self.session = None;
            self.owned.fill(false);
        }
        result
    }
}
