//! The file sink never leaves a torn line: a batch whose write fails half-way (disk full, file
//! size limit) is cut back before anything else is appended, so a reader only ever finds whole
//! JSON lines, and the retried batch follows the last acked one.

use chrono::Utc;
use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
use outbox_core::{Message, Sink, Status};
use outbox_sinks::FileSink;
use tokio::signal::unix::{SignalKind, signal};
use uuid::Uuid;

fn message(n: i64) -> Message {
    Message {
        id: Uuid::now_v7(),
        seq: n,
        topic: "orders".into(),
        message_type: "order.created".into(),
        key: Some(format!("k{n}")),
        partition: 3,
        payload: format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(200))
            .into_bytes()
            .into(),
        content_type: outbox_core::JSON.into(),
        headers: Default::default(),
        created_at: Utc::now(),
        available_at: Utc::now(),
        attempts: 1,
        last_error: None,
        status: Status::InFlight,
    }
}

/// Runs alone in its process (one test in this file): the file size limit is process-wide.
#[tokio::test]
async fn a_write_that_fails_half_way_leaves_no_torn_line() {
    // Past the size limit the kernel sends SIGXFSZ, which would end the test process; with a
    // handler registered the write just fails with EFBIG, as on a full disk.
    let _xfsz = signal(SignalKind::from_raw(nix::libc::SIGXFSZ)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    let sink = FileSink::open(&path).await.unwrap();

    let first: Vec<Message> = (0..3).map(message).collect();
    assert!(sink.publish(&first).await.iter().all(Result::is_ok));
    let acked = std::fs::metadata(&path).unwrap().len();

    // The next batch fits only in part: its write stops in the middle of a line.
    setrlimit(Resource::RLIMIT_FSIZE, acked + 100, RLIM_INFINITY).unwrap();
    let second: Vec<Message> = (3..10).map(message).collect();
    let outcomes = sink.publish(&second).await;
    setrlimit(Resource::RLIMIT_FSIZE, RLIM_INFINITY, RLIM_INFINITY).unwrap();
    assert!(outcomes.iter().all(Result::is_err), "{outcomes:?}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        acked,
        "the failed batch left bytes behind"
    );

    // The relay retries the batch: the file holds whole lines, each message once.
    assert!(sink.publish(&second).await.iter().all(Result::is_ok));
    let text = std::fs::read_to_string(&path).unwrap();
    let ids: Vec<String> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a torn line");
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    let expected: Vec<String> = first
        .iter()
        .chain(&second)
        .map(|m| m.id.to_string())
        .collect();
    assert_eq!(ids, expected);
}
