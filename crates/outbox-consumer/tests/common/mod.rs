//! Fixtures: a fresh inbox database (a PostgreSQL schema, a MariaDB database or a SQLite file
//! per test), an
//! effects table the handler writes to, and keyed messages as the relay hands them over.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use outbox_consumer::{ConsumerConfig, Handler, InboxStore, Processor};
use outbox_core::{Message, SinkError, Status, Store};
use outbox_mysql::MySqlStore;
use outbox_postgres::{PgConfig, PgStore};
use outbox_sqlite::SqliteStore;
use sqlx::{AssertSqlSafe, MySql, Postgres, Row, Sqlite, Transaction};
use uuid::Uuid;

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", Uuid::now_v7().simple())
}

/// `n` messages over three keys, in order, carrying their number in the payload.
pub fn keyed(topic: &str, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message {
            id: Uuid::now_v7(),
            seq: i as i64,
            topic: topic.into(),
            message_type: "order.created".into(),
            key: Some(format!("k{}", i % 3)),
            partition: 0,
            payload: format!("{{\"n\":{i}}}").into(),
            content_type: outbox_core::JSON.into(),
            headers: BTreeMap::from([("traceparent".into(), "00-abc-def-01".into())]),
            created_at: Utc::now(),
            available_at: Utc::now(),
            attempts: 1,
            last_error: None,
            status: Status::InFlight,
        })
        .collect()
}

/// One row per handled message, in commit order.
#[derive(Debug, Clone, PartialEq)]
pub struct Effect {
    pub message_id: String,
    pub key: String,
    pub n: i64,
}

/// An inbox database with an effects table, created fresh for one test.
#[async_trait]
pub trait TestDb: InboxStore {
    fn effects_table(&self) -> String;
    async fn effects(&self) -> Vec<Effect>;
    async fn cleanup(&self);
}

pub async fn postgres() -> PgStore {
    let url = std::env::var("OUTBOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    let config = PgConfig::default().schema(unique("c_"));
    let store = PgStore::with_config(pool, config).unwrap();
    store.migrate().await.unwrap();
    let sql = format!(
        "CREATE TABLE {} (seq BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, key TEXT NOT NULL, n BIGINT NOT NULL)",
        store.effects_table()
    );
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(store.pool())
        .await
        .unwrap();
    store
}

pub async fn sqlite(dir: &tempfile::TempDir) -> SqliteStore {
    let url = format!("sqlite://{}", dir.path().join("inbox.db").display());
    let store = SqliteStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE effects (seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL, key TEXT NOT NULL, n BIGINT NOT NULL)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    store
}

/// A store in a new MariaDB database of its own (`OUTBOX_TEST_MYSQL_URL`, a server URL).
pub async fn mysql() -> MySqlStore {
    let server = std::env::var("OUTBOX_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
    let name = unique("c_");
    let admin = sqlx::MySqlPool::connect(&server).await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(4)
        .connect(&format!("{server}/{name}"))
        .await
        .unwrap();
    let store = MySqlStore::new(pool);
    store.migrate().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE effects (seq BIGINT AUTO_INCREMENT PRIMARY KEY, message_id TEXT NOT NULL, \
         `key` TEXT NOT NULL, n BIGINT NOT NULL) ENGINE = InnoDB",
    )
    .execute(store.pool())
    .await
    .unwrap();
    store
}

fn to_effect<R: Row>(row: R) -> Effect
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    Effect {
        message_id: row.get("message_id"),
        key: row.get("key"),
        n: row.get("n"),
    }
}

#[async_trait]
impl TestDb for PgStore {
    fn effects_table(&self) -> String {
        format!("{}.effects", self.config().schema)
    }
    async fn effects(&self) -> Vec<Effect> {
        let sql = format!(
            "SELECT message_id, key, n FROM {} ORDER BY seq",
            self.effects_table()
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(self.pool())
            .await
            .unwrap();
        rows.into_iter().map(to_effect).collect()
    }
    async fn cleanup(&self) {
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.config().schema);
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(self.pool())
            .await
            .unwrap();
    }
}

#[async_trait]
impl TestDb for SqliteStore {
    fn effects_table(&self) -> String {
        "effects".into()
    }
    async fn effects(&self) -> Vec<Effect> {
        let rows = sqlx::query("SELECT message_id, key, n FROM effects ORDER BY seq")
            .fetch_all(self.pool())
            .await
            .unwrap();
        rows.into_iter().map(to_effect).collect()
    }
    async fn cleanup(&self) {}
}

#[async_trait]
impl TestDb for MySqlStore {
    fn effects_table(&self) -> String {
        "effects".into()
    }
    async fn effects(&self) -> Vec<Effect> {
        let rows = sqlx::query("SELECT message_id, `key`, n FROM effects ORDER BY seq")
            .fetch_all(self.pool())
            .await
            .unwrap();
        rows.into_iter().map(to_effect).collect()
    }
    async fn cleanup(&self) {
        let name: Option<String> = sqlx::query_scalar("SELECT DATABASE()")
            .fetch_one(self.pool())
            .await
            .unwrap();
        if let Some(name) = name {
            sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE {name}")))
                .execute(self.pool())
                .await
                .unwrap();
        }
    }
}

/// Writes one effect row per message; every fourth message fails the first time, after
/// writing its row, so a retry that kept that row would show up as a duplicate effect.
pub struct Effects {
    table: String,
    pub failed_once: Mutex<HashSet<Uuid>>,
}

impl Effects {
    pub fn new(table: String) -> Self {
        Self {
            table,
            failed_once: Mutex::default(),
        }
    }

    fn n(m: &Message) -> Result<i64, SinkError> {
        m.json::<serde_json::Value>()
            .ok()
            .and_then(|v| v["n"].as_i64())
            .ok_or_else(|| SinkError::permanent("payload without n"))
    }

    fn first_failure(&self, m: &Message, n: i64) -> Result<(), SinkError> {
        if n % 4 == 0 && self.failed_once.lock().unwrap().insert(m.id) {
            return Err(SinkError::Transient {
                message: format!("first attempt of {n} fails"),
                retry_after: Some(Duration::from_millis(20)),
            });
        }
        Ok(())
    }
}

macro_rules! effects_handler {
    ($db:ty, $sql:literal) => {
        #[async_trait]
        impl Handler<$db> for Effects {
            async fn handle(
                &self,
                tx: &mut Transaction<'static, $db>,
                m: &Message,
            ) -> Result<(), SinkError> {
                let n = Self::n(m)?;
                let sql = format!($sql, self.table);
                sqlx::query(AssertSqlSafe(sql))
                    .bind(m.id.to_string())
                    .bind(m.key.clone().unwrap_or_default())
                    .bind(n)
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| SinkError::transient(e.to_string()))?;
                self.first_failure(m, n)
            }
        }
    };
}

effects_handler!(
    Postgres,
    "INSERT INTO {} (message_id, key, n) VALUES ($1, $2, $3)"
);
effects_handler!(
    MySql,
    "INSERT INTO {} (message_id, `key`, n) VALUES (?, ?, ?)"
);
effects_handler!(
    Sqlite,
    "INSERT INTO {} (message_id, key, n) VALUES (?1, ?2, ?3)"
);

pub type TestProcessor<S> = Processor<S, Arc<Effects>>;

/// A processor with short retry and purge intervals, and its handler to inspect.
pub fn processor<S: TestDb>(store: S, name: &str) -> (TestProcessor<S>, Arc<Effects>)
where
    Effects: Handler<S::Db>,
{
    let effects = Arc::new(Effects::new(store.effects_table()));
    let mut config = ConsumerConfig::new(name);
    config.retry_delay = Duration::from_millis(20);
    config.purge_interval = Duration::from_millis(200);
    (Processor::new(store, effects.clone(), config), effects)
}

/// The handler failed once for exactly the messages meant to fail first.
pub fn assert_failed_once(effects: &Effects, sent: &[Message]) {
    let want: HashSet<Uuid> = sent
        .iter()
        .filter(|m| Effects::n(m).is_ok_and(|n| n % 4 == 0))
        .map(|m| m.id)
        .collect();
    assert!(!want.is_empty());
    assert_eq!(*effects.failed_once.lock().unwrap(), want);
}

/// Polls until the effects hold `count` rows.
pub async fn wait_for_effects<S: TestDb>(store: &S, count: usize) -> Vec<Effect> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let effects = store.effects().await;
        if effects.len() >= count {
            return effects;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {count} effects",
            effects.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every message has exactly one effect, and each key's effects are in publish order.
pub fn assert_once_in_order(effects: &[Effect], sent: &[Message]) {
    let ids: HashSet<&str> = effects.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(ids.len(), effects.len(), "a message has two effects");
    for m in sent {
        assert!(
            ids.contains(m.id.to_string().as_str()),
            "{} has no effect",
            m.id
        );
    }
    for key in ["k0", "k1", "k2"] {
        let ns: Vec<i64> = effects
            .iter()
            .filter(|e| e.key == key)
            .map(|e| e.n)
            .collect();
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {ns:?}"
        );
    }
}
