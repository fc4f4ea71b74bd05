//! The processor on its own, against real PostgreSQL, MariaDB and SQLite: the verdicts a transport acts
//! on, and the inbox retention.

mod common;

use std::time::Duration;

use common::*;
use outbox_consumer::{Handler, Outcome};

async fn verdicts_and_retention<S: TestDb>(store: S)
where
    Effects: Handler<S::Db>,
{
    let (mut processor, _) = processor(store.clone(), "billing");
    let msgs = keyed("orders", 2);
    assert_eq!(processor.process(&msgs[1]).await, Outcome::Handled);
    assert_eq!(processor.process(&msgs[1]).await, Outcome::Duplicate);
    assert!(matches!(
        processor.process(&msgs[0]).await,
        Outcome::Retry { after, .. } if after == Duration::from_millis(20)
    ));
    assert_eq!(processor.process(&msgs[0]).await, Outcome::Handled);

    let mut bad = msgs[0].clone();
    bad.id = uuid::Uuid::now_v7();
    bad.payload = "[]".into();
    assert_eq!(
        processor.process(&bad).await,
        Outcome::Reject("payload without n".into())
    );
    assert_eq!(
        store.effects().await.len(),
        2,
        "a failed attempt left an effect"
    );

    // Ids younger than the retention survive a purge; once forgotten, a message is new again.
    processor.purge_expired().await;
    assert_eq!(processor.process(&msgs[1]).await, Outcome::Duplicate);
    processor.config_mut().retention = Duration::ZERO;
    processor.purge_expired().await;
    assert_eq!(processor.process(&msgs[1]).await, Outcome::Handled);
    assert_eq!(store.effects().await.len(), 3);
    store.cleanup().await;
}

#[tokio::test]
async fn verdicts_and_retention_on_postgres() {
    verdicts_and_retention(postgres().await).await;
}

#[tokio::test]
async fn verdicts_and_retention_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    verdicts_and_retention(sqlite(&dir).await).await;
}

#[tokio::test]
async fn verdicts_and_retention_on_mysql() {
    verdicts_and_retention(mysql().await).await;
}
