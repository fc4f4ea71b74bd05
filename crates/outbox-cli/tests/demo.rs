//! `outbox demo` end to end through HTTP: the real binary, real SQLite, PostgreSQL and MariaDB, the
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
    /// The MySQL database the demo has to itself.
    database: Option<String>,
}

fn mysql_server() -> String {
    std::env::var("OUTBOX_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

impl Demo {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database_url = format!("sqlite://{}", dir.path().join("demo.db").display());
        Self {
            dir,
            database_url,
            schema: None,
            database: None,
        }
    }

    /// A database of its own on the MariaDB server, created with the `mysql` client.
    fn mysql() -> Self {
        let name = format!("cli_{}", uuid::Uuid::now_v7().simple());
        mysql_client(&format!("CREATE DATABASE {name}"));
        Self {
            dir: tempfile::tempdir().unwrap(),
            database_url: format!("{}/{name}", mysql_server()),
            schema: None,
            database: Some(name),
        }
    }

    fn postgres() -> Self {
        let schema = format!("cli_{}", uuid::Uuid::now_v7().simple());
        Self {
            dir: tempfile::tempdir().unwrap(),
            database_url: pg_url(),
            schema: Some(schema),
            database: None,
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
        if let Some(name) = &self.database {
            mysql_client(&format!("DROP DATABASE IF EXISTS {name}"));
        }
    }
}

/// Runs one statement with the `mysql` client as root on the test server.
fn mysql_client(sql: &str) {
    let server = mysql_server();
    let host_port = server.rsplit('@').next().unwrap_or("127.0.0.1:3306");
    let (host, port) = host_port.split_once(':').unwrap_or((host_port, "3306"));
    let out = Command::new("mysql")
        .args(["-h", host, "-P", port, "-u", "root", "-e", sql])
        .output()
        .expect("run the mysql client");
    assert!(out.status.success(), "{sql}: {out:?}");
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
async fn five_hundred_concurrent_purchases_settle_once_on_mysql() {
    concurrent_purchases(Demo::mysql()).await;
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

/// The broker's names for one test, and their removal afterwards.
enum Broker {
    Nats { prefix: String },
    Amqp { exchange: String },
}

impl Broker {
    fn nats() -> Self {
        Broker::Nats {
            prefix: format!("demo{}.", uuid::Uuid::now_v7().simple()),
        }
    }

    fn amqp() -> Self {
        Broker::Amqp {
            exchange: format!("demo{}", uuid::Uuid::now_v7().simple()),
        }
    }

    fn url(&self) -> String {
        match self {
            Broker::Nats { prefix } => format!("nats://127.0.0.1:4222?prefix={prefix}"),
            Broker::Amqp { exchange } => {
                format!("amqp://guest:guest@127.0.0.1:5672/%2f?exchange={exchange}")
            }
        }
    }

    /// Removes what the worker and the relay created (the worker's names are documented in
    /// `outbox_payments::broker`).
    async fn remove(&self) {
        match self {
            Broker::Nats { prefix } => {
                let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
                let stream = format!("OUTBOX_{}PAYMENTS", prefix.to_uppercase().replace('.', "_"));
                async_nats::jetstream::new(client)
                    .delete_stream(&stream)
                    .await
                    .unwrap();
            }
            Broker::Amqp { exchange } => {
                use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
                let uri = "amqp://guest:guest@127.0.0.1:5672/%2f";
                let conn = lapin::Connection::connect(uri, Default::default())
                    .await
                    .unwrap();
                let ch = conn.create_channel().await.unwrap();
                let queue = format!("{exchange}.payments-worker");
                ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .unwrap();
                ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await
                    .unwrap();
            }
        }
    }
}

/// API, relay and two workers as separate processes, the events through a real broker: every
/// payment settles, is charged once at most and e-mailed once.
async fn purchases_through_a_broker(demo: Demo, broker: Broker) {
    let url = broker.url();
    let (gw, gateway) = demo.start(&[
        "--role",
        "gateway",
        "--gateway-latency",
        "0-5",
        "--decline-rate",
        "0.5",
    ]);
    let gateway = gateway.unwrap();
    let worker_args = [
        "--role",
        "worker",
        "--gateway-url",
        &gateway,
        "--max-declines",
        "2",
        "--broker",
        &url,
    ];
    // The workers first: they create the stream or queue the relay publishes to.
    let (mut first, _) = demo.start(&worker_args);
    let (second, _) = demo.start(&worker_args);
    let (relay, _) = demo.start(&["--role", "relay", "--broker", &url]);
    let (api_proc, api) = demo.start(&["--role", "api"]);
    let api = api.unwrap();
    let http = reqwest::Client::new();
    let ids = buy(&http, &api, 200).await;

    // A worker killed mid-run: its unacked event is redelivered to the others.
    wait_until_some_settled(&http, &api, &ids, 20).await;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let (third, _) = demo.start(&worker_args);

    let settled = wait_settled(&http, &api, &ids).await;
    check_ledger_and_mail(&http, &gateway, &demo.mail_dir(), &settled).await;
    // Each payment's events went through the inbox: its creation (and any retries) and its
    // settlement.
    assert!(demo.inbox_rows().await >= 2 * ids.len() as i64);
    drop((second, third, relay, api_proc, gw));
    broker.remove().await;
}

async fn wait_until_some_settled(http: &reqwest::Client, api: &str, ids: &[String], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = statuses(http, api, ids)
            .await
            .values()
            .filter(|p| p["status"] != "pending")
            .count();
        if done >= n {
            return;
        }
        assert!(Instant::now() < deadline, "workers made no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Demo {
    /// Messages the broker-fed worker recorded in its inbox.
    async fn inbox_rows(&self) -> i64 {
        let sql = "SELECT count(*) FROM {s}outbox_inbox WHERE consumer = 'payments-worker'";
        match &self.schema {
            Some(schema) => {
                let pool = sqlx::PgPool::connect(&self.database_url).await.unwrap();
                let sql = sql.replace("{s}", &format!("{schema}."));
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
            None => {
                let pool = sqlx::SqlitePool::connect(&self.database_url).await.unwrap();
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql.replace("{s}", "")))
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_through_nats_settle_once_on_postgres() {
    purchases_through_a_broker(Demo::postgres(), Broker::nats()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_through_rabbitmq_settle_once_on_sqlite() {
    purchases_through_a_broker(Demo::sqlite(), Broker::amqp()).await;
}

#[test]
fn the_relay_role_needs_a_broker() {
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["demo", "--role", "relay"])
        .env("OUTBOX_DATABASE_URL", "sqlite::memory:")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--broker"), "{stderr}");
}

#[test]
fn an_unreachable_broker_fails_the_worker_at_start() {
    let demo = Demo::sqlite();
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "demo",
            "--role",
            "worker",
            "--gateway-url",
            "http://127.0.0.1:1",
        ])
        .args(["--broker", "amqp://guest:guest@127.0.0.1:1/%2f"])
        .env("OUTBOX_DATABASE_URL", &demo.database_url)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("Ctrl-C stops."), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
}
