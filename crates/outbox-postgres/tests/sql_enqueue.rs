//! Enqueue from SQL (`outbox_enqueue`, `outbox_enqueue_bytes`, migration 11): rows that the
//! relay cannot tell from the library's, the library's checks, and the writer's transaction
//! deciding, from sqlx and from the `psql` client.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use outbox_core::{ClaimRequest, Store, partition_for};
use outbox_postgres::PgStore;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

async fn migrated() -> anyhow::Result<PgStore> {
    let store = common::fresh_store().await?;
    store.migrate().await?;
    Ok(store)
}

fn function(store: &PgStore, name: &str) -> String {
    format!("{}.outbox_{name}", store.config().schema)
}

/// Calls `outbox_enqueue` in its own committed transaction; the database's refusal as text.
async fn enqueue(
    store: &PgStore,
    topic: &str,
    payload: serde_json::Value,
    key: Option<&str>,
    headers: serde_json::Value,
) -> Result<Uuid, String> {
    let sql = format!(
        "SELECT {}($1, 'test.event', $2, $3, $4)",
        function(store, "enqueue")
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(topic)
        .bind(payload)
        .bind(key)
        .bind(headers)
        .fetch_one(store.pool())
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) => {
                assert_eq!(d.code().as_deref(), Some("22023"), "{d}");
                d.message().to_owned()
            }
            other => panic!("{other}"),
        })
}

#[tokio::test]
async fn rows_from_sql_are_claimed_like_the_librarys() -> anyhow::Result<()> {
    let store = migrated().await?;
    let headers = serde_json::json!({ "x-tenant": "acme" });
    let keyed = enqueue(
        &store,
        "orders",
        serde_json::json!({ "n": 1 }),
        Some("order-7"),
        headers,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let unkeyed = enqueue(
        &store,
        "orders",
        serde_json::json!({ "n": 2 }),
        None,
        serde_json::Value::Null,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let empty_key = enqueue(
        &store,
        "orders",
        serde_json::json!({ "n": 3 }),
        Some(""),
        serde_json::Value::Null,
    )
    .await
    .map_err(anyhow::Error::msg)?;

    let held = store
        .claim_held(&ClaimRequest::new("relay", 10, LEASE))
        .await?
        .expect("the three messages");
    let got = held.messages();
    assert_eq!(
        got.iter().map(|m| m.id).collect::<Vec<_>>(),
        [keyed, unkeyed, empty_key]
    );
    for m in got {
        assert_eq!(
            m.id.get_version_num(),
            7,
            "time-ordered ids, like the library's"
        );
        assert_eq!(m.topic, "orders");
        assert_eq!(m.message_type, "test.event");
        assert_eq!(m.content_type, "application/json");
        assert_eq!(
            m.partition,
            partition_for(m.key.as_deref(), m.id),
            "the partition the library computes, so that relays owning partitions agree"
        );
    }
    assert_eq!(got[0].key.as_deref(), Some("order-7"));
    assert_eq!(
        got[0].json::<serde_json::Value>()?,
        serde_json::json!({ "n": 1 })
    );
    assert_eq!(
        got[0].headers,
        BTreeMap::from([("x-tenant".to_owned(), "acme".to_owned())])
    );
    assert_eq!(got[1].key, None);
    assert_eq!(got[2].key, None, "an empty key is no key");
    held.release().await?;
    common::drop_schema(&store).await
}

/// Bytes with a content type of the writer's choosing; and keys of every shape land in the
/// partition the library computes (the SQL CRC-32 against the library's).
#[tokio::test]
async fn opaque_payloads_keep_their_content_type_and_keys_their_partition() -> anyhow::Result<()> {
    let store = migrated().await?;
    let keys = ["a", "order-123", "ключ", "🙂 emoji key", &"k".repeat(300)];
    let sql = format!(
        "SELECT {}('blobs', 'blob', 'application/octet-stream', $1, $2)",
        function(&store, "enqueue_bytes")
    );
    for key in keys {
        let _: Uuid = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
            .bind(vec![0u8, 1, 2, 255])
            .bind(key)
            .fetch_one(store.pool())
            .await?;
    }
    let held = store
        .claim_held(&ClaimRequest::new("relay", 10, LEASE))
        .await?
        .expect("the messages");
    assert_eq!(held.messages().len(), keys.len());
    for m in held.messages() {
        assert_eq!(&m.payload[..], &[0u8, 1, 2, 255]);
        assert_eq!(m.content_type, "application/octet-stream");
        assert_eq!(
            m.partition,
            partition_for(m.key.as_deref(), m.id),
            "{:?}",
            m.key
        );
    }
    held.release().await?;
    common::drop_schema(&store).await
}

/// The SQL function refuses exactly what the library refuses, by name.
#[tokio::test]
async fn the_sql_function_refuses_what_the_library_refuses() -> anyhow::Result<()> {
    let store = migrated().await?;
    let headers = outbox_testkit::header_cases();
    for (name, value) in &headers {
        let expected = outbox_core::headers::check(name, value);
        let got = enqueue(
            &store,
            "t",
            serde_json::json!(1),
            None,
            serde_json::Value::Object(
                [(name.to_string(), value.clone().into())]
                    .into_iter()
                    .collect(),
            ),
        )
        .await;
        match (&expected, &got) {
            (Ok(()), Ok(_)) => {}
            (Err(e), Err(msg)) => assert_eq!(msg, &e.to_string(), "the library's words"),
            _ => panic!("{name:?}={value:?}: library {expected:?}, SQL {got:?}"),
        }
    }

    for (topic, why) in [
        ("", "topic must not be empty"),
        ("  ", "topic must not be empty"),
    ] {
        let got = enqueue(
            &store,
            topic,
            serde_json::json!(1),
            None,
            serde_json::Value::Null,
        )
        .await;
        assert_eq!(got.unwrap_err(), why);
    }
    let long = "t".repeat(256);
    let got = enqueue(
        &store,
        &long,
        serde_json::json!(1),
        None,
        serde_json::Value::Null,
    )
    .await;
    assert_eq!(got.unwrap_err(), "topic is longer than 255 bytes");
    let got = enqueue(
        &store,
        "t",
        serde_json::json!(1),
        None,
        serde_json::json!(["x"]),
    )
    .await;
    assert!(got.unwrap_err().contains("JSON object"));
    let got = enqueue(
        &store,
        "t",
        serde_json::json!(1),
        None,
        serde_json::json!({ "x-n": 1 }),
    )
    .await;
    assert!(got.unwrap_err().contains("must be a string"));

    // Over the default 1 MiB, and over a limit set for the database.
    let big = serde_json::Value::String("x".repeat(1 << 20));
    let got = enqueue(&store, "t", big, None, serde_json::Value::Null).await;
    let why = got.unwrap_err();
    assert!(why.contains("over the limit of 1048576 bytes"), "{why}");
    let mut tx = store.pool().begin().await?;
    sqlx::query("SET LOCAL outbox.max_message_bytes = 100")
        .execute(&mut *tx)
        .await?;
    let sql = format!("SELECT {}('t', 'e', $1)", function(&store, "enqueue"));
    let refused = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(serde_json::Value::String("y".repeat(200)))
        .execute(&mut *tx)
        .await
        .expect_err("over the limit set for the transaction");
    assert!(
        refused.to_string().contains("over the limit of 100 bytes"),
        "{refused}"
    );
    tx.rollback().await?;

    // Only the accepted headers' messages are in the outbox.
    let accepted = headers
        .iter()
        .filter(|(n, v)| outbox_core::headers::check(n, v).is_ok())
        .count();
    assert_eq!(store.status().await?.pending as usize, accepted);
    common::drop_schema(&store).await
}

/// What the README shows for other languages, run by the `psql` client: the committed
/// transaction's message is delivered, the rolled-back one's never exists.
#[tokio::test]
async fn psql_transactions_decide_what_the_relay_sees() -> anyhow::Result<()> {
    let store = migrated().await?;
    let enqueue = function(&store, "enqueue");
    let script = format!(
        "\\set ON_ERROR_STOP on
         CREATE TABLE {schema}.orders (id int PRIMARY KEY);
         BEGIN;
         INSERT INTO {schema}.orders VALUES (1);
         SELECT {enqueue}('orders', 'order.placed', '{{\"order\": 1}}', 'order-1');
         COMMIT;
         BEGIN;
         INSERT INTO {schema}.orders VALUES (2);
         SELECT {enqueue}('orders', 'order.placed', '{{\"order\": 2}}', 'order-2');
         ROLLBACK;",
        schema = store.config().schema
    );
    let out = Command::new("psql")
        .arg(common::url())
        .args(["-X", "-q", "-t", "-A"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(script.as_bytes())?;
            child.wait_with_output()
        })?;
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    let ids: Vec<Uuid> = printed
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(ids.len(), 2, "both calls printed an id: {printed}");

    let held = store
        .claim_held(&ClaimRequest::new("relay", 10, LEASE))
        .await?
        .expect("the committed message");
    assert_eq!(
        held.messages().len(),
        1,
        "the rolled-back message is not there"
    );
    let m = &held.messages()[0];
    assert_eq!(m.id, ids[0]);
    assert_eq!(m.key.as_deref(), Some("order-1"));
    assert_eq!(
        m.json::<serde_json::Value>()?,
        serde_json::json!({ "order": 1 })
    );
    let id = m.id;
    held.settle(&outbox_core::Outcome::delivered(
        &[id],
        outbox_core::Retention::Delete,
    ))
    .await?;
    let s = store.status().await?;
    assert_eq!((s.pending, s.in_flight), (0, 0));
    common::drop_schema(&store).await
}

/// The README's Python example, run as it is shown (with psycopg, which `scripts/test`
/// installs) in a schema of its own.
#[tokio::test]
async fn the_readmes_python_example_enqueues_with_the_order() -> anyhow::Result<()> {
    let store = migrated().await?;
    let schema = &store.config().schema;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))?;
    let example = readme
        .split("```python\n")
        .filter_map(|rest| rest.split("```").next())
        .find(|block| block.contains("psycopg"))
        .expect("a Python example for PostgreSQL in the README");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {schema}.orders (id int PRIMARY KEY, amount int)"
    )))
    .execute(store.pool())
    .await?;
    let program = format!(
        "import json, sys\nimport psycopg\ndsn = sys.argv[1]\norder_id, amount = 7, 100\n{example}"
    );
    let dsn = format!("{}?options=-csearch_path%3D{schema}", common::url());
    let out = Command::new("python3")
        .args(["-c", &program, &dsn])
        .output()?;
    assert!(
        out.status.success(),
        "the example failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let orders: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {schema}.orders"
    )))
    .fetch_one(store.pool())
    .await?;
    assert_eq!(orders, 1);
    let held = store
        .claim_held(&ClaimRequest::new("relay", 10, LEASE))
        .await?
        .expect("the example's message");
    let m = &held.messages()[0];
    assert_eq!(held.messages().len(), 1);
    assert_eq!(
        (m.topic.as_str(), m.message_type.as_str(), m.key.as_deref()),
        ("orders", "order.created", Some("7"))
    );
    assert_eq!(
        m.json::<serde_json::Value>()?,
        serde_json::json!({ "id": 7 })
    );
    drop(held);
    common::drop_schema(&store).await
}
