//! A Surface on a real SQLite store and a real relay, over real HTTP.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing;
use outbox_core::{HandlerSink, Message, Relay, RelayConfig, RelayState, Store};
use outbox_server::{ServerLimits, Surface};
use outbox_sqlite::SqliteStore;

async fn store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    let url = format!("sqlite://{}", dir.path().join("outbox.db").display());
    let store = SqliteStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    Arc::new(store)
}

async fn get(url: String) -> (u16, String, serde_json::Value) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    let body = r.json().await.unwrap_or_default();
    (status, ct, body)
}

#[tokio::test]
async fn a_merged_router_is_served_beside_health_and_a_stopped_relay_fails_both_checks() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let sink = HandlerSink::new(|_m: Message| async { Ok(()) });
    let config = RelayConfig::default().exit_when_idle(true);
    let relay = Relay::with_config(store.clone(), Arc::new(sink), config);
    let extra = Router::new().route("/admin/api/hello", routing::get(|| async { "hello" }));
    let surface = Surface::new()
        .store(store)
        .relay(relay.monitor())
        .with(extra)
        .backlog_interval(Duration::from_millis(100));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(surface.serve(listener, ServerLimits::default(), async {
        let _ = stopped.await;
    }));

    // Not started yet: live (it cannot be wedged), not ready.
    let (status, _, body) = get(format!("{base}/health/live")).await;
    assert_eq!(status, 200, "{body}");
    let (status, ct, body) = get(format!("{base}/health/ready")).await;
    assert_eq!(
        (status, ct.as_str()),
        (503, "application/problem+json"),
        "{body}"
    );
    assert_eq!(body["database"], "ok", "{body}");

    let text = reqwest::get(format!("{base}/admin/api/hello"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text, "hello");
    let (status, ct, body) = get(format!("{base}/admin/api/nothing")).await;
    assert_eq!(
        (status, ct.as_str()),
        (404, "application/problem+json"),
        "{body}"
    );

    // Drained and stopped: neither live nor ready.
    let monitor = relay.monitor();
    relay.run(std::future::pending()).await;
    assert_eq!(monitor.state(), RelayState::Stopped);
    for check in ["live", "ready"] {
        let (status, _, body) = get(format!("{base}/health/{check}")).await;
        assert_eq!(status, 503, "{check}: {body}");
        assert_eq!(body["relays"][0]["state"], "stopped", "{body}");
    }
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
