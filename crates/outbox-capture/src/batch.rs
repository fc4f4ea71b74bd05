//! A batch streamed from the slot, in the relay's one [`Batch`] contract: the messages that go
//! to the sink now, and what the stream decided for the others of its transactions.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use outbox_core::{Batch, Message, Outcome, StoreResult, Unsettled, async_trait};
use outbox_postgres::PgStore;
use outbox_postgres::capture::WriteBack;
use uuid::Uuid;

use crate::relay::CaptureStats;

/// Settling it writes to the table, in one statement, every message that was not delivered
/// (failed, delayed, behind its key, replayed after a crash) and removes the captured rows that
/// were; the relay confirms the slot past the batch only after that.
pub(crate) struct LogBatch {
    store: PgStore,
    stats: Arc<CaptureStats>,
    /// Every message of the batch, in commit order.
    all: Vec<Message>,
    /// What the stream decided before any delivery, by id.
    decided: HashMap<Uuid, WriteBack>,
    /// The messages for the sink now: their first attempt.
    deliver: Vec<Message>,
    /// Ids of the messages read from captured rows (table capture).
    rows: Vec<Uuid>,
}

impl LogBatch {
    pub(crate) fn new(store: PgStore, stats: Arc<CaptureStats>) -> Self {
        Self {
            store,
            stats,
            all: Vec::new(),
            decided: HashMap::new(),
            deliver: Vec::new(),
            rows: Vec::new(),
        }
    }

    /// Adds the next message: for the sink when `decided` is `None`, else straight to the
    /// table as decided.
    pub(crate) fn push(&mut self, message: &Message, row: bool, decided: Option<WriteBack>) {
        if row {
            self.rows.push(message.id);
        }
        match decided {
            Some(w) => {
                self.decided.insert(message.id, w);
            }
            None => {
                let mut m = message.clone();
                m.attempts = 1;
                self.deliver.push(m);
            }
        }
        self.all.push(message.clone());
    }

    /// What goes to the table for a message the sink did not take.
    fn written_back(outcome: &Outcome<'_>) -> HashMap<Uuid, WriteBack> {
        let now = Utc::now();
        let mut out: HashMap<Uuid, WriteBack> = outcome
            .left
            .iter()
            .map(|&id| (id, WriteBack::Waiting))
            .collect();
        for f in outcome.failures {
            let back = match f.retry_in {
                Some(delay) => WriteBack::Retry {
                    at: now + chrono::Duration::from_std(delay).unwrap_or_default(),
                    error: f.error.clone(),
                },
                None => WriteBack::Dead {
                    error: f.error.clone(),
                },
            };
            out.insert(f.id, back);
        }
        out
    }
}

#[async_trait]
impl Batch for LogBatch {
    fn messages(&self) -> &[Message] {
        &self.deliver
    }

    /// On error nothing is confirmed, and the next session replays the batch from the slot.
    async fn settle(self: Box<Self>, outcome: &Outcome<'_>) -> Result<(), Unsettled> {
        let mut this = self;
        let mut back = Self::written_back(outcome);
        back.extend(std::mem::take(&mut this.decided));
        let rows: Vec<(&Message, WriteBack)> = this
            .all
            .iter()
            .filter_map(|m| back.remove(&m.id).map(|w| (m, w)))
            .collect();
        let handed: std::collections::HashSet<Uuid> = rows.iter().map(|(m, _)| m.id).collect();
        let (delivered, handed_rows): (Vec<Uuid>, Vec<Uuid>) = std::mem::take(&mut this.rows)
            .into_iter()
            .partition(|id| !handed.contains(id));
        this.store
            .settle_captured(&delivered, &handed_rows, &rows, outcome.retention)
            .await
            .map_err(|error| Unsettled { error, retry: None })?;
        this.stats.count(this.all.len(), &rows);
        Ok(())
    }

    /// Nothing to give back: the slot is confirmed only past settled batches, so the next
    /// session streams these messages again.
    async fn release(self: Box<Self>) -> StoreResult<()> {
        Ok(())
    }
}
