//! # outbox-capture
//!
//! Log-based capture for the PostgreSQL outbox: a relay that reads committed messages from the
//! server's own log (logical replication, `pgoutput`) instead of polling a table.
//!
//! Writers choose how they write for it, with the same `enqueue`
//! ([`EnqueueMode`](outbox_postgres::EnqueueMode)):
//!
//! - **Message capture** (`WalMessage`): no row at all, one transactional logical decoding
//!   message per message, the cheapest write PostgreSQL has.
//! - **Table capture** (`CapturedRow`): a row in the outbox table, as with polling, but with
//!   the status `captured`, which no polling claim, index or count of the ready rows looks at.
//!   The relay reads the table's inserts from the publication and removes each row once its
//!   message is delivered, one statement per batch. The rows stay queryable (`outbox status`
//!   counts them as pending) and survive the slot: rows written before the slot existed go to
//!   the polling path when the slot is created, instead of waiting for a stream that will never
//!   carry them.
//!
//! One relay reads both, and rows of polling writers in the same table are left to the polling
//! relay that runs alongside.
//!
//! ```no_run
//! # async fn demo(url: &str, sink: std::sync::Arc<dyn outbox_core::Sink>) -> anyhow::Result<()> {
//! use outbox_capture::{CaptureConfig, WalRelay};
//! use outbox_core::Store;
//! use outbox_postgres::{EnqueueMode, PgConfig, PgStore};
//!
//! // Writers: the same `enqueue`, but it emits a logical message instead of writing a row.
//! let store = PgStore::connect(url, PgConfig::default()).await?
//!     .with_enqueue_mode(EnqueueMode::WalMessage);
//! store.migrate().await?;
//!
//! // The relay: streams from the slot (created when missing) until ctrl-c.
//! let relay = WalRelay::new(url, store, sink, CaptureConfig::default())?;
//! relay.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! ## Guarantees
//!
//! - **Only committed messages, in commit order.** PostgreSQL decodes a logical message or an
//!   insert for the slot when, and only if, its transaction commits, and hands transactions
//!   over in the order they committed. Messages of one key therefore reach the sink in commit
//!   order, whatever the interleaving of their writers: a captured message's `seq` is its
//!   commit's position in the WAL (a captured row's own `seq`, taken at insert, is not used),
//!   and there is no key check at claim time.
//! - **Nothing lost, nothing skipped.** The slot's confirmed position moves only past
//!   transactions whose every message was taken by the sink (and its captured row removed) or
//!   written to the outbox table for the polling path (committed). A relay that crashes, is
//!   killed or loses its connection starts again from the confirmed position: at least once,
//!   as with polling.
//! - **Failures take the polling path.** A message whose streamed delivery fails is written to
//!   the outbox table with one attempt counted, due after its backoff (or dead at once for a
//!   permanent failure), and the polling relay that runs alongside retries it with the same
//!   backoff, attempts and dead letters as a polled outbox. Its key is held back: while a key
//!   has messages in the table, its newer messages are written behind them, in order, instead
//!   of going out. Delayed messages take the same path. One write per batch, and only for the
//!   messages that need it. A captured row handed over this way is replaced by an ordinary
//!   row, in the same transaction, behind every other waiting message of its key.
//! - **A message that kills its relay goes dead.** Before a batch reaches the sink its ids are
//!   recorded (one row per slot, replaced by each batch). The next relay on the slot replays
//!   what a dead relay did not confirm; what it finds in that record had a delivery that never
//!   ended, so it goes to the table with the attempt counted, where the polling relay delivers
//!   such a message alone until it is delivered or dead. A sink that panics fails its wave.
//! - **One relay streams at a time.** PostgreSQL lets one session stream from a slot. Relays
//!   started with the same slot wait as standbys and try to take it over every
//!   [`CaptureConfig::standby_retry`]: when the streaming relay dies its session ends and a
//!   standby streams within about a second. To share the load, give groups of topics their own
//!   outbox (schema or table prefix), each with its slot and relay.
//!
//! ## What the slot costs
//!
//! The slot keeps every WAL segment from its confirmed position on. A relay that is stopped
//! for good keeps WAL forever, until the disk fills: watch the lag (`outbox status` shows it
//! per slot), set `max_slot_wal_keep_size` so the server gives up a slot rather than its disk,
//! and drop the slot (`outbox capture drop-slot`) when capture is retired. Dropping it loses
//! the messages emitted since it last confirmed.

mod batch;
mod relay;
mod rows;
mod target;

pub use relay::{
    CAPTURED, CaptureConfig, CaptureReport, CaptureState, CaptureStats, SLOT_LAG, WalRelay,
};

/// Why log-based capture cannot run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// The database URL cannot be used for replication.
    #[error("invalid database URL for log-based capture: {0}")]
    Url(String),
    /// The publication or slot could not be set up (`wal_level`, rights…).
    #[error("{0}")]
    Setup(outbox_core::StoreError),
    /// The server refused the replication connection for good (authentication).
    #[error("replication refused: {0}")]
    Replication(String),
}
