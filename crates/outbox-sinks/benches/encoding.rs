//! CPU cost per message on the relay's path: building a message, the JSON-lines encoding of a
//! batch, and the CloudEvents headers every broker sink attaches.

use std::hint::black_box;

use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use outbox_core::{Message, NewMessage, Status};

fn claimed(n: u64) -> Message {
    let new = NewMessage::json(
        "orders",
        "order.created",
        &serde_json::json!({"order_id": n, "amount": "12.50", "currency": "EUR"}),
    )
    .expect("valid message")
    .key(format!("customer-{}", n % 1000))
    .header(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    Message {
        id: new.id(),
        seq: n as i64,
        topic: new.topic().into(),
        message_type: new.message_type().into(),
        key: new.key_ref().map(str::to_owned),
        partition: new.partition(),
        payload: new.payload().to_vec().into(),
        content_type: new.content_type().into(),
        headers: new.header_map().clone(),
        created_at: Utc::now(),
        available_at: Utc::now(),
        attempts: 1,
        last_error: None,
        status: Status::InFlight,
    }
}

fn encoding(c: &mut Criterion) {
    let mut group = c.benchmark_group("encoding");
    group.throughput(Throughput::Elements(1));
    group.bench_function("NewMessage::json + key + partition", |b| {
        let body = serde_json::json!({"order_id": 1, "amount": "12.50", "currency": "EUR"});
        b.iter(|| {
            let m = NewMessage::json("orders", "order.created", black_box(&body))
                .expect("valid message")
                .key("customer-1");
            black_box(m.partition())
        })
    });
    let m = claimed(1);
    group.bench_function("CloudEvents headers", |b| {
        b.iter(|| black_box(outbox_sinks::cloudevents::headers(black_box(&m), "outbox")))
    });
    let batch: Vec<Message> = (0..1000).map(claimed).collect();
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("json_lines, batch of 1000", |b| {
        b.iter(|| black_box(outbox_sinks::json_lines(black_box(&batch))))
    });
    group.finish();
}

criterion_group!(benches, encoding);
criterion_main!(benches);
