//! The admin API over a real PostgreSQL schema: the same calls as `api.rs`, on the store whose
//! claim is a SQL function.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::{Failure, NewMessage, Store};
use outbox_postgres::{PgConfig, PgStore};
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;

type R = anyhow::Result<()>;

fn url() -> String {
    std::env::var("OUTBOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn enqueue(store: &PgStore, msgs: &[NewMessage]) -> anyhow::Result<()> {
    let mut tx = store.pool().begin().await?;
    store.outbox().enqueue_batch(&mut tx, msgs).await?;
    tx.commit().await?;
    Ok(())
}

#[tokio::test]
async fn dead_letters_and_paused_topics_over_postgres() -> R {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url())
        .await?;
    let schema = format!("admin_{}", uuid::Uuid::now_v7().simple());
    let config = PgConfig::default().schema(schema.clone());
    let store = PgStore::with_config(pool.clone(), config)?;
    store.migrate().await?;
    let state = outbox_admin::AdminState::new(Arc::new(store.clone()));
    let app = axum::Router::new().nest_service("/admin", outbox_admin::router(state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/admin/api", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let msgs: Vec<_> = (0..5)
        .map(|n| {
            NewMessage::json(
                if n < 3 { "mail" } else { "hooks" },
                "e",
                &json!({ "n": n }),
            )
            .unwrap()
            .key(format!("k{n}"))
        })
        .collect();
    enqueue(&store, &msgs).await?;
    let claimed = store.claim("seed", 10, Duration::from_secs(60)).await?;
    let failures: Vec<_> = claimed
        .iter()
        .map(|m| Failure {
            id: m.id,
            error: format!("Timeout after {}s", m.seq),
            retry_in: None,
        })
        .collect();
    store.fail("seed", &failures).await?;

    let client = reqwest::Client::new();
    let get = |path: String| {
        let client = client.clone();
        async move { client.get(path).send().await?.json::<Value>().await }
    };
    let mail = get(format!("{base}/dead?topic=mail&error=TIMEOUT&limit=2")).await?;
    assert_eq!(mail["items"].as_array().unwrap().len(), 2);
    let next = mail["next"].as_str().expect("a second page");
    let rest = get(format!("{base}/dead?topic=mail&limit=2&after={next}")).await?;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert!(rest["next"].is_null());

    let r: Value = client
        .post(format!("{base}/dead/retry"))
        .json(&json!({ "topic": "hooks" }))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(r["retried"], 2);
    client
        .post(format!("{base}/topics/hooks/pause"))
        .send()
        .await?
        .error_for_status()?;
    assert!(
        store
            .claim("r", 10, Duration::from_secs(60))
            .await?
            .is_empty()
    );
    client
        .post(format!("{base}/topics/hooks/resume"))
        .send()
        .await?
        .error_for_status()?;
    assert_eq!(
        store.claim("r", 10, Duration::from_secs(60)).await?.len(),
        2
    );
    let s = get(format!("{base}/status")).await?;
    assert_eq!(
        (s["dead"].as_i64(), s["in_flight"].as_i64()),
        (Some(3), Some(2))
    );

    server.abort();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&pool)
        .await?;
    Ok(())
}
