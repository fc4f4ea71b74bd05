//! `outbox demo` end to end through HTTP: the real binary, real SQLite and PostgreSQL, the
//! simulated gateway as its own process, workers killed with SIGKILL.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn pg_url() -> String {
    std::env::var("OUTBOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A demo process; killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Demo {
    dir: tempfile::TempDir,
    database_url: String,
    schema: Option<String>,
}

impl Demo {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database_url = format!("sqlite://{}", dir.path().join("demo.db").display());
        Self {
            dir,
            database_url,
            schema: None,
        }
    }

    fn postgres() -> Self {
        let schema = format!("cli_{}", uuid::Uuid::now_v7().simple());
        Self {
            dir: tempfile::tempdir().unwrap(),
            database_url: pg_url(),
            schema: Some(schema),
        }
    }

    fn mail_dir(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    /// Starts `outbox demo` with `args`; returns the process and the first URL it printed.
    fn start(&self, args: &[&str]) -> (Proc, Option<String>) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox"));
        cmd.arg("demo")
            .args([
                "--listen",
                "127.0.0.1:0",
                "--poll-interval",
                "100ms",
                "--lease",
                "2s",
            ])
            .arg("--mail-dir")
            .arg(self.mail_dir())
            .args(args)
            .env("OUTBOX_DATABASE_URL", &self.database_url)
            .env("OUTBOX_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(s) = &self.schema {
            cmd.env("OUTBOX_SCHEMA", s);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut url = None;
        // The banner ends with "Ctrl-C stops." once every part is serving.
        for line in lines.by_ref() {
            let line = line.unwrap();
            if url.is_none() {
                url = line
                    .split_whitespace()
                    .find(|w| w.starts_with("http://"))
                    .map(str::to_owned);
            }
            if line.starts_with("Ctrl-C stops.") {
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        (Proc(child), url)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(schema) = &self.schema {
            let _ = Command::new("psql")
                .args([
                    &pg_url(),
                    "-qc",
                    &format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
                ])
                .output();
        }
    }
}

fn purchase(n: usize) -> Value {
    json!({"token_card": format!("tok_{n}"), "amount": format!("{}.{:02}", 1 + n % 90, n % 100),
           "currency": "EUR", "card_holder_email": format!("buyer{n}@example.com"), "card_holder_name": format!("Buyer {n}")})
}

async fn buy(http: &reqwest::Client, api: &str, count: usize) -> Vec<String> {
    let posts = (0..count).map(|n| async move {
        let resp = http
            .post(format!("{api}/api/payments"))
            .json(&purchase(n))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        resp.json::<Value>().await.unwrap()["payment_id"]
            .as_str()
            .unwrap()
            .to_owned()
    });
    futures::future::join_all(posts).await
}

async fn statuses(http: &reqwest::Client, api: &str, ids: &[String]) -> HashMap<String, Value> {
    let gets = ids.iter().map(|id| async move {
        let p: Value = http
            .get(format!("{api}/api/payments/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (id.clone(), p)
    });
    futures::future::join_all(gets).await.into_iter().collect()
}

/// Polls the API until no payment is pending (the worker is another process).
async fn wait_settled(http: &reqwest::Client, api: &str, ids: &[String]) -> HashMap<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let all = statuses(http, api, ids).await;
        if all.values().all(|p| p["status"] != "pending") {
            return all;
        }
        assert!(Instant::now() < deadline, "payments still pending");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn count_eml(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "eml"))
            })
            .count()
        })
        .unwrap_or(0)
}

/// Every payment is paid (exactly one charge) or rejected (none), with exactly one e-mail.
async fn check_ledger_and_mail(
    http: &reqwest::Client,
    gateway: &str,
    mail: &Path,
    settled: &HashMap<String, Value>,
) {
    // E-mails follow the settlement as events of their own: wait for them to be delivered.
    let deadline = Instant::now() + Duration::from_secs(120);
    while count_eml(mail) < settled.len() {
        assert!(Instant::now() < deadline, "e-mails missing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ledger: Vec<Value> = http
        .get(format!("{gateway}/charges"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut charges: HashMap<String, usize> = HashMap::new();
    for c in &ledger {
        *charges
            .entry(c["idempotency_key"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let mails: HashSet<String> = std::fs::read_dir(mail)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".eml"))
        .collect();
    let (mut paid, mut rejected) = (0, 0);
    for (id, p) in settled {
        let status = p["status"].as_str().unwrap();
        let want_charges = match status {
            "paid" => {
                paid += 1;
                1
            }
            "rejected" => {
                rejected += 1;
                0
            }
            other => panic!("payment {id} ended {other}"),
        };
        assert_eq!(
            charges.get(id).copied().unwrap_or(0),
            want_charges,
            "payment {id} ({status})"
        );
        assert!(
            mails.contains(&format!("{id}-payment.{status}.eml")),
            "no e-mail for {id}"
        );
        assert!((1..=2).contains(&p["attempts"].as_i64().unwrap()), "{p}");
    }
    assert_eq!(ledger.len(), paid, "charges for payments that are not paid");
    assert_eq!(
        mails.len(),
        settled.len(),
        "e-mails that belong to no payment or duplicates"
    );
    assert!(
        paid > 0 && rejected > 0,
        "expected both outcomes at a 50% decline rate ({paid} paid, {rejected} rejected)"
    );
}

async fn concurrent_purchases(demo: Demo) {
    let (_gw, gateway) = demo.start(&[
        "--role",
        "gateway",
        "--gateway-latency",
        "0-5",
        "--decline-rate",
        "0.5",
    ]);
    let gateway = gateway.unwrap();
    let (_app, api) = demo.start(&[
        "--role",
        "all",
        "--gateway-url",
        &gateway,
        "--max-declines",
        "2",
    ]);
    let api = api.unwrap();
    let http = reqwest::Client::new();
    let ids = buy(&http, &api, 500).await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 500);
    let settled = wait_settled(&http, &api, &ids).await;
    check_ledger_and_mail(&http, &gateway, &demo.mail_dir(), &settled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_purchases_settle_once_on_sqlite() {
    concurrent_purchases(Demo::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_purchases_settle_once_on_postgres() {
    concurrent_purchases(Demo::postgres()).await;
}

/// Two workers at once, one of them killed with SIGKILL mid-run and replaced: nothing is lost
/// and nothing is charged twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_or_doubled_lose_nothing_and_charge_once() {
    let demo = Demo::postgres();
    let (_gw, gateway) = demo.start(&[
        "--role",
        "gateway",
        "--gateway-latency",
        "5-20",
        "--decline-rate",
        "0.5",
    ]);
    let gateway = gateway.unwrap();
    let (_api, api) = demo.start(&["--role", "api"]);
    let api = api.unwrap();
    let worker_args = [
        "--role",
        "worker",
        "--gateway-url",
        &gateway,
        "--max-declines",
        "2",
    ];
    let (mut first, _) = demo.start(&worker_args);
    let (_second, _) = demo.start(&worker_args);
    let http = reqwest::Client::new();
    let ids = buy(&http, &api, 300).await;

    // Kill the first worker once some payments are settled, while others are in flight.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = statuses(&http, &api, &ids)
            .await
            .values()
            .filter(|p| p["status"] != "pending")
            .count();
        if done >= 30 {
            assert!(done < ids.len(), "all settled before the kill");
            break;
        }
        assert!(Instant::now() < deadline, "workers made no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let (_third, _) = demo.start(&worker_args);

    let settled = wait_settled(&http, &api, &ids).await;
    check_ledger_and_mail(&http, &gateway, &demo.mail_dir(), &settled).await;
}
