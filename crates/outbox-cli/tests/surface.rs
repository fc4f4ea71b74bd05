//! `outbox relay --listen`: health, readiness and metrics of the real binary, on real SQLite
//! and PostgreSQL (cut off through a proxy).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox_testkit::eventually;
use outbox_testkit::proxy::Proxy;
use serde_json::Value;

/// A relay process, killed when dropped.
struct Relay {
    child: Child,
    base: String,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn outbox(database_url: &str, schema: Option<&str>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
    c.env("OUTBOX_DATABASE_URL", database_url)
        .env("OUTBOX_LOG", "warn")
        .env_remove("OUTBOX_SINK")
        .env_remove("OUTBOX_LISTEN")
        .env_remove("OUTBOX_ADMIN_TOKEN")
        .stdin(Stdio::null());
    if let Some(s) = schema {
        c.env("OUTBOX_SCHEMA", s);
    }
    c
}

fn enqueue(database_url: &str, schema: Option<&str>, topic: &str, n: usize) {
    let lines: String = (0..n)
        .map(|i| format!("{{\"topic\":\"{topic}\",\"type\":\"t\",\"payload\":{{\"n\":{i}}}}}\n"))
        .collect();
    let path = std::env::temp_dir().join(format!("surface-{}.jsonl", uuid::Uuid::now_v7()));
    std::fs::write(&path, lines).unwrap();
    let out = outbox(database_url, schema)
        .args(["enqueue", "--file"])
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Starts `outbox relay ARGS --listen 127.0.0.1:0` and reads the base URL from the first line.
fn relay(database_url: &str, schema: Option<&str>, args: &[&str]) -> Relay {
    let relay = spawn_listening(outbox(database_url, schema), args);
    assert!(
        relay.base.starts_with("http://127.0.0.1:"),
        "{}",
        relay.base
    );
    relay
}

async fn get(url: &str) -> (u16, String, String) {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, ct, r.text().await.unwrap())
}

/// The value of the series named exactly `series` (with its labels, as rendered).
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (name, v) = l.rsplit_once(' ')?;
        (name == series).then(|| v.parse().ok())?
    })
}

async fn metrics(base: &str) -> String {
    let (status, ct, body) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/plain"), "{ct}");
    body
}

fn sqlite() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("outbox.db").display());
    (dir, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_relay_reports_its_deliveries_backlog_and_health() {
    let (_dir, url) = sqlite();
    enqueue(&url, None, "payments", 30);
    enqueue(&url, None, "mail", 12);
    let relay = relay(&url, None, &["--sink", "null:"]);
    let base = relay.base.clone();

    let delivered = |m: &str, topic: &str| {
        value(
            m,
            &format!("outbox_messages_delivered_total{{topic=\"{topic}\",sink=\"null\"}}"),
        )
    };
    eventually(
        "every message delivered",
        Duration::from_secs(30),
        || async {
            let m = metrics(&base).await;
            delivered(&m, "payments") == Some(30.0) && delivered(&m, "mail") == Some(12.0)
        },
    )
    .await;
    // The backlog gauges follow on their timer: nothing pending is left, nothing is old.
    eventually("the backlog refreshed", Duration::from_secs(30), || async {
        let m = metrics(&base).await;
        let pending = |t: &str| {
            value(
                &m,
                &format!("outbox_backlog_messages{{topic=\"{t}\",status=\"pending\"}}"),
            )
        };
        pending("payments") == Some(0.0) && pending("mail") == Some(0.0)
            || (pending("payments").is_none() && pending("mail").is_none())
    })
    .await;

    let m = metrics(&base).await;
    assert_eq!(value(&m, "outbox_database_up"), Some(1.0), "{m}");
    assert_eq!(
        value(&m, "outbox_delivery_lag_seconds_count{topic=\"payments\"}"),
        Some(30.0),
        "{m}"
    );
    for series in [
        "outbox_claim_duration_seconds_count",
        "outbox_settle_duration_seconds_count",
        "outbox_publish_duration_seconds_count{sink=\"null\"}",
    ] {
        assert!(value(&m, series).is_some_and(|n| n >= 1.0), "{series}: {m}");
    }
    // Nothing failed, so no failure series exists yet.
    assert!(!m.contains("outbox_messages_dead_total{"), "{m}");
    assert!(
        m.contains("# TYPE outbox_delivery_lag_seconds histogram"),
        "{m}"
    );
    assert!(m.contains("process_resident_memory_bytes"), "{m}");
    let states: f64 = ["starting", "working", "idle", "database_down", "stopped"]
        .iter()
        .filter_map(|s| value(&m, &format!("outbox_relay_state{{state=\"{s}\"}}")))
        .sum();
    assert_eq!(states, 1.0, "exactly one state at a time: {m}");

    let (status, _, body) = get(&format!("{base}/health/live")).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = get(&format!("{base}/health/ready")).await;
    assert_eq!(status, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["database"], "ok");
    assert_eq!(ready["open_circuits"], serde_json::json!([]));

    let (status, ct, body) = get(&format!("{base}/no/such/path")).await;
    assert_eq!(status, 404);
    assert_eq!(ct, "application/problem+json");
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["status"], 404);
    let r = reqwest::Client::new()
        .delete(format!("{base}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_deliveries_are_counted_by_kind_and_dead_letters_by_topic() {
    let (_dir, url) = sqlite();
    enqueue(&url, None, "hooks", 7);
    // Nothing listens on port 1: each delivery fails as transient, and one attempt is all.
    let relay = relay(
        &url,
        None,
        &["--sink", "http://127.0.0.1:1/", "--max-attempts", "1"],
    );
    let base = relay.base.clone();
    let labels = "topic=\"hooks\",sink=\"webhook\"";
    eventually("every message dead", Duration::from_secs(30), || async {
        let m = metrics(&base).await;
        value(&m, &format!("outbox_messages_dead_total{{{labels}}}")) == Some(7.0)
    })
    .await;
    let m = metrics(&base).await;
    assert_eq!(
        value(
            &m,
            &format!("outbox_messages_failed_total{{{labels},kind=\"transient\"}}")
        ),
        Some(7.0),
        "{m}"
    );
    assert_eq!(
        value(&m, &format!("outbox_messages_delivered_total{{{labels}}}")),
        None,
        "{m}"
    );
    eventually(
        "the dead letters in the backlog",
        Duration::from_secs(30),
        || async {
            let m = metrics(&base).await;
            value(
                &m,
                "outbox_backlog_messages{topic=\"hooks\",status=\"dead\"}",
            ) == Some(7.0)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_while_the_database_is_cut_off_and_liveness_does_not() {
    let pg = std::env::var("OUTBOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let upstream = pg
        .split('@')
        .nth(1)
        .and_then(|h| h.split('/').next())
        .unwrap()
        .to_owned();
    let proxy = Proxy::start(&upstream).await.unwrap();
    let through = pg.replacen(&upstream, &proxy.addr(), 1);
    let schema = format!("cli_{}", uuid::Uuid::now_v7().simple());
    let relay = relay(&through, Some(&schema), &["--sink", "null:"]);
    let base = relay.base.clone();
    let ready = |base: String| async move { get(&format!("{base}/health/ready")).await };
    // Ready once migrated and running: cutting the database off during the migration
    // would test the start-up instead.
    eventually("ready", Duration::from_secs(30), || async {
        ready(base.clone()).await.0 == 200
    })
    .await;
    let m = metrics(&base).await;
    assert_eq!(
        value(&m, "outbox_relay_state{state=\"starting\"}"),
        Some(0.0),
        "{m}"
    );

    proxy.freeze();
    proxy.cut();
    eventually("not ready", Duration::from_secs(30), || async {
        let (status, ct, body) = ready(base.clone()).await;
        status == 503 && ct == "application/problem+json" && body.contains("\"database\":\"down\"")
    })
    .await;
    eventually(
        "the relay sees the database down",
        Duration::from_secs(60),
        || async {
            let m = metrics(&base).await;
            value(&m, "outbox_relay_state{state=\"database_down\"}") == Some(1.0)
        },
    )
    .await;
    let (status, _, body) = get(&format!("{base}/health/live")).await;
    assert_eq!(
        status, 200,
        "a relay waiting for its database is live: {body}"
    );

    proxy.heal();
    eventually("ready again", Duration::from_secs(60), || async {
        ready(base.clone()).await.0 == 200
    })
    .await;
    drop(relay);
    let _ = Command::new("psql")
        .args([
            &pg,
            "-qc",
            &format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
        ])
        .output();
}

/// `outbox demo` (ARGS) with its own SQLite file and mail folder; the first URL it prints.
fn demo(dir: &std::path::Path, args: &[&str]) -> Relay {
    let url = format!("sqlite://{}", dir.join("demo.db").display());
    let mut child = outbox(&url, None)
        .arg("demo")
        .args(["--listen", "127.0.0.1:0", "--poll-interval", "100ms"])
        .args(["--gateway-latency", "0-5", "--decline-rate", "0"])
        .arg("--mail-dir")
        .arg(dir.join("mail"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut base = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if base.is_none() {
            base = line
                .split_whitespace()
                .find(|w| w.starts_with("http://"))
                .map(str::to_owned);
        }
        if line.starts_with("Ctrl-C stops.") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    Relay {
        child,
        base: base.expect("a URL in the banner"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_its_workers_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let app = demo(dir.path(), &[]);
    let r = reqwest::Client::new()
        .post(format!("{}/api/payments", app.base))
        .json(&serde_json::json!({
            "token_card": "tok_visa", "amount": "12.50", "currency": "EUR",
            "card_holder_email": "ana@example.com", "card_holder_name": "Ana"
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    // payment.created, then payment.paid: both through the in-process worker's relay.
    eventually(
        "the worker's deliveries in the API's metrics",
        Duration::from_secs(30),
        || async {
            let m = metrics(&app.base).await;
            value(
                &m,
                "outbox_messages_delivered_total{topic=\"payments\",sink=\"handler\"}",
            ) == Some(2.0)
        },
    )
    .await;
    let (status, _, body) = get(&format!("{}/health/ready", app.base)).await;
    assert_eq!(status, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["relays"].as_array().map(Vec::len), Some(1), "{body}");
    drop(app);

    // A worker on its own serves health and metrics at the URL it prints first.
    let (gateway_dir, worker_dir) = (tempfile::tempdir().unwrap(), dir);
    let gateway = demo(gateway_dir.path(), &["--role", "gateway"]);
    let worker = demo(
        worker_dir.path(),
        &["--role", "worker", "--gateway-url", &gateway.base],
    );
    let (status, _, body) = get(&format!("{}/health/live", worker.base)).await;
    assert_eq!(status, 200, "{body}");
    let m = metrics(&worker.base).await;
    assert!(m.contains("outbox_relay_state{state="), "{m}");
    let (status, _, _) = get(&format!("{}/api/payments", worker.base)).await;
    assert_eq!(status, 404, "a worker serves no API");
}

/// The admin API and the dashboard are part of the relay's surface: open on loopback without a
/// token, behind the token when one is set, and refused on a public address without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_serves_the_admin_api_and_dashboard_behind_its_token() {
    let (_dir, url) = sqlite();
    enqueue(&url, None, "orders", 3);
    let open = relay(&url, None, &["--sink", "null:"]);
    let (status, ct, page) = get(&format!("{}/admin/", open.base)).await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(page.contains("<html"), "{page}");
    let base = open.base.clone();
    eventually(
        "the admin status counts the drained outbox",
        Duration::from_secs(20),
        || {
            let base = base.clone();
            async move {
                let (status, _, body) = get(&format!("{base}/admin/api/status")).await;
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                status == 200 && v["pending"] == 0 && v["relay"]["delivered"] == 3
            }
        },
    )
    .await;
    drop(open);

    let guarded = {
        let mut c = outbox(&url, None);
        c.env("OUTBOX_ADMIN_TOKEN", "s3cret-admin-token");
        spawn_listening(c, &["--sink", "null:"])
    };
    let (status, ct, body) = get(&format!("{}/admin/api/status", guarded.base)).await;
    assert_eq!(status, 401, "{body}");
    assert!(ct.starts_with("application/problem+json"), "{ct}");
    let authorized = reqwest::Client::new()
        .get(format!("{}/admin/api/status", guarded.base))
        .bearer_auth("s3cret-admin-token")
        .send()
        .await
        .unwrap();
    assert_eq!(authorized.status().as_u16(), 200);
    // Health and metrics stay open.
    assert_eq!(get(&format!("{}/health/live", guarded.base)).await.0, 200);
    drop(guarded);

    let refused = outbox(&url, None)
        .args(["relay", "--sink", "null:", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("OUTBOX_ADMIN_TOKEN"), "{err}");
}

/// `relay` with `cmd`'s environment, listening on a free loopback port.
fn spawn_listening(mut cmd: Command, args: &[&str]) -> Relay {
    let mut child = cmd
        .arg("relay")
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--poll-interval", "100ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a first line").unwrap();
    std::thread::spawn(move || lines.for_each(drop));
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in the first line: {first}"))
        .to_owned();
    Relay { child, base }
}
