//! Traces and structured logs of the real binary: the payment demo through NATS exporting
//! over OTLP/HTTP to a receiver run here, and `--log-format json`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use serde_json::{Value, json};

/// A span as received, with the service that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Any::StringValue(s) => Some(s.clone()),
                Any::IntValue(i) => Some(i.to_string()),
                other => Some(format!("{other:?}")),
            })
    }
}

type Spans = Arc<Mutex<Vec<Received>>>;

/// An OTLP/HTTP receiver on a free port: `POST /v1/traces` with protobuf bodies.
async fn otlp_receiver() -> (String, Spans) {
    let spans = Spans::default();
    let app = axum::Router::new()
        .route("/v1/traces", post(receive))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), spans)
}

async fn receive(State(spans): State<Spans>, body: Bytes) -> (axum::http::StatusCode, Vec<u8>) {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut all = spans.lock().unwrap();
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Any::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                all.push(Received {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
    let ok = ExportTraceServiceResponse::default().encode_to_vec();
    (axum::http::StatusCode::OK, ok)
}

/// A demo process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `outbox demo` exporting to `otlp` as `service`, its log lines (JSON) written to
/// `log`; returns the process and the first URL it printed.
fn start(
    db: &str,
    mail: &Path,
    otlp: &str,
    service: &str,
    log: &Path,
    args: &[&str],
) -> (Proc, Option<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["--log-format", "json", "demo", "--listen", "127.0.0.1:0"])
        .args(["--poll-interval", "100ms", "--lease", "2s"])
        .arg("--mail-dir")
        .arg(mail)
        .args(args)
        .env("OUTBOX_DATABASE_URL", db)
        // The worker's e-mail line is at INFO; the others log only warnings, which must not
        // cost the trace its spans.
        .env(
            "OUTBOX_LOG",
            if service == "payments-worker" {
                "info"
            } else {
                "warn"
            },
        )
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        .env("OTEL_SERVICE_NAME", service)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut url = None;
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

/// Polls `spans` until `find` picks one, naming `what` on timeout.
async fn wait_for(spans: &Spans, what: &str, find: impl Fn(&Received) -> bool) -> Received {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = spans.lock().unwrap().iter().find(|s| find(s)) {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no span: {what}; received: {:#?}",
            spans
                .lock()
                .unwrap()
                .iter()
                .map(|s| (&s.service, &s.span.name))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The JSON log lines of `log` whose message is `message`.
fn log_lines(log: &Path, message: &str) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .collect()
}

/// The payment demo as separate API, relay and worker processes, the events through NATS, each
/// process exporting over OTLP: one trace holds the `POST /api/payments` request, the enqueue
/// (`create`), the relay's `publish` and the worker's `process`, each the parent of the next,
/// and the worker's JSON log lines inside it carry its trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_payment_request_through_nats_to_the_worker() {
    let (otlp, spans) = otlp_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("demo.db").display());
    let mail: PathBuf = dir.path().join("mail");
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let prefix = format!("trace{}.", uuid::Uuid::now_v7().simple());
    let broker = format!("nats://127.0.0.1:4222?prefix={prefix}");
    let run = |service: &str, args: &[&str]| start(&db, &mail, &otlp, service, &log(service), args);

    let (_gw, gateway) = run(
        "gateway",
        &[
            "--role",
            "gateway",
            "--gateway-latency",
            "0-5",
            "--decline-rate",
            "0",
        ],
    );
    let gateway = gateway.unwrap();
    let worker_args = [
        "--role",
        "worker",
        "--gateway-url",
        &gateway,
        "--broker",
        &broker,
    ];
    let (_worker, _) = run("payments-worker", &worker_args);
    let (_relay, _) = run("payments-relay", &["--role", "relay", "--broker", &broker]);
    let (_api, api) = run("payments-api", &["--role", "api"]);
    let api = api.unwrap();

    let resp = reqwest::Client::new()
        .post(format!("{api}/api/payments"))
        .json(
            &json!({"token_card": "tok_visa", "amount": "25.00", "currency": "EUR",
                      "card_holder_email": "ana@example.com", "card_holder_name": "Ana"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);

    let request = wait_for(&spans, "the API's request span", |s| {
        s.service == "payments-api" && s.span.name == "POST /api/payments"
    })
    .await;
    assert_eq!(request.span.kind, SpanKind::Server as i32);
    assert_eq!(
        request.attribute("http.response.status_code").as_deref(),
        Some("202")
    );
    let trace = request.span.trace_id.clone();
    let create = wait_for(&spans, "the enqueue's create span", |s| {
        s.span.trace_id == trace && s.span.parent_span_id == request.span.span_id
    })
    .await;
    assert_eq!(create.service, "payments-api");
    assert_eq!(create.span.name, "create payments");
    assert_eq!(create.span.kind, SpanKind::Producer as i32);
    let publish = wait_for(&spans, "the relay's publish span", |s| {
        s.span.trace_id == trace && s.span.parent_span_id == create.span.span_id
    })
    .await;
    assert_eq!(publish.service, "payments-relay");
    assert_eq!(publish.span.name, "publish payments");
    assert_eq!(publish.span.kind, SpanKind::Producer as i32);
    assert_eq!(
        publish.attribute("messaging.system").as_deref(),
        Some("nats")
    );
    assert_eq!(
        publish.attribute("messaging.destination.name").as_deref(),
        Some("payments")
    );
    assert_eq!(
        publish.attribute("messaging.operation").as_deref(),
        Some("publish")
    );
    let message_id = publish.attribute("messaging.message.id").unwrap();
    let process = wait_for(&spans, "the worker's process span", |s| {
        s.span.trace_id == trace && s.span.parent_span_id == publish.span.span_id
    })
    .await;
    assert_eq!(process.service, "payments-worker");
    assert_eq!(process.span.kind, SpanKind::Consumer as i32);
    assert_eq!(process.span.name, format!("process {prefix}payments"));
    assert_eq!(process.attribute("messaging.message.id"), Some(message_id));

    // The settlement the worker enqueued while processing goes on in the same trace, down to
    // the e-mail, whose log line names the trace.
    let trace_hex = hex(&trace);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let written = log_lines(&log("payments-worker"), "e-mail written");
        if let Some(line) = written.first() {
            assert_eq!(line["trace_id"], trace_hex.as_str(), "{line}");
            assert_eq!(line["level"], "INFO");
            break;
        }
        assert!(Instant::now() < deadline, "no e-mail log line");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let stream = format!("OUTBOX_{}PAYMENTS", prefix.to_uppercase().replace('.', "_"));
    async_nats::jetstream::new(client)
        .delete_stream(&stream)
        .await
        .unwrap();
}

/// `--log-format json` (or `OUTBOX_LOG_FORMAT=json`) writes one JSON object per line; the
/// default stays text.
#[test]
fn json_logs_are_one_object_per_line_and_text_stays_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("o.db").display());
    let relay = |format: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox"));
        cmd.args(["relay", "--sink", "null:", "--exit-when-idle"])
            .env("OUTBOX_DATABASE_URL", &db)
            .env("OUTBOX_LOG", "info")
            .env_remove("OUTBOX_LOG_FORMAT");
        if let Some(f) = format {
            cmd.env("OUTBOX_LOG_FORMAT", f);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let json = relay(Some("json"));
    let lines: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "relay started" && l["level"] == "INFO"),
        "{json}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["timestamp"].is_string() && l.get("trace_id").is_none())
    );

    let text = relay(None);
    assert!(text.contains("relay started"), "{text}");
    assert!(
        text.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_err()),
        "{text}"
    );
}

/// Export is configured by the standard variables only; a protocol this build cannot speak is
/// refused in one line, not ignored.
#[test]
fn an_unsupported_otlp_protocol_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["relay", "--sink", "null:", "--exit-when-idle"])
        .env(
            "OUTBOX_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("o.db").display()),
        )
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc"),
        "{stderr}"
    );
}
