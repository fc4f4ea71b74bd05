//! Opening each backend by its URL, on the real servers of the test machine
//! (`OUTBOX_TEST_POSTGRES_URL`, `OUTBOX_TEST_MYSQL_URL`), and transactions on what was opened.

use outbox_any::{AnyStore, Backend, ClaimMode, EnqueueError, OpenError, OpenOptions};
use outbox_core::NewMessage;
use serde_json::json;

fn postgres_url() -> String {
    std::env::var("OUTBOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The MySQL server with its `test` database.
fn mysql_url() -> String {
    let server = std::env::var("OUTBOX_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
    format!("{server}/test")
}

/// A name of this test's own, so that tests running together never share tables.
fn unique(prefix: &str) -> String {
    format!("{prefix}{}_", uuid::Uuid::now_v7().simple())
}

fn msg(n: u32) -> NewMessage {
    NewMessage::json("orders", "order.created", &json!({ "n": n }))
        .unwrap()
        .key(format!("k{n}"))
}

/// What a caller of every backend relies on: a rolled-back transaction leaves nothing, a
/// committed one leaves its messages pending, and a message over the limit is refused.
async fn transactions_commit_or_leave_nothing(store: AnyStore) -> anyhow::Result<()> {
    store.store().migrate().await?;
    let mut tx = store.begin().await?;
    tx.enqueue(&msg(1)).await?;
    tx.rollback().await?;
    assert_eq!(
        store.store().status().await?.pending,
        0,
        "a rollback left a message"
    );

    let mut tx = store.begin().await?;
    tx.enqueue(&msg(2)).await?;
    tx.enqueue_batch(&[msg(3), msg(4)]).await?;
    tx.commit().await?;
    assert_eq!(store.store().status().await?.pending, 3);

    let small = store.clone().with_max_message_size(4);
    let mut tx = small.begin().await?;
    let refused = tx.enqueue(&msg(5)).await.unwrap_err();
    assert!(matches!(refused, EnqueueError::Invalid(_)), "{refused}");
    drop(tx);
    assert_eq!(store.store().status().await?.pending, 3);

    let separate = store.separate(2).await?;
    assert_eq!(separate.backend(), store.backend());
    assert_eq!(
        separate.store().status().await?.pending,
        3,
        "another pool, the same outbox"
    );
    Ok(())
}

#[tokio::test]
async fn postgres_opens_in_its_schema() -> anyhow::Result<()> {
    let schema = unique("any_").trim_end_matches('_').to_owned();
    let opts = OpenOptions::new().schema(Some(schema.clone()));
    let store = AnyStore::open(&postgres_url(), &opts).await?;
    assert_eq!(store.backend(), Backend::Postgres);
    let AnyStore::Postgres(pg) = &store else {
        panic!("a postgres:// URL opened {:?}", store.backend());
    };
    assert_eq!(pg.config().schema, schema);
    let result = transactions_commit_or_leave_nothing(store.clone()).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(pg.pool())
        .await?;
    result
}

#[tokio::test]
async fn mariadb_and_mysql_urls_open_the_mysql_store() -> anyhow::Result<()> {
    let prefix = unique("any_");
    let opts = OpenOptions::new().table_prefix(Some(prefix.clone()));
    let url = mysql_url().replacen("mysql:", "mariadb:", 1);
    let store = AnyStore::open(&url, &opts).await?;
    assert_eq!(store.backend(), Backend::MySql);
    let result = transactions_commit_or_leave_nothing(store.clone()).await;
    let AnyStore::MySql(my) = &store else {
        unreachable!()
    };
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name FROM information_schema.tables \
         WHERE table_schema = DATABASE() AND table_name LIKE CONCAT(?, '%')",
    )
    .bind(&prefix)
    .fetch_all(my.pool())
    .await?;
    assert!(!tables.is_empty(), "no table carries the prefix {prefix}");
    sqlx::query("SET FOREIGN_KEY_CHECKS = 0")
        .execute(my.pool())
        .await?;
    for table in tables {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE `{table}`")))
            .execute(my.pool())
            .await?;
    }
    result
}

#[tokio::test]
async fn sqlite_creates_the_directory_of_its_file_when_asked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}/a/b/outbox.db", dir.path().display());
    let refused = AnyStore::open(&url, &OpenOptions::new()).await.unwrap_err();
    assert!(matches!(refused, OpenError::Store { .. }), "{refused}");
    let store = AnyStore::open(&url, &OpenOptions::new().create_dirs(true)).await?;
    assert_eq!(store.backend(), Backend::Sqlite);
    assert!(dir.path().join("a/b/outbox.db").exists());
    transactions_commit_or_leave_nothing(store).await
}

#[tokio::test]
async fn an_unreachable_server_is_named_with_the_reason_and_no_password() {
    for url in [
        "postgres://app:S3cretXYZ@127.0.0.1:1/x",
        "mariadb://app:S3cretXYZ@127.0.0.1:1/x",
    ] {
        let e = AnyStore::open(url, &OpenOptions::new()).await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, OpenError::Unreachable { .. }), "{url}: {text}");
        assert!(text.contains("Connection refused"), "{text}");
        assert!(!text.contains("S3cretXYZ"), "{text}");
        let scheme = url.split_once(':').unwrap().0;
        assert!(
            text.starts_with(&format!("cannot connect to {scheme}://app:***@")),
            "{text}"
        );
    }
}

#[tokio::test]
async fn options_a_backend_cannot_honour_are_refused_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}/x.db", dir.path().display());
    let with_schema = OpenOptions::new().schema(Some("s".into()));
    let e = AnyStore::open(&sqlite, &with_schema).await.unwrap_err();
    assert!(
        matches!(
            e,
            OpenError::SchemaNeedsPostgres {
                backend: Backend::Sqlite
            }
        ),
        "{e}"
    );
    assert!(
        !dir.path().join("x.db").exists(),
        "a refused open created the file"
    );

    let in_tx = OpenOptions::new().claim_mode(Some(ClaimMode::Transaction));
    let e = AnyStore::open("mysql://root@127.0.0.1:1/x", &in_tx)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            OpenError::ClaimModeNeedsPostgres {
                backend: Backend::MySql
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_lazy_store_opens_without_its_server() -> anyhow::Result<()> {
    let store =
        AnyStore::open("postgres://u@127.0.0.1:1/x", &OpenOptions::new().lazy(true)).await?;
    assert_eq!(store.backend(), Backend::Postgres);
    let lazy = OpenOptions::new()
        .lazy(true)
        .acquire_timeout(std::time::Duration::from_millis(200));
    let store = AnyStore::open("mysql://u@127.0.0.1:1/x", &lazy).await?;
    assert!(
        store.store().status().await.is_err(),
        "a status without a server"
    );
    Ok(())
}
