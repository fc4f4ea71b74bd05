//! The payment tables, written together with outbox messages in one transaction, on
//! PostgreSQL, MySQL/MariaDB or SQLite through the library's public API.

use std::sync::Arc;

use chrono::Utc;
use outbox_any::AnyStore;
use outbox_core::{NewMessage, Store};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, MySql, Postgres, Row, Sqlite, Transaction};
use uuid::Uuid;

/// The database of the demo: the payments and their outbox, opened by URL.
#[derive(Clone)]
pub struct Db(AnyStore);

/// Runs the same code on any backend's pool: the statements are the same (in the dialect
/// [`Db::sql`] writes them in), the types differ.
macro_rules! on_db {
    ($db:expr, $store:ident => $body:expr) => {
        match &$db.0 {
            AnyStore::Postgres($store) => $body,
            AnyStore::Sqlite($store) => $body,
            AnyStore::MySql($store) => $body,
        }
    };
}

/// The same with a transaction of the same database as the store.
macro_rules! on_db_tx {
    ($db:expr, $tx:expr, ($store:ident, $t:ident) => $body:expr) => {
        match (&$db.0, $tx) {
            (AnyStore::Postgres($store), Tx::Postgres($t)) => $body,
            (AnyStore::Sqlite($store), Tx::Sqlite($t)) => $body,
            (AnyStore::MySql($store), Tx::MySql($t)) => $body,
            _ => anyhow::bail!("a transaction on another database than the payments"),
        }
    };
}

/// Runs the same code on the typed transaction of an [`outbox_any::AnyTx`].
macro_rules! on_tx {
    ($tx:expr, $t:ident => $body:expr) => {
        match $tx.sql() {
            outbox_any::Tx::Postgres($t) => $body,
            outbox_any::Tx::Sqlite($t) => $body,
            outbox_any::Tx::MySql($t) => $body,
        }
    };
}

/// A payment as stored and as `GET /api/payments/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Payment {
    /// The payment's id, also the key of its events and the gateway's idempotency key.
    pub payment_id: Uuid,
    /// `pending`, `paid` or `rejected`.
    pub status: String,
    /// The amount as a decimal string, exactly as accepted (never a float).
    pub amount: String,
    /// The ISO 4217 currency code, upper case.
    pub currency: String,
    /// Charge attempts counted so far (declines, and the final attempt).
    pub attempts: i64,
    /// Why the gateway declined the last attempt, if it did.
    pub last_decline_reason: Option<String>,
    /// When the payment was accepted (RFC 3339).
    pub created_at: String,
    /// When the payment last changed (RFC 3339).
    pub updated_at: String,
    /// Where the e-mails about the payment go; not shown by the API.
    #[serde(skip)]
    pub card_holder_email: String,
    /// The card holder's name for the e-mails; not shown by the API.
    #[serde(skip)]
    pub card_holder_name: String,
}

/// A validated purchase.
#[derive(Debug, Clone, Serialize)]
pub struct NewPayment {
    /// The card token the gateway charges.
    pub token_card: String,
    /// The amount, positive, in the currency's units, with no more decimals than it has.
    pub amount: rust_decimal::Decimal,
    /// The ISO 4217 currency code, upper case.
    pub currency: String,
    /// Where the e-mails about the payment go.
    pub card_holder_email: String,
    /// The card holder's name.
    pub card_holder_name: String,
}

/// The event payload of `payment.created`, `payment.paid` and `payment.rejected`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentEvent {
    /// The payment this event is about.
    pub payment_id: Uuid,
    /// The amount as a decimal string.
    pub amount: String,
    /// The ISO 4217 currency code.
    pub currency: String,
    /// The card token, for the worker to charge.
    pub token_card: String,
    /// Where the e-mail about the outcome goes.
    pub card_holder_email: String,
    /// The card holder's name, for the e-mail.
    pub card_holder_name: String,
    /// Why the payment was rejected (`payment.rejected` only).
    pub reason: Option<String>,
    /// The gateway's charge id (`payment.paid` only).
    pub charge_id: Option<String>,
}

/// What `create` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// A new payment with this id was written, with its `payment.created` event.
    New(Uuid),
    /// The idempotency key was used before with the same request.
    Replay(Uuid),
    /// The idempotency key was used before with another request.
    KeyReused,
}

/// The outbox topic of every payment event.
pub const TOPIC: &str = "payments";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS {s}payments (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    amount TEXT NOT NULL,
    currency TEXT NOT NULL,
    token_card TEXT NOT NULL,
    card_holder_email TEXT NOT NULL,
    card_holder_name TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    last_decline_reason TEXT,
    charge_id TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}payment_idempotency (
    key TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    payment_id TEXT NOT NULL
);";

/// The same tables on MySQL, which indexes no TEXT column whole and reserves `key`.
const MYSQL_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS payments (
        id VARCHAR(36) PRIMARY KEY,
        status VARCHAR(16) NOT NULL,
        amount VARCHAR(32) NOT NULL,
        currency VARCHAR(3) NOT NULL,
        token_card TEXT NOT NULL,
        card_holder_email TEXT NOT NULL,
        card_holder_name TEXT NOT NULL,
        attempts BIGINT NOT NULL DEFAULT 0,
        last_decline_reason TEXT,
        charge_id TEXT,
        created_at VARCHAR(40) NOT NULL,
        updated_at VARCHAR(40) NOT NULL
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
    "CREATE TABLE IF NOT EXISTS payment_idempotency (
        `key` VARCHAR(255) PRIMARY KEY,
        request TEXT NOT NULL,
        payment_id VARCHAR(36) NOT NULL
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
];

/// A statement written for PostgreSQL in MySQL's dialect: `?` placeholders (the statements
/// number theirs in the order they appear), `key` quoted, and `INSERT IGNORE` for a conflict
/// that does nothing.
fn mysql_dialect(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
            }
            out.push('?');
        } else {
            out.push(c);
        }
    }
    let out = out
        .replace("{s}", "")
        .replace("(key,", "(`key`,")
        .replace("WHERE key =", "WHERE `key` =");
    match out.strip_suffix(" ON CONFLICT (key) DO NOTHING") {
        Some(head) => head.replacen("INSERT INTO", "INSERT IGNORE INTO", 1),
        None => out,
    }
}

const COLUMNS: &str = "id, status, amount, currency, card_holder_email, card_holder_name, \
    attempts, last_decline_reason, created_at, updated_at";

impl Db {
    /// The demo's database in `store`.
    pub fn new(store: AnyStore) -> Self {
        Self(store)
    }

    /// The store, typed by its backend.
    pub fn any(&self) -> &AnyStore {
        &self.0
    }

    /// The outbox store, for relays and operator commands.
    pub fn store(&self) -> Arc<dyn Store> {
        self.0.store()
    }

    /// SQL for this database: tables in the outbox's schema, `$n` or `?n` placeholders.
    fn sql(&self, template: &str) -> AssertSqlSafe<String> {
        let text = match &self.0 {
            AnyStore::Postgres(s) => template.replace("{s}", &format!("{}.", s.config().schema)),
            AnyStore::Sqlite(_) => template.replace("{s}", "").replace('$', "?"),
            AnyStore::MySql(_) => mysql_dialect(template),
        };
        AssertSqlSafe(text)
    }

    /// Creates the outbox schema and the payment tables.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        self.store().migrate().await?;
        if let AnyStore::MySql(s) = &self.0 {
            for statement in MYSQL_SCHEMA {
                sqlx::raw_sql(*statement).execute(s.pool()).await?;
            }
            return Ok(());
        }
        on_db!(self, s => sqlx::raw_sql(self.sql(SCHEMA)).execute(s.pool()).await.map(drop))?;
        Ok(())
    }

    /// Whether the database answers a trivial query.
    pub async fn ping(&self) -> bool {
        on_db!(self, s => sqlx::query("SELECT 1").execute(s.pool()).await.is_ok())
    }

    /// Writes the payment and its `payment.created` event in one transaction, honouring the
    /// idempotency key: nothing is written twice for one key. `with_event: false` exists only
    /// to measure what the outbox write costs the API.
    pub async fn create(
        &self,
        p: &NewPayment,
        idempotency: Option<(&str, &str)>,
        with_event: bool,
    ) -> anyhow::Result<Created> {
        let id = Uuid::now_v7();
        let now = Utc::now().to_rfc3339();
        let event = PaymentEvent {
            payment_id: id,
            amount: p.amount.to_string(),
            currency: p.currency.clone(),
            token_card: p.token_card.clone(),
            card_holder_email: p.card_holder_email.clone(),
            card_holder_name: p.card_holder_name.clone(),
            reason: None,
            charge_id: None,
        };
        let msg = NewMessage::json(TOPIC, "payment.created", &event)?.key(id.to_string());
        let mut tx = self.0.begin().await?;
        if let Some((key, request)) = idempotency {
            let claim_key = self.sql(
                "INSERT INTO {s}payment_idempotency (key, request, payment_id) VALUES ($1, $2, $3) \
                 ON CONFLICT (key) DO NOTHING",
            );
            let inserted = on_tx!(tx, t => sqlx::query(claim_key)
                .bind(key).bind(request).bind(id.to_string())
                .execute(&mut **t).await?.rows_affected());
            if inserted == 0 {
                tx.rollback().await?;
                return self.replay(key, request).await;
            }
        }
        let insert = self.sql(
            "INSERT INTO {s}payments (id, status, amount, currency, token_card, card_holder_email, \
             card_holder_name, created_at, updated_at) VALUES ($1, 'pending', $2, $3, $4, $5, $6, $7, $8)",
        );
        on_tx!(tx, t => sqlx::query(insert)
            .bind(id.to_string()).bind(p.amount.to_string()).bind(&p.currency).bind(&p.token_card)
            .bind(&p.card_holder_email).bind(&p.card_holder_name).bind(&now).bind(&now)
            .execute(&mut **t).await.map(drop)?);
        if with_event {
            tx.enqueue(&msg).await?;
        }
        tx.commit().await?;
        Ok(Created::New(id))
    }

    async fn replay(&self, key: &str, request: &str) -> anyhow::Result<Created> {
        let row = on_db!(self, s => sqlx::query(self.sql(
            "SELECT request, payment_id FROM {s}payment_idempotency WHERE key = $1"))
            .bind(key).fetch_one(s.pool()).await
            .and_then(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?))))?;
        Ok(if row.0 == request {
            Created::Replay(row.1.parse()?)
        } else {
            Created::KeyReused
        })
    }

    /// The payment with this id, or `None` when there is none.
    pub async fn get(&self, id: Uuid) -> anyhow::Result<Option<Payment>> {
        let sql = format!("SELECT {COLUMNS} FROM {{s}}payments WHERE id = $1");
        let row = on_db!(self, s => sqlx::query(self.sql(&sql)).bind(id.to_string())
            .fetch_optional(s.pool()).await?
            .map(|r| payment_from_row(&r)).transpose()?);
        Ok(row)
    }

    /// Counts a decline; returns the declines so far.
    pub async fn record_decline(&self, id: Uuid, reason: &str) -> anyhow::Result<i64> {
        let now = Utc::now().to_rfc3339();
        if let AnyStore::MySql(s) = &self.0 {
            let mut tx = s.pool().begin().await?;
            let n = mysql_decline(&mut tx, id, reason, &now).await?;
            tx.commit().await?;
            return Ok(n.unwrap_or(0));
        }
        let n = on_db!(self, s => sqlx::query(self.sql(DECLINE))
            .bind(reason).bind(&now).bind(id.to_string())
            .fetch_optional(s.pool()).await?
            .map(|r| r.try_get::<i64, _>(0)).transpose()?);
        Ok(n.unwrap_or(0))
    }

    /// Moves a pending payment to `paid` or `rejected` and enqueues the matching event, in one
    /// transaction. A payment already finished is left alone and no event is written, so a
    /// duplicated delivery changes nothing.
    pub async fn finish(
        &self,
        event: &PaymentEvent,
        status: &str,
        counted_attempt: bool,
    ) -> anyhow::Result<bool> {
        let mut tx = self.0.begin().await?;
        let finished = self
            .finish_in(&mut Tx::from(tx.sql()), event, status, counted_attempt)
            .await?;
        tx.commit().await?;
        Ok(finished)
    }

    /// [`Db::finish`] in the caller's transaction.
    pub async fn finish_in(
        &self,
        tx: &mut Tx<'_>,
        event: &PaymentEvent,
        status: &str,
        counted_attempt: bool,
    ) -> anyhow::Result<bool> {
        let now = Utc::now().to_rfc3339();
        let kind = format!("payment.{status}");
        let msg = NewMessage::json(TOPIC, &kind, event)?.key(event.payment_id.to_string());
        let finished = on_db_tx!(self, tx, (s, t) => {
            let n = sqlx::query(self.sql(
                "UPDATE {s}payments SET status = $1, charge_id = $2, last_decline_reason = coalesce($3, last_decline_reason), \
                 attempts = attempts + $4, updated_at = $5 WHERE id = $6 AND status = 'pending'"))
                .bind(status).bind(&event.charge_id)
                .bind(&event.reason).bind(i64::from(counted_attempt)).bind(&now)
                .bind(event.payment_id.to_string())
                .execute(&mut ***t).await?.rows_affected();
            if n == 1 {
                s.outbox().enqueue(t, &msg).await?;
            }
            n == 1
        });
        Ok(finished)
    }

    /// The payment as the caller's transaction sees it.
    pub async fn get_in(&self, tx: &mut Tx<'_>, id: Uuid) -> anyhow::Result<Option<Payment>> {
        let sql = format!("SELECT {COLUMNS} FROM {{s}}payments WHERE id = $1");
        let row = on_db_tx!(self, tx, (_s, t) => sqlx::query(self.sql(&sql)).bind(id.to_string())
            .fetch_optional(&mut ***t).await?
            .map(|r| payment_from_row(&r)).transpose()?);
        Ok(row)
    }

    /// Counts a decline and schedules the next charge attempt as a new `payment.created`
    /// event, delivered after `retry_in`, in the caller's transaction: the retry is as durable
    /// as the decline. Returns the declines so far.
    pub async fn decline_in(
        &self,
        tx: &mut Tx<'_>,
        event: &PaymentEvent,
        reason: &str,
        retry_in: std::time::Duration,
    ) -> anyhow::Result<i64> {
        let now = Utc::now().to_rfc3339();
        let msg = NewMessage::json(TOPIC, "payment.created", event)?
            .key(event.payment_id.to_string())
            .delay(retry_in);
        if let (AnyStore::MySql(s), Tx::MySql(t)) = (&self.0, &mut *tx) {
            let n = mysql_decline(t, event.payment_id, reason, &now).await?;
            if n.is_some() {
                s.outbox().enqueue(t, &msg).await?;
            }
            return Ok(n.unwrap_or(0));
        }
        let n = on_db_tx!(self, tx, (s, t) => {
            let n = sqlx::query(self.sql(DECLINE))
                .bind(reason).bind(&now).bind(event.payment_id.to_string())
                .fetch_optional(&mut ***t).await?
                .map(|r| r.try_get::<i64, _>(0)).transpose()?;
            if n.is_some() {
                s.outbox().enqueue(t, &msg).await?;
            }
            n
        });
        Ok(n.unwrap_or(0))
    }
}

/// A transaction on the demo's database opened by someone else: the consumer's inbox
/// transaction, so the payment's changes commit together with the inbox record.
pub enum Tx<'a> {
    /// A PostgreSQL transaction.
    Postgres(&'a mut Transaction<'static, Postgres>),
    /// A SQLite transaction.
    Sqlite(&'a mut Transaction<'static, Sqlite>),
    /// A MySQL or MariaDB transaction.
    MySql(&'a mut Transaction<'static, MySql>),
}

impl<'a> From<&'a mut outbox_any::Tx> for Tx<'a> {
    fn from(tx: &'a mut outbox_any::Tx) -> Self {
        match tx {
            outbox_any::Tx::Postgres(t) => Tx::Postgres(t),
            outbox_any::Tx::Sqlite(t) => Tx::Sqlite(t),
            outbox_any::Tx::MySql(t) => Tx::MySql(t),
        }
    }
}

impl<'a> From<&'a mut Transaction<'static, MySql>> for Tx<'a> {
    fn from(tx: &'a mut Transaction<'static, MySql>) -> Self {
        Tx::MySql(tx)
    }
}

/// Counts a decline of a pending payment; returns the declines so far, or `None` when the
/// payment is not pending.
const DECLINE: &str = "UPDATE {s}payments SET attempts = attempts + 1, last_decline_reason = $1, \
     updated_at = $2 WHERE id = $3 AND status = 'pending' RETURNING attempts";

/// [`DECLINE`] on MySQL, which has no `UPDATE … RETURNING`: the count is read back in the same
/// transaction, under the row lock the update took.
async fn mysql_decline(
    tx: &mut Transaction<'static, MySql>,
    id: Uuid,
    reason: &str,
    now: &str,
) -> anyhow::Result<Option<i64>> {
    let sql = mysql_dialect(DECLINE.trim_end_matches(" RETURNING attempts"));
    let updated = sqlx::query(AssertSqlSafe(sql))
        .bind(reason)
        .bind(now)
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?
        .rows_affected();
    if updated == 0 {
        return Ok(None);
    }
    let n = sqlx::query_scalar("SELECT attempts FROM payments WHERE id = ?")
        .bind(id.to_string())
        .fetch_one(&mut **tx)
        .await?;
    Ok(Some(n))
}

impl<'a> From<&'a mut Transaction<'static, Postgres>> for Tx<'a> {
    fn from(tx: &'a mut Transaction<'static, Postgres>) -> Self {
        Tx::Postgres(tx)
    }
}

impl<'a> From<&'a mut Transaction<'static, Sqlite>> for Tx<'a> {
    fn from(tx: &'a mut Transaction<'static, Sqlite>) -> Self {
        Tx::Sqlite(tx)
    }
}

fn payment_from_row<R: Row>(r: &R) -> anyhow::Result<Payment>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let id: String = r.try_get("id")?;
    Ok(Payment {
        payment_id: id.parse()?,
        status: r.try_get("status")?,
        amount: r.try_get("amount")?,
        currency: r.try_get("currency")?,
        attempts: r.try_get("attempts")?,
        last_decline_reason: r.try_get("last_decline_reason")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        card_holder_email: r.try_get("card_holder_email")?,
        card_holder_name: r.try_get("card_holder_name")?,
    })
}

#[cfg(test)]
mod tests {
    use super::mysql_dialect;

    #[test]
    fn statements_read_in_mysqls_dialect() {
        assert_eq!(
            mysql_dialect(
                "INSERT INTO {s}payment_idempotency (key, request) VALUES ($1, $2) \
                 ON CONFLICT (key) DO NOTHING"
            ),
            "INSERT IGNORE INTO payment_idempotency (`key`, request) VALUES (?, ?)"
        );
        assert_eq!(
            mysql_dialect("SELECT a FROM {s}t WHERE key = $1 AND b = $10"),
            "SELECT a FROM t WHERE `key` = ? AND b = ?"
        );
    }
}
