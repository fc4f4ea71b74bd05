//! # outbox-postgres
//!
//! The transactional outbox on PostgreSQL. Enqueue a message in the same transaction as your
//! data; a [`Relay`](outbox_core::Relay) on a [`PgStore`] delivers it after commit.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use outbox_core::{HandlerSink, Message, NewMessage, Relay, Store};
//! use outbox_postgres::PgStore;
//!
//! let store = PgStore::new(pool.clone());
//! store.migrate().await?;
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
//! let msg = NewMessage::json("orders", "order.created", &serde_json::json!({"id": 42}))?.key("42");
//! store.outbox().enqueue(&mut tx, &msg).await?;
//! tx.commit().await?;
//!
//! let sink = HandlerSink::new(|m: Message| async move { println!("deliver {}", m.id); Ok(()) });
//! Relay::new(Arc::new(store), Arc::new(sink)).run(async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```
//!
//! ## How it uses PostgreSQL
//!
//! - **Enqueue** is one `INSERT` in the caller's transaction (a batch is one `INSERT … SELECT
//!   FROM UNNEST`), so the message commits or rolls back with the data.
//! - **Enqueue from SQL**, for writers in other languages sharing the database: the migrations
//!   install `outbox_enqueue(topic, type, payload jsonb [, key [, headers jsonb]])` and
//!   `outbox_enqueue_bytes(topic, type, content_type, payload bytea [, key [, headers]])`
//!   (named after the configured schema and prefix). They apply the library's checks (names,
//!   reserved and malformed headers, the size limit from the `outbox.max_message_bytes`
//!   setting, 1 MiB by default), refuse with SQLSTATE 22023 in the library's words, and write
//!   the row the library would, partition included.
//! - **Claim** is one `SELECT … FOR UPDATE SKIP LOCKED` per batch, in a transaction that
//!   stays open while the batch is delivered ([`ClaimMode::Transaction`], the default): the row
//!   locks are the lease. Concurrent relays take disjoint rows without waiting on each other; a
//!   key's later messages stay unclaimable while an earlier one is locked; the delivered rows
//!   are deleted in the same transaction, which then commits once. A relay that dies frees its
//!   messages the moment its session ends, and one stuck in its sink for longer than the lease
//!   loses its session (`idle_in_transaction_session_timeout`). Nothing is written at claim
//!   time, so a drained message costs the database a lock and a delete.
//! - [`ClaimMode::Lease`] instead writes the lease on the rows with an `UPDATE` (`available_at`
//!   becomes the lease expiry) and holds no transaction during delivery: slower to drain, but
//!   in-flight messages show in `status` and delivery holds no connection.
//! - Nothing is read by position, so rows whose ids commit out of order are never skipped.
//! - **Ack** is one `DELETE` (or `UPDATE` to `delivered` when retention keeps rows) per batch;
//!   failures are one `UPDATE`.
//! - **Wake-ups without the NOTIFY trap.** `NOTIFY` in a writer's transaction takes a
//!   cluster-wide lock at commit and serialises every notifying commit. Here an idle relay
//!   registers itself in `{prefix}relays`; a statement trigger notifies only while a relay is
//!   registered, and a relay withdraws as soon as it has work. A busy outbox costs writers one
//!   indexed lookup per insert statement and no NOTIFY; an idle relay wakes within milliseconds
//!   and otherwise polls once per interval.
//! - **Schema**: versioned migrations embedded in the binary, applied under an advisory lock,
//!   in a configurable schema with a configurable table prefix ([`PgConfig`]).

pub mod capture;
mod inbox;
mod migrate;
mod ownership;
mod sql;
mod store;

pub use capture::EnqueueMode;
pub use inbox::PgInbox;
pub use migrate::LATEST_VERSION;
pub use sql::PgConfig;
pub use store::{ClaimMode, EnqueueError, PgOutbox, PgStore};
