//! # outbox-mysql
//!
//! The transactional outbox on MySQL 8.0.16+ and MariaDB 10.6+.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use outbox_core::{HandlerSink, Message, NewMessage, Relay, Store};
//! use outbox_mysql::MySqlStore;
//!
//! let store = MySqlStore::connect("mysql://app:secret@127.0.0.1:3306/shop").await?;
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
//! ## How it uses MySQL
//!
//! - **Enqueue** is one `INSERT` in the caller's transaction (a batch is one multi-row
//!   `INSERT`, split only past MySQL's placeholder limit), so the message commits or rolls back
//!   with the data. InnoDB is required: a table of another engine has no transactions.
//! - **Claim** is a short transaction under `READ COMMITTED`. It first locks the one row of
//!   `{prefix}claim_lock`, so claims of all relays take turns while deliveries run in parallel;
//!   then it reads the heads from the ready index, locks the rows it takes (`FOR UPDATE`, no gap
//!   locks, so writers never wait), and writes their lease. A relay that dies leaves rows whose
//!   lease expires; the next claim takes them back and counts the attempt, so a message that
//!   kills its relay goes dead after `max_attempts`.
//! - **Per-key order**, whatever the number of relays: a keyed message is claimable only when
//!   no older message of its key is pending or in flight, and no other message of its key is
//!   in flight under a live lease. A key's messages go out in `seq` order among those committed
//!   when a claim reads them. When writers race, so that an older `seq` commits after a newer
//!   one of its key was claimed, the late message waits until that delivery ends and then
//!   follows it: never two messages of a key in delivery at once.
//! - **Clock**: every time (creation, delay, lease, dead-letter age) comes from the server's
//!   clock, in Unix milliseconds, so relays on several machines agree on leases.
//! - **Wake-ups**: MySQL has no notifications. An idle relay polls the ready index once per
//!   poll interval (one cheap indexed query) and claims back to back while there is work; a
//!   relay in the writer's process is woken at once by [`MySqlStore::notify`] after commit.
//! - **Schema**: versioned migrations embedded in the binary, recorded in
//!   `{prefix}schema_migrations`; processes migrating together take turns under `GET_LOCK`,
//!   and a database migrated by a newer build is refused. Several outboxes can share a
//!   database under different table prefixes ([`MySqlConfig`]).

mod inbox;
mod migrate;
mod store;

pub use inbox::MySqlInbox;
pub use migrate::LATEST_VERSION;
pub use store::{EnqueueError, MySqlConfig, MySqlOutbox, MySqlStore};
