//! # outbox-sqlite
//!
//! The transactional outbox on SQLite, the embedded default: no server, one file.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use outbox_core::{HandlerSink, Message, NewMessage, Relay, Store};
//! use outbox_sqlite::SqliteStore;
//!
//! let store = SqliteStore::connect("sqlite://app.db").await?;
//! store.migrate().await?;
//! let mut tx = store.pool().begin().await?;
//! // … your business writes on `tx` …
//! let msg = NewMessage::json("orders", "order.created", &serde_json::json!({"id": 42}))?.key("42");
//! store.outbox().enqueue(&mut tx, &msg).await?;
//! tx.commit().await?;
//! store.notify(); // wake an in-process relay now rather than at its next poll
//!
//! let sink = HandlerSink::new(|m: Message| async move { println!("deliver {}", m.id); Ok(()) });
//! Relay::new(Arc::new(store), Arc::new(sink)).run(async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```
//!
//! ## How it uses SQLite
//!
//! - **Enqueue** is one `INSERT` in the caller's transaction (a batch is one multi-row
//!   `INSERT`, split only where SQLite's bound-parameter limit requires), so the message commits
//!   or rolls back with the data.
//! - **Claim** is one `UPDATE … WHERE seq IN (SELECT … LIMIT n) RETURNING …`. SQLite runs one
//!   writer at a time, so the statement is atomic and two relays never claim the same row; the
//!   claim is a lease (the row's `available_at` becomes the lease expiry), so a relay that dies
//!   leaves rows that come back by themselves.
//! - **Per-key order** as on every store: a keyed message is claimable only when no earlier
//!   message with its key is pending or in flight.
//! - **Connections** use WAL (readers never block the writer), `synchronous = NORMAL` (a power
//!   loss may undo the last commits, message and data together, never one without the other)
//!   and a 5 s busy timeout. Open write transactions with `BEGIN IMMEDIATE`
//!   (`pool.begin_with("BEGIN IMMEDIATE")`) when they read before they write.
//! - **Clock**: times are stored as Unix milliseconds read from this process's clock. Every
//!   writer and relay of a file runs on the same machine, so they share that clock; a clock
//!   step moves leases and delays by the same amount.
//! - **Wake-ups**: SQLite has no cross-process notification. The relay polls (once per poll
//!   interval when idle); a relay in the writer's process is woken at once by
//!   [`SqliteStore::notify`] (or the [`SqliteStore::notifier`] handle) after commit.
//! - **Schema**: versioned migrations embedded in the binary, each applied in its own
//!   `BEGIN IMMEDIATE` transaction and recorded in `{prefix}schema_migrations`, so processes
//!   starting together apply each version once; a file migrated by a newer build is refused
//!   rather than guessed at. Several outboxes can share a file under different table prefixes
//!   ([`SqliteConfig`]).

mod inbox;
mod migrate;
mod store;

pub use inbox::SqliteInbox;
pub use migrate::LATEST_VERSION;
pub use store::{EnqueueError, SqliteConfig, SqliteOutbox, SqliteStore};
