//! A real admin server on 127.0.0.1:0, mounted at `/admin` as the crate docs say, over a fresh
//! SQLite file.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use outbox_admin::AdminState;
use outbox_core::{Failure, NewMessage, Store};
use outbox_sqlite::SqliteStore;
use uuid::Uuid;

pub struct Admin {
    pub base: String,
    pub store: SqliteStore,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Admin {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn dyn_store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }
}

/// Starts the admin router on a migrated outbox; `configure` may add a token or relay stats.
pub async fn start(configure: impl FnOnce(AdminState) -> AdminState) -> anyhow::Result<Admin> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("outbox.db").display());
    let store = SqliteStore::connect(&url).await?;
    store.migrate().await?;
    let state = configure(AdminState::new(Arc::new(store.clone())));
    let app = axum::Router::new().nest_service("/admin", outbox_admin::router(state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("admin server");
    });
    Ok(Admin {
        base,
        store,
        server,
        _dir: dir,
    })
}

pub async fn enqueue(store: &SqliteStore, msgs: &[NewMessage]) -> anyhow::Result<()> {
    let mut tx = store.pool().begin().await?;
    store.outbox().enqueue_batch(&mut tx, msgs).await?;
    tx.commit().await?;
    Ok(())
}

/// Enqueues `msgs` and makes every one of them dead with `error`.
pub async fn dead(store: &SqliteStore, msgs: &[NewMessage], error: &str) -> anyhow::Result<()> {
    enqueue(store, msgs).await?;
    let claimed = store.claim("seed", 1000, Duration::from_secs(60)).await?;
    let failures: Vec<_> = claimed
        .iter()
        .map(|m| Failure {
            id: m.id,
            error: error.into(),
            retry_in: None,
        })
        .collect();
    store.fail("seed", &failures).await?;
    Ok(())
}

pub fn message(topic: &str, kind: &str, key: Option<&str>, n: u64) -> NewMessage {
    let m = NewMessage::json(topic, kind, &serde_json::json!({ "n": n }))
        .expect("valid message")
        .header("trace", format!("t{n}"));
    match key {
        Some(k) => m.key(k),
        None => m,
    }
}

pub fn ids(v: &serde_json::Value) -> Vec<Uuid> {
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|m| m["id"].as_str().unwrap().parse().unwrap())
        .collect()
}
