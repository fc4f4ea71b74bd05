//! Opens the store a database URL names, through `outbox-any`, and says what went wrong in
//! the words of the command's own flags.

use anyhow::Context;
use outbox_any::{Backend, OpenError, OpenOptions};
use outbox_core::NewMessage;
use uuid::Uuid;

use crate::cli::ClaimArg;
use crate::config::StoreSettings;

pub use outbox_any::AnyStore;

/// Opens the store. With `eager`, connects now so that a wrong URL or a stopped server is
/// reported at once; the relay opens lazily and waits for the database instead.
pub async fn open(s: &StoreSettings, eager: bool) -> anyhow::Result<AnyStore> {
    open_with(s, options(s).lazy(!eager)).await
}

/// Opens the store for a relay: a pool with a connection for each batch in delivery, and
/// the claim mode asked for (PostgreSQL only; the other stores always lease).
pub async fn open_relay(
    s: &StoreSettings,
    claim: Option<ClaimArg>,
    in_flight_batches: usize,
) -> anyhow::Result<AnyStore> {
    let pool_size = u32::try_from(in_flight_batches + 2)
        .unwrap_or(u32::MAX)
        .max(4);
    let opts = options(s)
        .lazy(true)
        .max_connections(pool_size)
        .claim_mode(claim.map(Into::into));
    open_with(s, opts).await
}

/// Opens the store now, with a pool of `pool_size` connections and, on PostgreSQL, `claim`.
pub async fn open_sized(
    s: &StoreSettings,
    pool_size: u32,
    claim: ClaimArg,
) -> anyhow::Result<AnyStore> {
    let claim = match Backend::from_url(&s.database_url)? {
        Backend::Postgres => Some(claim.into()),
        _ => None,
    };
    let opts = options(s)
        .max_connections(pool_size)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .claim_mode(claim);
    open_with(s, opts).await
}

fn options(s: &StoreSettings) -> OpenOptions {
    OpenOptions::new()
        .schema(s.schema.clone())
        .table_prefix(s.table_prefix.clone())
}

async fn open_with(s: &StoreSettings, opts: OpenOptions) -> anyhow::Result<AnyStore> {
    AnyStore::open(&s.database_url, &opts)
        .await
        .map_err(in_flags)
}

/// The library's error, naming the flag that asked for what the database cannot do.
fn in_flags(e: OpenError) -> anyhow::Error {
    match e {
        OpenError::SchemaNeedsPostgres {
            backend: Backend::Sqlite,
        } => anyhow::anyhow!("--schema applies to PostgreSQL only; use --table-prefix with SQLite"),
        OpenError::SchemaNeedsPostgres { .. } => anyhow::anyhow!(
            "--schema applies to PostgreSQL only; name the database in the URL and use \
             --table-prefix with MySQL"
        ),
        OpenError::ClaimModeNeedsPostgres { backend } => anyhow::anyhow!(
            "--claim transaction needs PostgreSQL; {backend} relays always use leases"
        ),
        other => other.into(),
    }
}

/// Enqueues `first` and then every chunk `next` returns until an empty one, all in one
/// transaction: all of them or none (an error from `next` rolls back what was written).
/// The store refuses a message over `max_bytes` or with a reserved header.
pub async fn enqueue_stream(
    store: &AnyStore,
    first: Vec<NewMessage>,
    mut next: impl FnMut() -> anyhow::Result<Vec<NewMessage>>,
    max_bytes: usize,
) -> anyhow::Result<Vec<Uuid>> {
    let store = store.clone().with_max_message_size(max_bytes);
    let mut tx = store.begin().await.context("cannot begin a transaction")?;
    let mut ids = Vec::new();
    let mut chunk = first;
    while !chunk.is_empty() {
        tx.enqueue_batch(&chunk).await?;
        ids.extend(chunk.iter().map(NewMessage::id));
        chunk = next()?;
    }
    tx.commit().await?;
    Ok(ids)
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_urls_are_shown_without_credentials() {
        use outbox_core::redact;
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact("postgres://u@h/db?password=secret"),
            "postgres://u@h/db?password=***"
        );
        assert_eq!(
            redact("host=h user=u password=secret"),
            "host=h user=u password=***"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }
}
