//! Credentials never leave the `outbox` binary: not in errors, logs, `--help`, the demo's
//! banner, or the last error stored with a message. Each test gives a unique password to the
//! real binary and looks for it in everything the process printed.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const SECRET: &str = "S3cretXYZ";

fn pg_url() -> String {
    std::env::var("OUTBOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// `postgres://user:SECRET@host…` for the test server (which trusts loopback, so any password
/// is accepted and the connection works).
fn pg_url_with_password() -> String {
    let url = pg_url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let rest = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://postgres:{SECRET}@{rest}")
}

fn outbox(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
    c.args(args)
        .env("OUTBOX_LOG", "info")
        .env_remove("OUTBOX_SINK")
        .env_remove("OUTBOX_DATABASE_URL")
        .stdin(Stdio::null());
    c
}

/// Fails naming the command and showing the output when the secret is in it.
fn assert_hidden(what: &str, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains(SECRET) && !stderr.contains(SECRET),
        "{what} shows the password:\nstdout: {stdout}\nstderr: {stderr}"
    );
}

/// Database URLs that carry the secret and cannot be opened: the errors name them.
fn unreachable_databases() -> Vec<String> {
    vec![
        format!("postgres://app:{SECRET}@127.0.0.1:1/app"),
        format!("postgres://app@127.0.0.1:1/app?password={SECRET}&sslmode=disable"),
        format!("host=127.0.0.1 port=1 user=app password={SECRET} dbname=app"),
        format!("postgres://app:{SECRET}@127.0.0.1:1/app?sslmode=nonsense"),
    ]
}

#[test]
fn database_errors_hide_the_password() {
    let commands: &[&[&str]] = &[
        &["status"],
        &["dead", "list"],
        &["migrate"],
        &["enqueue", "--topic", "t", "--type", "e", "--payload", "1"],
        &["relay", "--sink", "null:", "--check"],
    ];
    // A refused connection is retried until the pool's acquire timeout: run them all at once.
    let mut running = Vec::new();
    for url in unreachable_databases() {
        for args in commands {
            let child = outbox(args)
                .env("OUTBOX_DATABASE_URL", &url)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            running.push((format!("outbox {args:?} with {url}"), child));
        }
    }
    for (what, child) in running {
        let out = child.wait_with_output().unwrap();
        // `relay --check` connects to nothing, so only a malformed URL fails it.
        assert!(!out.status.success() || what.contains("--check"), "{what}");
        assert_hidden(&what, &out);
    }
}

#[test]
fn a_relay_that_cannot_reach_its_database_hides_the_password() {
    // The relay waits for its database instead of failing: its log says so, and is read
    // until that line appears.
    let url = format!("postgres://app:{SECRET}@127.0.0.1:1/app?password={SECRET}");
    let mut child = outbox(&["relay", "--sink", "null:"])
        .env("OUTBOX_DATABASE_URL", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Should the line never come, the relay is killed and its output ends.
    let pid = child.id().to_string();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(60));
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
    });
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("database unavailable") {
        if stderr.read_line(&mut seen).unwrap() == 0 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.contains("database unavailable"), "no log line: {seen}");
    assert!(
        !seen.contains(SECRET),
        "relay log shows the password: {seen}"
    );
}

#[test]
fn sink_errors_hide_the_password() {
    let db = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}", db.path().join("o.db").display());
    let sinks = [
        format!("amqp://u:{SECRET}@127.0.0.1:1/%2f"),
        format!("redis://:{SECRET}@127.0.0.1:1"),
        format!("amqp://u:{SECRET}@127.0.0.1:1/%2f?bogus=1"),
        format!("smtp://u:{SECRET}@127.0.0.1:1?to=a@example.com"),
        format!("ftp://u:{SECRET}@127.0.0.1:1"),
        format!("u:{SECRET}@127.0.0.1:1"),
    ];
    for sink in &sinks {
        for extra in [&[][..], &["--check"][..]] {
            let mut args = vec!["relay", "--sink", sink.as_str(), "--exit-when-idle"];
            args.extend_from_slice(extra);
            let out = outbox(&args)
                .env("OUTBOX_DATABASE_URL", &db_url)
                .output()
                .unwrap();
            // `--check` connects to nothing: only a malformed URL fails it.
            assert!(
                !out.status.success() || !extra.is_empty(),
                "outbox {args:?}"
            );
            assert_hidden(&format!("outbox {args:?}"), &out);
        }
    }
}

#[test]
fn routes_in_a_config_file_hide_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outbox.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"sqlite://{}\"\n\n[[routes]]\nmatch = \"*\"\nsinks = [\"amqp://u:{SECRET}@127.0.0.1:1/%2f\", \"nats://u:{SECRET}@h:1?x=1\"]\n",
            dir.path().join("o.db").display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    for args in [
        vec!["relay", "--config", config, "--check"],
        vec!["relay", "--config", config, "--exit-when-idle"],
    ] {
        let out = outbox(&args).output().unwrap();
        assert!(!out.status.success(), "outbox {args:?}");
        assert_hidden(&format!("outbox {args:?}"), &out);
    }
}

#[test]
fn help_shows_no_secret_from_the_environment() {
    let url = format!("amqp://u:{SECRET}@127.0.0.1:5672/%2f");
    for args in [
        &["relay", "--help"][..],
        &["demo", "--help"][..],
        &["status", "--help"][..],
        &["--help"][..],
    ] {
        let out = outbox(args)
            .env("OUTBOX_SINK", &url)
            .env("OUTBOX_DATABASE_URL", &url)
            .env("OUTBOX_DEMO_BROKER", &url)
            .env("OUTBOX_SMTP_URL", format!("smtp://u:{SECRET}@h:25"))
            .env("OUTBOX_GATEWAY_URL", format!("https://u:{SECRET}@h/"))
            .output()
            .unwrap();
        assert!(out.status.success(), "outbox {args:?}");
        assert_hidden(&format!("outbox {args:?}"), &out);
    }
}

/// A webhook that cannot be reached fails with the URL in the error; what is stored in
/// `last_error` and what the relay logs must not carry its credentials.
#[test]
fn webhook_errors_are_stored_and_logged_without_the_password() {
    let schema = format!("secrets_{}", uuid::Uuid::now_v7().simple());
    let drop_schema = DropSchema(schema.clone());
    let run = |args: &[&str]| {
        outbox(args)
            .env("OUTBOX_DATABASE_URL", pg_url())
            .env("OUTBOX_SCHEMA", &schema)
            .output()
            .unwrap()
    };
    let out = run(&["enqueue", "--topic", "t", "--type", "e", "--payload", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hook = format!("http://u:{SECRET}@127.0.0.1:1/hook?token={SECRET}");
    let out = run(&[
        "relay",
        "--sink",
        &hook,
        "--max-attempts",
        "1",
        "--exit-when-idle",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_hidden("the relay posting to the webhook", &out);

    let stored = Command::new("psql")
        .args([
            &pg_url(),
            "-Atc",
            &format!("SELECT last_error FROM {schema}.outbox_messages"),
        ])
        .output()
        .unwrap();
    let stored = String::from_utf8_lossy(&stored.stdout).trim().to_owned();
    assert!(
        stored.contains("127.0.0.1:1"),
        "no last error stored: {stored:?}"
    );
    assert!(!stored.contains(SECRET), "stored last_error: {stored}");

    for args in [&["dead", "list"][..], &["dead", "list", "--json"][..]] {
        let out = run(args);
        assert!(out.status.success());
        assert_hidden(&format!("outbox {args:?}"), &out);
    }
    drop(drop_schema);
}

struct DropSchema(String);

impl Drop for DropSchema {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                &pg_url(),
                "-qc",
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0),
            ])
            .output();
    }
}

/// Runs `outbox demo` until its banner is complete, stops it, and returns all it printed.
fn demo_output(args: &[&str], database_url: &str) -> String {
    let mut child = outbox(&["demo", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("OUTBOX_DATABASE_URL", database_url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    while !printed.contains("Ctrl-C stops.") {
        if stdout.read_line(&mut printed).unwrap() == 0 {
            break;
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = stdout.read_to_string(&mut printed);
    let _ = child.stderr.take().unwrap().read_to_string(&mut printed);
    let _ = child.wait();
    printed
}

#[test]
fn the_demo_banner_hides_the_passwords() {
    let schema = format!("secrets_{}", uuid::Uuid::now_v7().simple());
    let _drop = DropSchema(schema.clone());
    let mail = tempfile::tempdir().unwrap();
    let smtp = format!("smtp://mailer:{SECRET}@127.0.0.1:1");
    let printed = demo_output(
        &[
            "--schema",
            &schema,
            "--smtp-url",
            &smtp,
            "--mail-dir",
            mail.path().to_str().unwrap(),
        ],
        &pg_url_with_password(),
    );
    assert!(
        printed.contains("payment API:"),
        "demo did not start: {printed}"
    );
    assert!(printed.contains("database:"), "{printed}");
    assert!(
        !printed.contains(SECRET),
        "demo shows the password: {printed}"
    );
}

#[test]
fn the_demo_relay_hides_the_broker_password() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("demo.db").display());
    let broker = format!("nats://u:{SECRET}@127.0.0.1:1");
    let printed = demo_output(&["--role", "relay", "--broker", &broker], &db);
    assert!(
        printed.contains("events via:"),
        "demo did not start: {printed}"
    );
    assert!(
        !printed.contains(SECRET),
        "demo shows the password: {printed}"
    );
}

#[test]
fn an_unreachable_consumer_broker_hides_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("demo.db").display());
    let broker = format!("amqp://u:{SECRET}@127.0.0.1:1/%2f");
    let out = outbox(&[
        "demo",
        "--role",
        "worker",
        "--gateway-url",
        "http://127.0.0.1:1",
        "--broker",
        &broker,
    ])
    .env("OUTBOX_DATABASE_URL", &db)
    .output()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert_hidden("the demo worker", &out);
}
