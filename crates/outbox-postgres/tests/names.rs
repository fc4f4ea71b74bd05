//! The longest schema and table prefix the configuration accepts still make a working outbox:
//! every name PostgreSQL derives from them fits its 63-byte limit.

mod common;

use outbox_postgres::{PgConfig, PgStore};
use sqlx::postgres::PgPoolOptions;

/// A 40-character identifier (the most `check_identifier` accepts), unique per test run.
fn longest_name(tag: &str) -> String {
    let unique = format!("{tag}_{}", uuid::Uuid::now_v7().simple());
    format!("{unique:_<40}")[..40].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_names_wake_a_parked_relay() {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&common::url())
        .await
        .unwrap();
    let config = PgConfig::default()
        .schema(longest_name("t"))
        .table_prefix(longest_name("p"));
    assert!(config.channel().len() <= 63, "{}", config.channel());
    let store = PgStore::with_config(pool, config).unwrap();
    let fixture = common::fixture_for(store).await.unwrap();
    let result = outbox_testkit::tests::idle_relay_is_woken_by_a_commit(fixture.as_ref()).await;
    fixture.cleanup().await.unwrap();
    result.unwrap();
}
