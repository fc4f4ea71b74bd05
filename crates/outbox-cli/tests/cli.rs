//! The real `outbox` binary against real PostgreSQL, MariaDB and SQLite.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn pg_url() -> String {
    std::env::var("OUTBOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn mysql_url() -> String {
    std::env::var("OUTBOX_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// Runs one statement with the `mysql` client, as root on the test server.
fn mysql_client(sql: &str) -> Output {
    let url = mysql_url();
    let host_port = url.rsplit('@').next().unwrap_or("127.0.0.1:3306");
    let (host, port) = host_port.split_once(':').unwrap_or((host_port, "3306"));
    Command::new("mysql")
        .args(["-h", host, "-P", port, "-u", "root", "-e", sql])
        .output()
        .expect("run the mysql client")
}

/// An outbox of its own: a fresh PostgreSQL schema, MySQL database or SQLite file.
struct Db {
    url: String,
    schema: Option<String>,
    database: Option<String>,
    dir: tempfile::TempDir,
}

impl Db {
    fn postgres() -> Self {
        Self {
            url: pg_url(),
            schema: Some(format!("cli_{}", uuid::Uuid::now_v7().simple())),
            database: None,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn mysql() -> Self {
        let name = format!("cli_{}", uuid::Uuid::now_v7().simple());
        let made = mysql_client(&format!("CREATE DATABASE {name}"));
        assert!(made.status.success(), "CREATE DATABASE {name}: {made:?}");
        Self {
            url: format!("{}/{name}", mysql_url()),
            schema: None,
            database: Some(name),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            url: format!("sqlite://{}", dir.path().join("outbox.db").display()),
            schema: None,
            database: None,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
        c.args(args)
            .env("OUTBOX_DATABASE_URL", &self.url)
            .env("OUTBOX_LOG", "warn")
            .env_remove("OUTBOX_SINK")
            .stdin(Stdio::null());
        if let Some(s) = &self.schema {
            c.env("OUTBOX_SCHEMA", s);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run outbox")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "outbox {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).unwrap()
    }

    /// Enqueues `n` keyed messages from a file; returns their ids in order.
    fn enqueue_many(&self, n: usize, keys: usize) -> Vec<String> {
        let file = self.path("in.jsonl");
        let lines: String = (0..n)
            .map(|i| format!("{{\"topic\":\"orders\",\"type\":\"order.created\",\"key\":\"k{}\",\"payload\":{{\"n\":{i}}}}}\n", i % keys))
            .collect();
        std::fs::write(&file, lines).unwrap();
        self.ok(&["enqueue", "--file", file.to_str().unwrap()])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Db {
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
            let _ = mysql_client(&format!("DROP DATABASE IF EXISTS {name}"));
        }
    }
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits for a condition that an external process brings about, failing after a generous bound.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn stderr_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(
        err.lines().count(),
        1,
        "expected one line on stderr, got: {err}"
    );
    err
}

fn relay_to_file(db: &Db, sink: &Path, extra: &[&str]) -> Child {
    let sink = format!("file:{}", sink.display());
    let mut args = vec!["relay", "--sink", &sink];
    args.extend_from_slice(extra);
    db.cmd(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn enqueue_relay_and_check_order(db: &Db) {
    let ids = db.enqueue_many(500, 7);
    assert_eq!(ids.len(), 500);
    assert_eq!(db.status()["pending"], 500);
    let sink = db.path("out.jsonl");
    let mut relay = relay_to_file(db, &sink, &["--exit-when-idle", "--batch-size", "50"]);
    assert!(relay.wait().unwrap().success());
    let out = lines(&sink);
    let got: Vec<&str> = out.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(got.len(), 500);
    assert_eq!(got.iter().collect::<HashSet<_>>().len(), 500);
    for k in 0..7 {
        let key = format!("k{k}");
        let want: Vec<&str> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 7 == k)
            .map(|(_, id)| id.as_str())
            .collect();
        let seen: Vec<&str> = out
            .iter()
            .filter(|l| l["key"] == key.as_str())
            .map(|l| l["id"].as_str().unwrap())
            .collect();
        assert_eq!(seen, want, "key {key} out of order");
    }
    let first = &out[0];
    assert_eq!(first["topic"], "orders");
    assert_eq!(first["type"], "order.created");
    assert_eq!(first["attempt"], 1);
    assert!(first["payload"]["n"].is_number() && first["headers"].is_object());
    let s = db.status();
    assert_eq!(
        (s["pending"].as_i64(), s["in_flight"].as_i64()),
        (Some(0), Some(0))
    );
}

#[test]
fn enqueue_and_relay_to_a_file_on_postgres() {
    enqueue_relay_and_check_order(&Db::postgres());
}

#[test]
fn enqueue_and_relay_to_a_file_on_mysql() {
    enqueue_relay_and_check_order(&Db::mysql());
}

#[test]
fn enqueue_and_relay_to_a_file_on_sqlite() {
    enqueue_relay_and_check_order(&Db::sqlite());
}

/// SIGKILL mid-stream, restart: every message reaches the sink (duplicates allowed).
fn killed_relay_loses_nothing(db: &Db, extra: &[&str]) {
    let ids = db.enqueue_many(8_000, 50);
    let sink = db.path("out.jsonl");
    let mut args = vec![
        "--batch-size",
        "10",
        "--lease",
        "1s",
        "--poll-interval",
        "100ms",
    ];
    args.extend_from_slice(extra);
    let mut first = relay_to_file(db, &sink, &args);
    wait_until("the first relay to deliver some messages", || {
        lines(&sink).len() >= 300
    });
    first.kill().unwrap();
    first.wait().unwrap();
    let delivered_before = lines(&sink).len();
    assert!(
        delivered_before < ids.len(),
        "the relay finished before it could be killed"
    );

    let mut second = relay_to_file(db, &sink, &args);
    wait_until("the restarted relay to drain the outbox", || {
        let s = db.status();
        s["pending"] == 0 && s["in_flight"] == 0
    });
    signal(&second, "-TERM");
    assert!(
        second.wait().unwrap().success(),
        "relay did not exit cleanly on SIGTERM"
    );
    let seen: HashSet<String> = lines(&sink)
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .collect();
    let missing = ids.iter().filter(|id| !seen.contains(*id)).count();
    assert_eq!(missing, 0, "{missing} messages lost after SIGKILL");
}

#[test]
fn killed_relay_loses_nothing_on_postgres() {
    killed_relay_loses_nothing(&Db::postgres(), &[]);
}

#[test]
fn killed_relay_loses_nothing_on_postgres_with_leases() {
    killed_relay_loses_nothing(&Db::postgres(), &["--claim", "lease"]);
}

#[test]
fn killed_relay_loses_nothing_on_mysql() {
    killed_relay_loses_nothing(&Db::mysql(), &[]);
}

#[test]
fn killed_relay_loses_nothing_on_sqlite() {
    killed_relay_loses_nothing(&Db::sqlite(), &[]);
}

#[test]
fn undeliverable_messages_go_dead_and_can_be_retried_and_purged() {
    let db = Db::sqlite();
    let id = db.ok(&[
        "enqueue",
        "--topic",
        "mail",
        "--type",
        "mail.send",
        "--key",
        "u1",
        "--payload",
        "{\"to\":\"a@b.c\"}",
    ]);
    let id = id.trim();
    // /dev/full accepts the open and fails every write: a transient error each time.
    let mut relay = db
        .cmd(&[
            "relay",
            "--sink",
            "file:/dev/full",
            "--max-attempts",
            "2",
            "--retry-base",
            "0",
            "--exit-when-idle",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(relay.wait().unwrap().success());
    let dead: Value = serde_json::from_str(&db.ok(&["dead", "list", "--json"])).unwrap();
    let entry = &dead[0];
    assert_eq!(entry["id"], id);
    assert_eq!(entry["attempts"], 2);
    assert_eq!(entry["key"], "u1");
    assert_eq!(entry["payload"]["to"], "a@b.c");
    assert!(
        entry["last_error"].as_str().unwrap().contains("/dev/full"),
        "{entry}"
    );
    assert_eq!(db.status()["dead"], 1);
    let listed = |args: &[&str]| -> usize {
        let out = db.ok(&[&["dead", "list", "--json"], args].concat());
        serde_json::from_str::<Vec<Value>>(&out).unwrap().len()
    };
    assert_eq!(listed(&["--topic", "mail", "--error", "DEV/FULL"]), 1);
    assert_eq!(listed(&["--type", "other"]), 0);
    assert_eq!(listed(&["--after", id]), 0);

    let out = db.run(&["dead", "retry", &uuid::Uuid::now_v7().to_string()]);
    assert!(!out.status.success(), "retrying an unknown id must fail");
    db.ok(&["dead", "retry", id]);
    assert_eq!(db.status()["pending"], 1);
    let sink = db.path("out.jsonl");
    assert!(
        relay_to_file(&db, &sink, &["--exit-when-idle"])
            .wait()
            .unwrap()
            .success()
    );
    assert_eq!(lines(&sink)[0]["id"], id);

    db.ok(&["enqueue", "--topic", "t", "--type", "e", "--payload", "1"]);
    let mut relay = db
        .cmd(&[
            "relay",
            "--sink",
            "file:/dev/full",
            "--max-attempts",
            "1",
            "--exit-when-idle",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(relay.wait().unwrap().success());
    assert_eq!(db.status()["dead"], 1);
    assert!(
        db.ok(&["dead", "purge", "--older-than", "1h"])
            .starts_with('0')
    );
    assert!(db.ok(&["dead", "purge"]).starts_with('1'));
    assert_eq!(db.status()["dead"], 0);
}

#[test]
fn a_bad_line_rejects_the_whole_file() {
    let db = Db::postgres();
    let file = db.path("bad.jsonl");
    std::fs::write(
        &file,
        "{\"topic\":\"t\",\"type\":\"e\",\"payload\":{}}\n{\"topic\":\"t\",\"type\":\"e\",\"payload\":{}}\nnot json\n",
    )
    .unwrap();
    let out = db.run(&["enqueue", "--file", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr_line(&out);
    assert!(err.contains("line 3"), "{err}");
    db.ok(&["migrate"]);
    assert_eq!(
        db.status()["pending"],
        0,
        "part of a rejected file was enqueued"
    );
}

/// A file is streamed, so a line is bounded: one over the cap is refused without being read
/// whole, and the lines before it are rolled back.
#[test]
fn a_line_over_the_cap_rejects_the_whole_file() {
    let db = Db::sqlite();
    let file = db.path("huge.jsonl");
    let ok = "{\"topic\":\"t\",\"type\":\"e\",\"payload\":{}}\n";
    let huge = format!(
        "{{\"topic\":\"t\",\"type\":\"e\",\"payload\":\"{}\"}}\n",
        "x".repeat(5 << 20)
    );
    std::fs::write(&file, format!("{ok}{huge}{ok}")).unwrap();
    let out = db.run(&["enqueue", "--file", file.to_str().unwrap()]);
    assert!(!out.status.success(), "a 5 MiB line was enqueued");
    let err = stderr_line(&out);
    assert!(
        err.contains("line 2") && err.contains("longer than"),
        "{err}"
    );
    assert_eq!(
        db.status()["pending"],
        0,
        "part of a rejected file was enqueued"
    );
}

/// Retrying a dead message after later messages of its key were delivered breaks the key's
/// order: the operator is told, with the count, before it happens.
#[test]
fn retrying_a_dead_message_behind_delivered_ones_warns() {
    let db = Db::postgres();
    let enqueue = |n: &str| {
        db.ok(&[
            "enqueue",
            "--topic",
            "t",
            "--type",
            "e",
            "--key",
            "k",
            "--payload",
            n,
        ])
    };
    enqueue("1");
    let failing = [
        "relay",
        "--sink",
        "file:/dev/full",
        "--max-attempts",
        "1",
        "--exit-when-idle",
    ];
    assert!(
        db.cmd(&failing)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(db.status()["dead"], 1);
    enqueue("2");
    let sink = db.path("out.jsonl");
    let mut relay = relay_to_file(&db, &sink, &["--exit-when-idle", "--retention", "1h"]);
    assert!(relay.wait().unwrap().success());
    assert_eq!(lines(&sink).len(), 1);

    let out = db.run(&["dead", "retry", "--all"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("key \"k\": 1 later message(s) were delivered"),
        "no order warning: {err}"
    );
}

#[test]
fn enqueue_reads_stdin() {
    let db = Db::sqlite();
    let mut child = db
        .cmd(&["enqueue", "--file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"topic\":\"a\",\"type\":\"x\",\"payload\":1}\n{\"topic\":\"b\",\"type\":\"y\",\"payload\":2,\"headers\":{\"h\":\"v\"}}\n")
        .unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    assert_eq!(db.status()["pending"], 2);
}

/// Arguments, extra environment, and what the error line must say.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn errors_are_one_readable_line_and_non_zero() {
    let db = Db::sqlite();
    let cases: &[Case] = &[
        (
            &["status"],
            &[("OUTBOX_DATABASE_URL", "oracle://x")],
            "unknown database URL scheme",
        ),
        (
            &["status"],
            &[("OUTBOX_DATABASE_URL", "nothing")],
            "no scheme",
        ),
        (
            &["status"],
            &[(
                "OUTBOX_DATABASE_URL",
                "postgres://postgres@127.0.0.1:1/test",
            )],
            "Connection refused",
        ),
        (
            &["status"],
            &[("OUTBOX_DATABASE_URL", "mysql://root@127.0.0.1:1/test")],
            "Connection refused",
        ),
        (
            &["status", "--schema", "s"],
            &[("OUTBOX_DATABASE_URL", "mysql://root@127.0.0.1/test")],
            "--schema applies to PostgreSQL only",
        ),
        (
            &[
                "enqueue",
                "--topic",
                "t",
                "--type",
                "e",
                "--payload",
                "{oops",
            ],
            &[],
            "--payload is not valid JSON",
        ),
        (
            &["enqueue", "--topic", "t", "--payload", "1"],
            &[],
            "--type",
        ),
        (
            &["enqueue", "--topic", "", "--type", "e", "--payload", "1"],
            &[],
            "topic must not be empty",
        ),
        (&["relay"], &[], "no sink"),
        (
            &["relay", "--sink", "gopher://x"],
            &[],
            "not supported by this build",
        ),
        (
            &["relay", "--sink", "null:", "--lease", "forever"],
            &[],
            "forever",
        ),
        (&["dead", "retry"], &[], "required"),
        (
            &["relay", "--sink", "null:", "--claim", "transaction"],
            &[],
            "needs PostgreSQL",
        ),
        (
            &["relay", "--sink", "null:", "--claim", "sometimes"],
            &[],
            "invalid value",
        ),
        (
            &["relay", "--sink", "null:", "--capture", "wal"],
            &[],
            "--capture wal needs PostgreSQL",
        ),
        (
            &[
                "enqueue",
                "--topic",
                "t",
                "--type",
                "e",
                "--payload",
                "1",
                "--wal-message",
            ],
            &[],
            "--wal-message needs PostgreSQL",
        ),
        (
            &[
                "enqueue",
                "--topic",
                "t",
                "--type",
                "e",
                "--payload",
                "1",
                "--captured-row",
            ],
            &[],
            "--captured-row needs PostgreSQL",
        ),
        (
            &[
                "enqueue",
                "--topic",
                "t",
                "--type",
                "e",
                "--payload",
                "1",
                "--captured-row",
                "--wal-message",
            ],
            &[],
            "cannot be used with",
        ),
        (&["capture", "drop-slot"], &[], "needs PostgreSQL"),
        (&["migrate", "--slot", "s"], &[], "--capture"),
    ];
    for (args, env, expected) in cases {
        let mut cmd = db.cmd(args);
        for (k, v) in *env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr_line(&out);
        assert!(
            err.contains(expected),
            "{args:?}: {err:?} lacks {expected:?}"
        );
    }
}

/// A cause that the message above it already quotes is not printed again: libraries often
/// put their source's text in their own message and also hand out the source.
#[test]
fn each_cause_of_an_error_is_printed_once() {
    let db = Db::sqlite();
    let out = db
        .cmd(&["status"])
        .env("OUTBOX_DATABASE_URL", "sqlite:///no/such/dir/x.db")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_line(&out);
    assert!(err.contains("/no/such/dir/x.db"), "{err}");
    assert_eq!(
        err.matches("unable to open database file").count(),
        1,
        "{err}"
    );
}

/// A relay told not to migrate refuses, at start and in one line, a schema older than it needs,
/// instead of failing every claim against functions that are not there yet.
#[test]
fn a_relay_without_migrations_refuses_an_older_schema_at_start() {
    let db = Db::postgres();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let config = outbox_postgres::PgConfig::default().schema(db.schema.clone().unwrap());
        let store = outbox_postgres::PgStore::connect(&db.url, config)
            .await
            .unwrap();
        store.migrate_to(9).await.unwrap();
    });
    let mut child = db
        .cmd(&["relay", "--sink", "null:", "--no-migrate"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the relay started on an old schema: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    assert!(!status.success());
    let err = stderr_line(&out);
    assert!(
        err.contains("version 9") && err.contains("outbox migrate"),
        "{err}"
    );
    // Migrated, the same command starts.
    assert!(db.run(&["migrate"]).status.success());
}

#[test]
fn config_file_supplies_settings_and_rejects_typos() {
    let db = Db::sqlite();
    let config = db.path("outbox.toml");
    std::fs::write(
        &config,
        format!("database_url = \"{}\"\nsink = \"null:\"\n", db.url),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["relay", "--check", "--config", config.to_str().unwrap()])
        .env_remove("OUTBOX_DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        &config,
        "database_url = \"sqlite://x.db\"\nbatch_sise = 3\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["status", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("batch_sise"));
}

#[test]
fn every_command_describes_itself() {
    for cmd in [
        &["--help"][..],
        &["relay", "--help"],
        &["dead", "--help"],
        &["enqueue", "--help"],
        &["status", "--help"],
        &["migrate", "--help"],
        &["capture", "--help"],
        &["capture", "drop-slot", "--help"],
        &["bench", "--help"],
        &["demo", "--help"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(cmd)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage:"),
            "{cmd:?}"
        );
    }
}

#[test]
fn routes_send_each_type_to_its_sinks_and_dead_letter_the_unrouted() {
    let db = Db::sqlite();
    let (a, b) = (db.path("orders.jsonl"), db.path("mail.jsonl"));
    let config = db.path("outbox.toml");
    std::fs::write(
        &config,
        format!(
            "[[routes]]\nmatch = \"order.*\"\nsinks = [\"file:{}\"]\n\n[[routes]]\nmatch = \"mail\"\nsinks = [\"file:{}\", \"file:{}\"]\n",
            a.display(),
            b.display(),
            a.display()
        ),
    )
    .unwrap();
    for (topic, kind) in [
        ("orders", "order.created"),
        ("mail", "mail.send"),
        ("misc", "user.joined"),
    ] {
        db.ok(&[
            "enqueue",
            "--topic",
            topic,
            "--type",
            kind,
            "--payload",
            "{}",
        ]);
    }
    let out = db
        .cmd(&[
            "relay",
            "--config",
            config.to_str().unwrap(),
            "--exit-when-idle",
        ])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(out.success());
    let types = |p: &Path| -> Vec<String> {
        lines(p)
            .iter()
            .map(|l| l["type"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut in_a = types(&a);
    in_a.sort();
    assert_eq!(
        in_a,
        vec!["mail.send", "order.created"],
        "a route by topic or by type, shared sink"
    );
    assert_eq!(types(&b), vec!["mail.send"]);
    let dead: Value = serde_json::from_str(&db.ok(&["dead", "list", "--json"])).unwrap();
    assert_eq!(dead[0]["type"], "user.joined");
    assert!(
        dead[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("no route matches"),
        "{dead}"
    );
}

#[test]
fn a_route_without_sinks_is_refused_at_start_and_acks_nothing() {
    let db = Db::sqlite();
    let config = db.path("outbox.toml");
    std::fs::write(&config, "[[routes]]\nmatch = \"order.*\"\nsinks = []\n").unwrap();
    db.ok(&[
        "enqueue",
        "--topic",
        "orders",
        "--type",
        "order.created",
        "--payload",
        "{}",
    ]);
    let out = db.run(&[
        "relay",
        "--config",
        config.to_str().unwrap(),
        "--exit-when-idle",
    ]);
    let pending = db.status()["pending"].clone();
    assert!(
        !out.status.success(),
        "the relay started; pending afterwards: {pending}"
    );
    let err = stderr_line(&out);
    assert!(
        err.contains("route 1") && err.contains("at least one sink"),
        "{err}"
    );
    assert_eq!(pending, 1, "the message was acked");
}

#[test]
fn enqueue_refuses_oversized_messages_and_reserved_headers_by_name() {
    let db = Db::sqlite();
    let big = format!("\"{}\"", "x".repeat(2 << 20));
    let file = db.path("big.jsonl");
    std::fs::write(
        &file,
        format!("{{\"topic\":\"t\",\"type\":\"e\",\"payload\":{big}}}\n"),
    )
    .unwrap();
    let out = db.run(&["enqueue", "--file", file.to_str().unwrap()]);
    assert!(!out.status.success(), "a 2 MiB message was enqueued");
    let err = stderr_line(&out);
    assert!(err.contains("1048576"), "the limit is not named: {err}");
    // The limit is configurable.
    db.ok(&[
        "enqueue",
        "--file",
        file.to_str().unwrap(),
        "--max-message-size",
        "4194304",
    ]);
    let out = db.run(&[
        "enqueue",
        "--topic",
        "t",
        "--type",
        "e",
        "--payload",
        "{}",
        "--header",
        "Nats-Msg-Id=1",
    ]);
    assert!(!out.status.success(), "a reserved header was enqueued");
    assert!(stderr_line(&out).contains("Nats-Msg-Id"));
    assert_eq!(db.status()["pending"], 1);
}

#[test]
fn check_reports_every_problem_at_once() {
    let db = Db::sqlite();
    let config = db.path("outbox.toml");
    std::fs::write(
        &config,
        "batch_size = 0\n[[routes]]\nmatch = \"\"\nsinks = [\"gopher://x\"]\n[[routes]]\nmatch = \"a.*\"\nsinks = []\n[[routes]]\nmatch = \"b\"\nsinks = [\"redis://127.0.0.1/?bogus=1\"]\n",
    )
    .unwrap();
    let out = db.run(&["relay", "--check", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "route 1: match must not be empty",
        "gopher",
        "route 2",
        "at least one sink",
        "bogus",
        "batch size",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

/// The one JSON object a successful command printed.
fn json_report(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// Each of `keys` in `report` is a number above zero.
fn all_positive(report: &Value, keys: &[&str]) {
    for key in keys {
        let v = report[key].as_f64();
        assert!(v.is_some_and(|v| v > 0.0), "{key} = {}", report[key]);
    }
}

/// `outbox bench --json` on a small backlog: every key a positive number, the broker scenario
/// really delivered to its sink, the results folder written, and nothing left behind.
fn bench_prints_every_key(db: &Db, more_sinks: &[&str]) {
    let events = db.path("events.jsonl");
    let results = db.path("results");
    let sink = format!("file:{}", events.display());
    let mut args = vec![
        "bench",
        "--json",
        "--messages=1500",
        "--batch-size=200",
        "--keys=50",
        "--clients=2",
        "--duration=400ms",
        "--latency-duration=300ms",
        "--rate=200",
        "--poll-interval=50ms",
        "--sink",
        &sink,
        "--out",
        results.to_str().unwrap(),
    ];
    for extra in more_sinks {
        args.extend(["--sink", extra]);
    }
    let out = db.run(&args);
    let report = json_report(&out);
    all_positive(
        &report,
        &[
            "write_alone_tx_per_s",
            "write_outbox_tx_per_s",
            "write_ratio",
            "raw_write_ratio",
            "drain_per_s",
            "raw_drain_per_s",
            "drain_ratio",
            "latency_p50_ms",
            "latency_p99_ms",
            "latency_max_ms",
            "polling_latency_p50_ms",
            "polling_latency_p99_ms",
            "polling_latency_max_ms",
            "relay_peak_rss_mib",
        ],
    );
    assert!(report["latency_p50_ms"].as_f64() <= report["latency_max_ms"].as_f64());
    assert!(
        report["brokers"][&sink].as_f64().is_some_and(|v| v > 0.0),
        "{report}"
    );
    let lines = std::fs::read_to_string(&events).unwrap().lines().count();
    assert_eq!(lines, 1500, "the file sink got the whole backlog");
    let backend = report["backend"].as_str().unwrap();
    for file in ["json", "md"]
        .map(|e| format!("{backend}.{e}"))
        .into_iter()
        .chain(["latency", "drain"].map(|c| format!("{backend}-{c}.svg")))
    {
        let text = std::fs::read_to_string(results.join(&file)).unwrap_or_default();
        assert!(!text.is_empty(), "{file} missing");
    }
    let status = db.run(&["status", "--json"]);
    let counts: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(counts["pending"], 0, "{counts}");
}

#[test]
fn bench_on_postgres_prints_every_key() {
    // The bench makes a stream (NATS) and a queue (RabbitMQ) for its topic and removes them.
    let prefix = format!("bench{}", uuid::Uuid::now_v7().simple());
    let nats = format!("nats://127.0.0.1:4222?prefix={prefix}.");
    let amqp = "amqp://guest:guest@127.0.0.1:5672/%2f?exchange=outbox_bench".to_owned();
    let mut sinks = vec![nats.as_str(), amqp.as_str()];
    // Kafka has no server here: librdkafka's mock cluster stands in for it.
    if cfg!(feature = "kafka") {
        sinks.push("kafka://mock");
    }
    bench_prints_every_key(&Db::postgres(), &sinks);
}

#[test]
fn bench_on_mysql_prints_every_key() {
    bench_prints_every_key(&Db::mysql(), &[]);
}

#[test]
fn bench_on_sqlite_prints_every_key() {
    bench_prints_every_key(&Db::sqlite(), &[]);
}

/// `outbox bench --scenario drain,keys,relays --relays 2`: a rate per key count and per number
/// of relays, their ratios, the drain by 2 relays, no message out of its key's order, and
/// nothing left behind.
fn bench_scaling_reports_every_count(db: &Db) {
    let out = db.run(&[
        "bench",
        "--json",
        "--no-files",
        "--scenario=drain,keys,relays",
        "--relays=2",
        "--messages=300",
        "--batch-size=100",
        "--keys=20",
    ]);
    let report = json_report(&out);
    let positive = |v: &Value| v.as_f64().is_some_and(|v| v > 0.0);
    for (field, names) in [
        ("keys_drain_per_s", &["0", "1000", "10", "1"][..]),
        ("keys_ratios", &["10/1000", "1/1000", "1000/0", "0/raw"]),
        ("relays_drain_per_s", &["1", "2", "4"]),
        ("relays_ratios", &["2/1", "4/1"]),
    ] {
        for name in names {
            assert!(positive(&report[field][name]), "{field}.{name}: {report}");
        }
    }
    assert!(positive(&report["keys_raw_drain_per_s"]), "{report}");
    assert!(positive(&report["drain_per_s"]), "{report}");
    assert_eq!(report["relays"], 2, "{report}");
    assert_eq!(report["order_violations"], 0, "{report}");
    assert_eq!(db.status()["pending"], 0);
}

#[test]
fn bench_scaling_on_postgres_reports_every_count() {
    bench_scaling_reports_every_count(&Db::postgres());
}

#[test]
fn bench_scaling_on_mysql_reports_every_count() {
    bench_scaling_reports_every_count(&Db::mysql());
}

#[test]
fn bench_scaling_on_sqlite_reports_every_count() {
    bench_scaling_reports_every_count(&Db::sqlite());
}

#[test]
fn bench_refuses_an_outbox_that_holds_messages() {
    let db = Db::sqlite();
    let out = db.run(&["enqueue", "--topic", "t", "--type", "e", "--payload", "{}"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = db.run(&["bench", "--messages=10", "--no-files"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("scratch database"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let status = db.run(&["status", "--json"]);
    let counts: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(counts["pending"], 1, "the message is still there");
}

/// `outbox bench --scenario capture` on a server with `wal_level = logical`: both ways of
/// writing for the stream (logical messages, captured rows) report their write ratio, drain
/// and latency next to polling, the drain from two slots is measured, no key is out of order,
/// and the benchmark's slots are gone after.
#[test]
fn bench_capture_reports_messages_and_rows() {
    let pg = outbox_testkit::cluster::PgCluster::start_with(&[
        "wal_level=logical",
        "max_wal_senders=10",
    ])
    .expect("a private cluster");
    pg.create_database("bench").expect("a database");
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "bench",
            "--json",
            "--no-files",
            "--scenario=capture",
            "--messages=400",
            "--batch-size=100",
            "--keys=20",
            "--clients=2",
            "--duration=400ms",
            "--latency-duration=300ms",
            "--rate=200",
        ])
        .env("OUTBOX_DATABASE_URL", pg.url("bench"))
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    let report = json_report(&out);
    all_positive(
        &report,
        &[
            "capture_write_ratio",
            "capture_table_write_ratio",
            "capture_raw_write_ratio",
            "capture_drain_ratio",
            "capture_table_drain_ratio",
            "capture_latency_p99_ms",
            "capture_table_latency_p99_ms",
            "capture_two_slots_ratio",
            "capture_peak_rss_mib",
        ],
    );
    assert_eq!(report["order_violations"], 0, "{report}");
    let status = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["status", "--json"])
        .env("OUTBOX_DATABASE_URL", pg.url("bench"))
        .output()
        .expect("runs");
    let status: Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(status["pending"], 0, "{status}");
    assert_eq!(status["slots"], serde_json::json!([]), "{status}");
}
