//! What a claim asks for and how a claimed backlog becomes a batch: runs of each key, cut where
//! order would break, delivered in waves that never hold two messages of one key.
//!
//! A store's claim query returns *candidates*: the head of each key it found (the key's oldest
//! undelivered message) and the messages that follow it, plus unkeyed messages. [`pick`] turns
//! them into the batch the relay delivers, with the same rules for every store:
//!
//! - a key whose message is in delivery at this relay gets nothing (a writer whose transaction
//!   committed late can make an older message of a busy key visible: it waits for its turn);
//! - a key's run stops before its first message that is not due yet (delayed, backing off, or
//!   leased to another relay), so nothing overtakes it;
//! - a message whose last delivery never finished (the relay died or lost its session during
//!   it) is delivered alone, so that a message that kills its relay takes only itself down and
//!   goes dead after `max_attempts`, while the rest of its old batch is delivered. It is
//!   claimed only when nothing else is in delivery at the relay (never by a claim ahead), so
//!   that a crash it causes counts against no innocent neighbour over and over: a message in
//!   delivery beside it at most once, since after that it is interrupted too.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::time::Duration;

use crate::message::Message;

/// What a relay asks a store for.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    /// Names a leased claim's owner.
    pub relay: &'a str,
    /// At most this many messages.
    pub limit: usize,
    /// How long the claim is the relay's: the lease, or the idle timeout of a held claim.
    pub lease: Duration,
    /// The relay still has batches in delivery: the store may look at the head of the
    /// backlog only. Without it the store looks further back whenever the head holds nothing
    /// claimable, so nothing waits forever.
    pub ahead: bool,
    /// The partitions whose keyed messages this relay may claim, indexed by partition
    /// (`None`: all). Unkeyed messages are claimable by every relay.
    pub partitions: Option<&'a [bool]>,
    /// Keys with a message in delivery at this relay: none of their messages is claimed.
    pub busy_keys: Option<&'a HashSet<String>>,
    /// The claim stops before the message whose payload would take the batch's total past
    /// this many bytes, but always takes one (`usize::MAX`: no bound).
    pub max_bytes: usize,
}

impl<'a> ClaimRequest<'a> {
    /// A claim of everything claimable, by `relay`.
    pub fn new(relay: &'a str, limit: usize, lease: Duration) -> Self {
        Self {
            relay,
            limit,
            lease,
            ahead: false,
            partitions: None,
            busy_keys: None,
            max_bytes: usize::MAX,
        }
    }

    /// How many rows of the ready order a claim looks at: a batch's worth, and three while
    /// batches are in delivery, whose rows fill the front of the ready order.
    pub fn scan_window(&self) -> usize {
        self.limit
            .saturating_mul(if self.ahead { 3 } else { 1 })
            .max(1)
    }

    fn busy(&self, key: &str) -> bool {
        self.busy_keys.is_some_and(|k| k.contains(key))
    }
}

/// One row a claim query returned.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The message as the store read it.
    pub message: Message,
    /// Deliverable now (by the store's clock): not delayed, not backing off, not leased.
    pub due: bool,
    /// Its last delivery never recorded an outcome.
    pub interrupted: bool,
}

/// Turns a claim's candidates into the batch to deliver (see the module docs), ordered in
/// waves: the first message of each key and the unkeyed ones, then each key's second, and so
/// on, oldest first within a wave. Past `limit`, the last waves are cut.
pub fn pick(mut candidates: Vec<Candidate>, req: &ClaimRequest<'_>) -> Vec<Message> {
    candidates.sort_by_key(|c| c.message.seq);
    let mut stopped: HashSet<String> = HashSet::new();
    let mut kept: Vec<Candidate> = Vec::with_capacity(candidates.len());
    for c in candidates {
        // A suspect waits for a claim with nothing else in delivery (see the module docs).
        let due = c.due && !(c.interrupted && req.ahead);
        if let Some(key) = &c.message.key {
            if stopped.contains(key) {
                continue;
            }
            if !due || req.busy(key) {
                stopped.insert(key.clone());
                continue;
            }
        } else if !due {
            continue;
        }
        kept.push(c);
    }
    if let Some(first) = kept.iter().position(|c| c.interrupted) {
        let key = kept[first].message.key.clone();
        let alone = match key {
            Some(k) => kept
                .iter()
                .position(|c| c.message.key.as_deref() == Some(&k))
                .unwrap_or(first),
            None => first,
        };
        return vec![kept.swap_remove(alone).message];
    }
    let mut batch = in_waves(kept.into_iter().map(|c| c.message).collect());
    // Cut in wave order: every key keeps its head, and runs share the rest. Any prefix of
    // the waves keeps each key's messages in order, so the byte budget cuts the same way.
    batch.truncate(req.limit);
    batch.truncate(within_budget(&batch, req.max_bytes));
    batch
}

/// How many of the batch's first messages fit in `max_bytes` of payload; at least one, so
/// that no message is too big to be claimed.
fn within_budget(batch: &[Message], max_bytes: usize) -> usize {
    let mut total = 0usize;
    batch
        .iter()
        .position(|m| {
            total = total.saturating_add(m.payload.len());
            total > max_bytes
        })
        .unwrap_or(batch.len())
        .max(1)
}

/// Orders messages (sorted by `seq`) in waves.
fn in_waves(messages: Vec<Message>) -> Vec<Message> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut ranked: Vec<(usize, Message)> = messages
        .into_iter()
        .map(|m| {
            let wave = m.key.as_ref().map_or(0, |k| {
                let n = seen.entry(k.clone()).or_default();
                *n += 1;
                *n - 1
            });
            (wave, m)
        })
        .collect();
    // A stable sort keeps `seq` order within each wave.
    ranked.sort_by_key(|(wave, _)| *wave);
    ranked.into_iter().map(|(_, m)| m).collect()
}

/// Splits a batch into consecutive waves with at most one message per key each: a new wave
/// starts where a key repeats. Any order is safe; [`pick`]'s order gives the fewest waves.
pub fn waves(batch: &[Message]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut keys: HashSet<&str> = HashSet::new();
    for (i, m) in batch.iter().enumerate() {
        if let Some(k) = m.key.as_deref()
            && !keys.insert(k)
        {
            out.push(start..i);
            start = i;
            keys.clear();
            keys.insert(k);
        }
    }
    if start < batch.len() {
        out.push(start..batch.len());
    }
    out
}

/// A claim's head as a store reads it: seq, key and payload size.
pub type Head = (i64, Option<String>, i64);

/// Keeps the heads, in seq order, whose payloads fit in `max_bytes` (always the first, as
/// [`pick`] does); returns the bytes they hold. For stores that read heads before their rows.
pub fn keep_within_budget(heads: &mut Vec<Head>, max_bytes: usize) -> usize {
    heads.sort_by_key(|h| h.0);
    let mut used = 0usize;
    let mut keep = 0;
    for (i, h) in heads.iter().enumerate() {
        let next = used.saturating_add(usize::try_from(h.2).unwrap_or(0));
        if i > 0 && next > max_bytes {
            break;
        }
        used = next;
        keep = i + 1;
    }
    heads.truncate(keep);
    used
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Status;
    use chrono::Utc;
    use uuid::Uuid;

    fn cand(seq: i64, key: Option<&str>) -> Candidate {
        Candidate {
            message: Message {
                id: Uuid::now_v7(),
                seq,
                topic: "t".into(),
                message_type: "e".into(),
                key: key.map(str::to_owned),
                partition: 0,
                payload: Default::default(),
                content_type: crate::JSON.into(),
                headers: Default::default(),
                created_at: Utc::now(),
                available_at: Utc::now(),
                attempts: 1,
                last_error: None,
                status: Status::Pending,
            },
            due: true,
            interrupted: false,
        }
    }

    fn seqs(batch: &[Message]) -> Vec<i64> {
        batch.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn runs_go_out_in_waves_oldest_first() {
        let c = vec![
            cand(5, Some("b")),
            cand(1, Some("a")),
            cand(2, Some("a")),
            cand(3, None),
            cand(4, Some("a")),
        ];
        let batch = pick(c, &ClaimRequest::new("r", 10, Duration::ZERO));
        assert_eq!(seqs(&batch), [1, 3, 5, 2, 4]);
        let w: Vec<_> = waves(&batch).into_iter().map(|r| seqs(&batch[r])).collect();
        assert_eq!(w, [vec![1, 3, 5], vec![2], vec![4]]);
    }

    #[test]
    fn a_run_stops_before_its_first_message_not_due() {
        let mut late = cand(2, Some("a"));
        late.due = false;
        let c = vec![cand(1, Some("a")), late, cand(3, Some("a")), cand(4, None)];
        let batch = pick(c, &ClaimRequest::new("r", 10, Duration::ZERO));
        assert_eq!(seqs(&batch), [1, 4]);
    }

    #[test]
    fn busy_keys_get_nothing() {
        let busy: HashSet<String> = ["a".to_owned()].into();
        let req = ClaimRequest {
            busy_keys: Some(&busy),
            ..ClaimRequest::new("r", 10, Duration::ZERO)
        };
        let c = vec![cand(1, Some("a")), cand(2, Some("b")), cand(3, Some("a"))];
        assert_eq!(seqs(&pick(c, &req)), [2]);
    }

    #[test]
    fn an_interrupted_message_goes_alone_behind_its_key() {
        let mut poison = cand(3, Some("a"));
        poison.interrupted = true;
        let c = vec![
            cand(1, None),
            cand(2, Some("a")),
            poison,
            cand(4, Some("b")),
        ];
        // The key's first message in the batch goes first, alone.
        assert_eq!(
            seqs(&pick(c, &ClaimRequest::new("r", 10, Duration::ZERO))),
            [2]
        );
    }

    #[test]
    fn a_claim_ahead_leaves_interrupted_messages_and_their_keys() {
        let interrupted = |seq, key| {
            let mut c = cand(seq, key);
            c.interrupted = true;
            c
        };
        let c = vec![
            interrupted(1, None),
            interrupted(2, Some("a")),
            cand(3, Some("a")),
            cand(4, Some("b")),
            cand(5, None),
        ];
        let req = ClaimRequest {
            ahead: true,
            ..ClaimRequest::new("r", 10, Duration::ZERO)
        };
        assert_eq!(seqs(&pick(c, &req)), [4, 5]);
    }

    #[test]
    fn the_byte_budget_cuts_in_waves_and_keeps_at_least_one() {
        let sized = |seq, key, len| {
            let mut c = cand(seq, key);
            c.message.payload = vec![0u8; len].into();
            c
        };
        let c = || {
            vec![
                sized(1, Some("a"), 10),
                sized(2, Some("a"), 10),
                sized(3, Some("b"), 10),
                sized(4, Some("a"), 10),
            ]
        };
        let budget = |max_bytes| ClaimRequest {
            max_bytes,
            ..ClaimRequest::new("r", 10, Duration::ZERO)
        };
        assert_eq!(seqs(&pick(c(), &budget(30))), [1, 3, 2]);
        assert_eq!(seqs(&pick(c(), &budget(29))), [1, 3]);
        assert_eq!(seqs(&pick(c(), &budget(1))), [1]);
        assert_eq!(seqs(&pick(c(), &budget(usize::MAX))), [1, 3, 2, 4]);
    }

    #[test]
    fn the_limit_cuts_in_waves_so_keys_share_the_batch() {
        let c = (1..=6)
            .map(|i| cand(i, Some(if i % 2 == 0 { "a" } else { "b" })))
            .collect();
        let batch = pick(c, &ClaimRequest::new("r", 3, Duration::ZERO));
        assert_eq!(seqs(&batch), [1, 2, 3]);
        // A hot key's long run does not crowd out another key's second message.
        let mut c: Vec<_> = (1..=8).map(|i| cand(i, Some("hot"))).collect();
        c.push(cand(9, Some("cold")));
        c.push(cand(10, Some("cold")));
        let batch = pick(c, &ClaimRequest::new("r", 4, Duration::ZERO));
        assert_eq!(seqs(&batch), [1, 9, 2, 10]);
    }
}
