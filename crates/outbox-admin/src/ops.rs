//! The operator's commands, shared by `outbox status` / `outbox dead` and the admin API: each
//! takes the store, does one thing, and returns data that the CLI prints and the API serves.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use outbox_core::{DeadFilter, Message, Status, StatusCounts, Store, redact};
use serde::Serialize;
use uuid::Uuid;

use crate::Error;

/// The largest page of dead letters one call returns.
pub const MAX_PAGE: usize = 1000;

/// The counts of `outbox status`.
pub async fn status(store: &dyn Store) -> Result<StatusCounts, Error> {
    Ok(store.status().await?)
}

/// `outbox status` as text, one count a line.
pub fn status_text(s: &StatusCounts) -> String {
    let oldest = match s.oldest_pending_age_seconds {
        Some(age) => format!("{age:.1}s"),
        None => "-".into(),
    };
    format!(
        "pending    {}\nin_flight  {}\ndelivered  {}\ndead       {}\noldest pending  {oldest}\n",
        s.pending, s.in_flight, s.delivered, s.dead
    )
}

/// A dead letter as operators see it: its error without credentials, its payload as JSON when
/// it is JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadEntry {
    /// The message's id.
    pub id: Uuid,
    /// The message's topic.
    pub topic: String,
    /// The message type.
    #[serde(rename = "type")]
    pub message_type: String,
    /// The ordering key, if the message has one.
    pub key: Option<String>,
    /// Delivery attempts made before it went dead.
    pub attempts: i32,
    /// The error of the last attempt, credentials removed.
    pub last_error: Option<String>,
    /// The payload: JSON as is when the content type is JSON, else the bytes as (lossy UTF-8)
    /// text.
    pub payload: serde_json::Value,
    /// The message's headers.
    pub headers: BTreeMap<String, String>,
    /// When the message was enqueued.
    pub created_at: DateTime<Utc>,
}

impl DeadEntry {
    /// The operator's view of the dead message `m`.
    pub fn new(m: &Message) -> Self {
        Self {
            id: m.id,
            topic: m.topic.clone(),
            message_type: m.message_type.clone(),
            key: m.key.clone(),
            attempts: m.attempts,
            // Errors stored before they were redacted at the source may still hold credentials.
            last_error: m.last_error.as_deref().map(redact),
            payload: m.payload_value(),
            headers: m.headers.clone(),
            created_at: m.created_at,
        }
    }

    /// One line of `outbox dead list`.
    pub fn line(&self) -> String {
        format!(
            "{}  {}  {}  key={}  attempts={}  error={}",
            self.id,
            self.topic,
            self.message_type,
            self.key.as_deref().unwrap_or("-"),
            self.attempts,
            self.last_error.as_deref().unwrap_or("-")
        )
    }
}

/// A page of dead letters; `next` is the `after` of the following page, `None` on the last.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadPage {
    /// The dead letters of this page, oldest first.
    pub items: Vec<DeadEntry>,
    /// The `after` that fetches the next page; `None` on the last one.
    pub next: Option<Uuid>,
}

/// Dead letters matching `filter`, oldest first, after `after`, at most `limit`
/// (1 to [`MAX_PAGE`]).
pub async fn dead_list(
    store: &dyn Store,
    filter: &DeadFilter,
    after: Option<Uuid>,
    limit: usize,
) -> Result<DeadPage, Error> {
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Error::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}, not {limit}"
        )));
    }
    // One more than asked tells whether another page follows.
    let mut found = store.dead_page(filter, after, limit + 1).await?;
    let more = found.len() > limit;
    found.truncate(limit);
    let next = more.then(|| found.last().map(|m| m.id)).flatten();
    Ok(DeadPage {
        items: found.iter().map(DeadEntry::new).collect(),
        next,
    })
}

/// One dead letter, with its payload and headers.
pub async fn dead_show(store: &dyn Store, id: Uuid) -> Result<DeadEntry, Error> {
    match store.get_message(id).await? {
        Some(m) if m.status == Status::Dead => Ok(DeadEntry::new(&m)),
        _ => Err(Error::NotFound(id)),
    }
}

/// Which dead letters a retry or purge acts on. There is no default: "everything" is said
/// explicitly, so that a forgotten filter cannot empty the dead-letter table.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// Every dead letter.
    All,
    /// The dead letters with these ids; ids that are not dead are skipped.
    Ids(Vec<Uuid>),
    /// The dead letters that match the filter.
    Matching(DeadFilter),
}

impl Selection {
    fn filter(&self) -> DeadFilter {
        match self {
            Selection::All => DeadFilter::default(),
            Selection::Ids(ids) => DeadFilter::ids(ids.clone()),
            Selection::Matching(f) => f.clone(),
        }
    }
}

/// What a retry did: how many messages are pending again, of how many ids asked for, and
/// notes on the order of their keys.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retried {
    /// How many messages are pending again.
    pub retried: u64,
    /// How many ids the selection named (`None`: a filter or all).
    pub asked: Option<usize>,
    /// Warnings for keys whose later messages were delivered while a retried one was dead: it now
    /// goes out after them.
    pub notes: Vec<String>,
}

impl Retried {
    /// The error of a retry by ids that found some of them not dead.
    pub fn incomplete(&self) -> Option<String> {
        let asked = self.asked?;
        (usize::try_from(self.retried).unwrap_or(usize::MAX) < asked).then(|| {
            format!(
                "{} of {asked} messages retried; the others are not dead (or do not exist)",
                self.retried
            )
        })
    }
}

/// Makes the selected dead letters pending again with a fresh attempt count.
pub async fn dead_retry(store: &dyn Store, selection: &Selection) -> Result<Retried, Error> {
    let (ids, asked) = match selection {
        Selection::Ids(ids) if ids.is_empty() => {
            return Err(Error::BadRequest("no ids to retry".into()));
        }
        Selection::Ids(ids) => (Some(ids.as_slice()), Some(ids.len())),
        Selection::All => (None, None),
        Selection::Matching(_) => (None, None),
    };
    // Order notes are per key of the retried messages; a filter's keys are not known before.
    let notes = match selection {
        Selection::Matching(_) => Vec::new(),
        _ => order_notes(store, ids).await?,
    };
    let retried = store.dead_retry_where(&selection.filter()).await?;
    Ok(Retried {
        retried,
        asked,
        notes,
    })
}

/// Deletes the selected dead letters; returns how many.
pub async fn dead_purge(store: &dyn Store, selection: &Selection) -> Result<u64, Error> {
    if matches!(selection, Selection::Ids(ids) if ids.is_empty()) {
        return Err(Error::BadRequest("no ids to purge".into()));
    }
    Ok(store.dead_purge_where(&selection.filter()).await?)
}

/// A retried dead message goes out after the later messages of its key that were delivered
/// while it was dead: one note per key, so the operator knows before consumers do.
async fn order_notes(store: &dyn Store, ids: Option<&[Uuid]>) -> Result<Vec<String>, Error> {
    Ok(store
        .delivered_after_dead(ids)
        .await?
        .into_iter()
        .map(|(key, later)| {
            if later > 0 {
                format!(
                    "warning: key {key:?}: {later} later message(s) were delivered while it was dead; \
                     the retried message(s) will reach consumers after them, out of order"
                )
            } else {
                format!(
                    "note: key {key:?}: no later delivered message is kept; if the relay deletes \
                     delivered messages (no --retention), those delivered while it was dead are \
                     ahead of the retried one(s)"
                )
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text_matches_the_cli() {
        let s = StatusCounts {
            pending: 3,
            in_flight: 1,
            delivered: 0,
            dead: 2,
            oldest_pending_age_seconds: Some(1.5),
        };
        assert_eq!(
            status_text(&s),
            "pending    3\nin_flight  1\ndelivered  0\ndead       2\noldest pending  1.5s\n"
        );
    }

    #[test]
    fn a_retry_by_ids_that_missed_some_says_so() {
        let r = Retried {
            retried: 1,
            asked: Some(2),
            notes: vec![],
        };
        assert!(
            r.incomplete()
                .unwrap()
                .starts_with("1 of 2 messages retried")
        );
        let all = Retried { asked: None, ..r };
        assert!(all.incomplete().is_none());
    }
}
