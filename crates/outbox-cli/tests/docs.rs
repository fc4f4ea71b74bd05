//! The operator files in `docs/` kept in step with the binary: every flag they pass exists,
//! the probes and the scrape hit paths a real relay serves on the port it listens on, and the
//! dashboard and alert rules use only metrics a real relay exports and the docs describe.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox_testkit::eventually;

fn docs(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The `outbox relay` arguments of the systemd unit's `ExecStart`.
fn systemd_args() -> Vec<String> {
    let unit = docs("systemd/outbox-relay.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let mut words = line.split_whitespace().map(str::to_owned);
    assert!(
        words.next().is_some_and(|w| w.ends_with("/outbox")),
        "{line}"
    );
    assert_eq!(words.next().as_deref(), Some("relay"), "{line}");
    words.collect()
}

/// The container's `args:` list of the Kubernetes Deployment.
fn kubernetes_args() -> Vec<String> {
    let yaml = docs("kubernetes/relay.yaml");
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "args:").skip(1);
    let args: Vec<String> = lines
        .by_ref()
        .map_while(|l| l.trim().strip_prefix("- ").map(str::to_owned))
        .collect();
    assert_eq!(args.first().map(String::as_str), Some("relay"), "{args:?}");
    args[1..].to_vec()
}

/// Values of `key: value` lines in the Kubernetes file, quotes removed.
fn yaml_values(key: &str) -> Vec<String> {
    docs("kubernetes/relay.yaml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .collect()
}

fn flag_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    let at = args.iter().position(|a| a == flag).expect(flag);
    &args[at + 1]
}

fn port(addr: &str) -> String {
    addr.rsplit_once(':').expect("host:port").1.to_owned()
}

#[test]
fn the_operator_files_pass_only_flags_the_relay_has() {
    let help = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["relay", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    let known: BTreeSet<&str> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=')
        .filter(|w| w.starts_with("--"))
        .collect();
    for (file, args) in [
        ("systemd/outbox-relay.service", systemd_args()),
        ("kubernetes/relay.yaml", kubernetes_args()),
    ] {
        let flags: Vec<&String> = args.iter().filter(|a| a.starts_with("--")).collect();
        assert!(!flags.is_empty(), "{file}");
        for flag in flags {
            let name = flag.split('=').next().unwrap();
            assert!(
                known.contains(name),
                "{file} passes {name}, which `outbox relay` does not take"
            );
        }
    }
}

#[test]
fn the_probes_and_the_scrape_use_the_port_the_relay_listens_on() {
    let args = kubernetes_args();
    let listen = port(flag_value(&args, "--listen"));
    assert_eq!(yaml_values("containerPort"), std::slice::from_ref(&listen));
    assert_eq!(yaml_values("port"), [listen.clone(), listen.clone()]);
    assert_eq!(yaml_values("prometheus.io/port"), [listen]);
    assert_eq!(yaml_values("path")[..2], ["/health/live", "/health/ready"]);
    let unit = docs("systemd/outbox-relay.service");
    let listen = flag_value(&systemd_args(), "--listen").to_owned();
    assert!(
        unit.contains(&format!("http://{listen}/health/ready")),
        "{unit}"
    );
}

/// A relay process on its own SQLite file, killed when dropped.
struct Relay {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A relay with two routes: `bad` to a webhook nobody answers (one attempt, then dead),
/// everything else to `null:`. Messages of key `k` follow a `bad` one, so they are left
/// behind (released) when it fails.
fn relay() -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("outbox.db").display());
    let config = dir.path().join("outbox.toml");
    std::fs::write(
        &config,
        "sink = \"null:\"\n[[routes]]\nmatch = \"bad\"\nsinks = [\"http://127.0.0.1:1/\"]\n",
    )
    .unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"topic\":\"t\",\"type\":\"bad\",\"key\":\"k\",\"payload\":{}}\n\
         {\"topic\":\"t\",\"type\":\"good\",\"key\":\"k\",\"payload\":{}}\n\
         {\"topic\":\"t\",\"type\":\"good\",\"payload\":{}}\n",
    )
    .unwrap();
    let outbox = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
        c.env("OUTBOX_DATABASE_URL", &url)
            .env("OUTBOX_LOG", "warn")
            .env_remove("OUTBOX_SINK")
            .env_remove("OUTBOX_LISTEN")
            .stdin(Stdio::null());
        c
    };
    let out = outbox()
        .args(["enqueue", "--file"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut child = outbox()
        .args(["relay", "--config"])
        .arg(&config)
        .args(["--max-attempts", "1", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    std::thread::spawn(move || lines.for_each(drop));
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("a URL")
        .to_owned();
    Relay {
        child,
        base,
        _dir: dir,
    }
}

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Metric names in `text`: `outbox_…` and `process_…` words.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices(['o', 'p']) {
        let rest = &text[i..];
        if !(rest.starts_with("outbox_") || rest.starts_with("process_")) {
            continue;
        }
        if text[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '/')
        {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alerts_use_only_metrics_the_relay_exports_and_the_docs_describe() {
    let relay = relay();
    let base = relay.base.clone();
    // The probe and scrape paths of the Kubernetes example answer on a real relay.
    for path in yaml_values("path") {
        let (status, body) = get(&format!("{base}{path}")).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    // Every series the files use has samples once the relay delivered, failed (one dead
    // letter) and released (the later message of the failed key).
    let exported = |m: &str| -> BTreeSet<String> {
        m.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    };
    eventually("every kind of outcome", Duration::from_secs(30), || async {
        let (_, m) = get(&format!("{base}/metrics")).await;
        let names = exported(&m);
        [
            "outbox_messages_delivered_total",
            "outbox_messages_dead_total",
            "outbox_messages_released_total",
            "outbox_sink_circuit_open",
        ]
        .iter()
        .all(|n| names.contains(*n))
    })
    .await;
    // Counters and gauges, once there, stay: the last scrape has them all.
    let exported = exported(&get(&format!("{base}/metrics")).await.1);
    let operations = docs("operations.md");
    // The metrics table: its rows start with the names.
    let table: String = operations
        .lines()
        .filter(|l| l.starts_with("| `"))
        .collect::<Vec<_>>()
        .join("\n");
    let documented = metric_names(&table);
    for file in ["grafana/outbox.json", "prometheus/outbox-rules.yml"] {
        let used = metric_names(&docs(file));
        assert!(used.len() >= 4, "{file}: {used:?}");
        for name in used {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| exported.contains(*f)))
                .unwrap_or(&name);
            assert!(
                exported.contains(family),
                "{file} uses {name}, which the relay does not export"
            );
            assert!(
                documented.contains(family),
                "{file} uses {name}, which docs/operations.md does not describe"
            );
        }
    }
    // And the docs describe nothing the relay does not export.
    for name in documented.iter().filter(|n| n.starts_with("outbox_")) {
        assert!(
            exported.contains(name),
            "docs/operations.md describes {name}, which the relay does not export"
        );
    }
}
