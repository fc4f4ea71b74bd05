//! Enqueue from SQL (`CALL outbox_enqueue`, `CALL outbox_enqueue_bytes`, migration 2): rows that
//! the relay cannot tell from the library's, the library's checks, and the writer's transaction
//! deciding, from sqlx and from the `mysql` client.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use outbox_core::{ClaimRequest, Retention, Store, partition_for};
use outbox_mysql::MySqlStore;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

/// MySQL may cut the text of a raised error at 128 characters (MariaDB sends it whole).
const MAX_ERROR_CHARS: usize = 128;

/// Calls `outbox_enqueue` on one connection and reads its id back; the refusal as text.
async fn enqueue(
    store: &MySqlStore,
    topic: &str,
    payload: serde_json::Value,
    key: Option<&str>,
    headers: serde_json::Value,
) -> Result<Uuid, String> {
    let mut conn = store.pool().acquire().await.expect("a connection");
    let headers = (!headers.is_null()).then(|| headers.to_string());
    let called = sqlx::query("CALL outbox_enqueue(?, 'test.event', ?, ?, ?, @id)")
        .bind(topic)
        .bind(payload.to_string())
        .bind(key)
        .bind(headers)
        .execute(&mut *conn)
        .await;
    match called {
        Err(sqlx::Error::Database(d)) => {
            assert_eq!(d.code().as_deref(), Some("22023"), "{d}");
            return Err(d.message().to_owned());
        }
        Err(other) => panic!("{other}"),
        Ok(_) => {}
    }
    let id: String = sqlx::query_scalar("SELECT @id")
        .fetch_one(&mut *conn)
        .await
        .expect("the id");
    Ok(id.parse().expect("a uuid"))
}

async fn claim_all(store: &MySqlStore) -> anyhow::Result<Vec<outbox_core::Message>> {
    Ok(store
        .claim_leased(&ClaimRequest::new("relay", 100, LEASE))
        .await?)
}

#[tokio::test]
async fn rows_from_sql_are_claimed_like_the_librarys() -> anyhow::Result<()> {
    let db = common::migrated().await?;
    let store = &db.store;
    let keyed = enqueue(
        store,
        "orders",
        serde_json::json!({ "n": 1 }),
        Some("order-7"),
        serde_json::json!({ "x-tenant": "acme" }),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let unkeyed = enqueue(
        store,
        "orders",
        serde_json::json!({ "n": 2 }),
        None,
        serde_json::Value::Null,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let empty_key = enqueue(
        store,
        "orders",
        serde_json::json!({ "n": 3 }),
        Some(""),
        serde_json::Value::Null,
    )
    .await
    .map_err(anyhow::Error::msg)?;

    let got = claim_all(store).await?;
    assert_eq!(
        got.iter().map(|m| m.id).collect::<Vec<_>>(),
        [keyed, unkeyed, empty_key]
    );
    for m in &got {
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
            "the partition the library computes"
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
    db.drop().await
}

/// Bytes with a content type of the writer's choosing; and keys of every shape land in the
/// partition the library computes (MySQL's CRC32 against the library's).
#[tokio::test]
async fn opaque_payloads_keep_their_content_type_and_keys_their_partition() -> anyhow::Result<()> {
    let db = common::migrated().await?;
    let keys = ["a", "order-123", "ключ", "🙂 emoji key", &"k".repeat(300)];
    for key in keys {
        sqlx::query("CALL outbox_enqueue_bytes('blobs', 'blob', 'application/octet-stream', ?, ?, NULL, @id)")
            .bind(vec![0u8, 1, 2, 255])
            .bind(key)
            .execute(db.store.pool())
            .await?;
    }
    let got = claim_all(&db.store).await?;
    assert_eq!(got.len(), keys.len());
    for m in &got {
        assert_eq!(&m.payload[..], &[0u8, 1, 2, 255]);
        assert_eq!(m.content_type, "application/octet-stream");
        assert_eq!(
            m.partition,
            partition_for(m.key.as_deref(), m.id),
            "{:?}",
            m.key
        );
    }
    let mut keys_back: Vec<_> = got.iter().filter_map(|m| m.key.clone()).collect();
    let mut want: Vec<_> = keys.iter().map(|k| k.to_string()).collect();
    keys_back.sort();
    want.sort();
    assert_eq!(keys_back, want, "keys round-trip byte for byte");
    db.drop().await
}

/// The SQL procedure refuses exactly what the library refuses, in the library's words (or
/// their first 128 characters, where the server cuts an error text).
#[tokio::test]
async fn the_sql_procedure_refuses_what_the_library_refuses() -> anyhow::Result<()> {
    let db = common::migrated().await?;
    let store = &db.store;
    let headers = outbox_testkit::header_cases();
    for (name, value) in &headers {
        let expected = outbox_core::headers::check(name, value);
        let one = serde_json::Value::Object(
            [(name.to_string(), value.clone().into())]
                .into_iter()
                .collect(),
        );
        let got = enqueue(store, "t", serde_json::json!(1), None, one).await;
        match (&expected, &got) {
            (Ok(()), Ok(_)) => {}
            (Err(e), Err(msg)) => {
                let words = e.to_string();
                let cut = msg.chars().count() >= MAX_ERROR_CHARS && words.starts_with(msg);
                assert!(
                    msg == &words || cut,
                    "the library's words: {msg:?} vs {words:?}"
                );
            }
            _ => panic!("{name:?}={value:?}: library {expected:?}, SQL {got:?}"),
        }
    }
    for (topic, why) in [
        ("", "topic must not be empty"),
        ("  ", "topic must not be empty"),
        (&"t".repeat(256), "topic is longer than 255 bytes"),
    ] {
        let got = enqueue(
            store,
            topic,
            serde_json::json!(1),
            None,
            serde_json::Value::Null,
        );
        assert_eq!(got.await.unwrap_err(), why);
    }
    let got = enqueue(
        store,
        "t",
        serde_json::json!(1),
        None,
        serde_json::json!(["x"]),
    )
    .await;
    assert!(got.unwrap_err().contains("JSON object"));
    let got = enqueue(
        store,
        "t",
        serde_json::json!(1),
        None,
        serde_json::json!({ "x-n": 1 }),
    );
    assert!(got.await.unwrap_err().contains("must be a string"));

    // Over the default 1 MiB, and over a limit set for the session.
    let big = serde_json::Value::String("x".repeat(1 << 20));
    let why = enqueue(store, "t", big, None, serde_json::Value::Null)
        .await
        .unwrap_err();
    assert!(why.contains("over the limit of 1048576 bytes"), "{why}");
    let mut conn = store.pool().acquire().await?;
    sqlx::query("SET @outbox_max_message_bytes = 100")
        .execute(&mut *conn)
        .await?;
    let refused = sqlx::query("CALL outbox_enqueue('t', 'e', ?, NULL, NULL, @id)")
        .bind(serde_json::Value::String("y".repeat(200)).to_string())
        .execute(&mut *conn)
        .await
        .expect_err("over the limit set for the session");
    assert!(
        refused.to_string().contains("over the limit of 100 bytes"),
        "{refused}"
    );
    sqlx::query("SET @outbox_max_message_bytes = NULL")
        .execute(&mut *conn)
        .await?;
    drop(conn);

    let accepted = headers
        .iter()
        .filter(|(n, v)| outbox_core::headers::check(n, v).is_ok())
        .count();
    assert_eq!(store.status().await?.pending as usize, accepted);
    db.drop().await
}

/// What the README shows for other languages, run by the `mysql` client: the committed
/// transaction's message is delivered, the rolled-back one's never exists.
#[tokio::test]
async fn mysql_client_transactions_decide_what_the_relay_sees() -> anyhow::Result<()> {
    let db = common::migrated().await?;
    let script = "CREATE TABLE orders (id INT PRIMARY KEY) ENGINE = InnoDB;
         START TRANSACTION;
         INSERT INTO orders VALUES (1);
         CALL outbox_enqueue('orders', 'order.placed', '{\"order\": 1}', 'order-1', NULL, @id);
         SELECT @id;
         COMMIT;
         START TRANSACTION;
         INSERT INTO orders VALUES (2);
         CALL outbox_enqueue('orders', 'order.placed', '{\"order\": 2}', 'order-2', NULL, @id);
         SELECT @id;
         ROLLBACK;";
    let (host, port) = common::host_port();
    let out = Command::new("mysql")
        .args(["-h", &host, "-P", &port, "-u", "root", "-N", "-B", &db.name])
        .args(["-e", script])
        .output()?;
    assert!(
        out.status.success(),
        "mysql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    let ids: Vec<Uuid> = printed
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(ids.len(), 2, "both calls printed an id: {printed}");

    let got = claim_all(&db.store).await?;
    assert_eq!(got.len(), 1, "the rolled-back message is not there");
    let m = &got[0];
    assert_eq!(m.id, ids[0]);
    assert_eq!(m.key.as_deref(), Some("order-1"));
    assert_eq!(
        m.json::<serde_json::Value>()?,
        serde_json::json!({ "order": 1 })
    );
    db.store.ack(&[m.id], Retention::Delete).await?;
    let s = db.store.status().await?;
    assert_eq!((s.pending, s.in_flight), (0, 0));
    db.drop().await
}

/// The README's Python example for MySQL, run as it is shown (with PyMySQL, which
/// `scripts/test` installs) in a database of its own.
#[tokio::test]
async fn the_readmes_python_example_enqueues_with_the_order() -> anyhow::Result<()> {
    let db = common::migrated().await?;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))?;
    let example = readme
        .split("```python\n")
        .filter_map(|rest| rest.split("```").next())
        .find(|block| block.contains("pymysql"))
        .expect("a Python example for MySQL in the README");
    sqlx::query("CREATE TABLE orders (id INT PRIMARY KEY, amount INT) ENGINE = InnoDB")
        .execute(db.store.pool())
        .await?;
    let (host, port) = common::host_port();
    let program = format!(
        "import json, sys\nimport pymysql\nhost, port = sys.argv[1], int(sys.argv[2])\n\
         user, password, database = 'root', '', sys.argv[3]\n\
         _connect = pymysql.connect\n\
         pymysql.connect = lambda **kw: _connect(port=port, **kw)\n\
         order_id, amount = 7, 100\n{example}"
    );
    let out = Command::new("python3")
        .args(["-c", &program, &host, &port, &db.name])
        .output()?;
    assert!(
        out.status.success(),
        "the example failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(db.store.pool())
        .await?;
    assert_eq!(orders, 1);
    let got = claim_all(&db.store).await?;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(
        (m.topic.as_str(), m.message_type.as_str(), m.key.as_deref()),
        ("orders", "order.created", Some("7"))
    );
    assert_eq!(
        m.json::<serde_json::Value>()?,
        serde_json::json!({ "id": 7 })
    );
    db.drop().await
}
