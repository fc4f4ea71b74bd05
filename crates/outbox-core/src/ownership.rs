//! Partition ownership: how several relays share one outbox without racing for the same keys.
//!
//! Every message stores a partition ([`crate::partition_for`] of its key). A store that
//! supports ownership lets each live relay own a share of the [`PARTITIONS`]: a relay claims
//! keyed messages only in the partitions it owns, so for those keys it alone decides what is in
//! flight, and relays never walk over each other's keys. Unkeyed messages are claimable by every
//! relay.
//!
//! Shares follow rendezvous hashing over the live relays ([`assign`]), so a relay joining or
//! leaving moves only its own share. A relay gives up a partition only once it has nothing in
//! flight there, and another takes it only once it is given up (or its owner died, which a store
//! must detect by itself, e.g. with session locks): a key is never in delivery at two relays.

use std::sync::Arc;

use async_trait::async_trait;

use crate::partition::PARTITIONS;
use crate::store::StoreResult;

/// What a relay may claim after a rebalance.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// Partitions whose keyed messages this relay may claim, indexed by partition; `None`
    /// means all of them.
    pub claimable: Option<Arc<[bool]>>,
    /// Every partition has a live owner: a relay that finds nothing to claim in its own may
    /// conclude that the outbox holds nothing for it (drain mode).
    pub complete: bool,
    /// This relay owns exactly its share: no partition is still being handed over to or from
    /// it. Until then the relay rebalances often, so that a joining relay gets its share fast.
    pub settled: bool,
}

impl Assignment {
    /// Everything, for a store without ownership.
    pub fn all() -> Self {
        Self {
            claimable: None,
            complete: true,
            settled: true,
        }
    }

    /// Nothing yet (before the first rebalance, or after losing the ownership session).
    pub fn none() -> Self {
        Self {
            claimable: Some(vec![false; PARTITIONS as usize].into()),
            complete: false,
            settled: false,
        }
    }
}

/// A relay's membership in the set of live relays, and the partitions it owns.
#[async_trait]
pub trait Ownership: Send {
    /// Re-reads which relays are alive, takes the free partitions of this relay's share, gives
    /// up those outside its share for which `busy(partition)` is false, and says what the
    /// relay may claim now. An error means the membership is lost: the relay claims nothing
    /// keyed until a later call succeeds.
    async fn rebalance(&mut self, busy: &(dyn Fn(i32) -> bool + Sync)) -> StoreResult<Assignment>;
}

/// The share of `me` among `members` (member ids, `me` included): for each partition, the
/// member with the highest hash of (partition, member) owns it.
pub fn assign(members: &[i64], me: i64) -> Vec<bool> {
    (0..PARTITIONS as i32)
        .map(|p| members.iter().copied().max_by_key(|&m| score(p, m)) == Some(me))
        .collect()
}

fn score(partition: i32, member: i64) -> (u64, i64) {
    // SplitMix64 of the pair: cheap, well spread, and stable across releases and platforms.
    let mut z = (member as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(partition as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31), member)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_partition_once_and_are_balanced() {
        let members = [11, 42, 7, 99];
        let shares: Vec<_> = members.iter().map(|&m| assign(&members, m)).collect();
        for p in 0..PARTITIONS as usize {
            assert_eq!(shares.iter().filter(|s| s[p]).count(), 1, "partition {p}");
        }
        for s in &shares {
            let n = s.iter().filter(|&&b| b).count();
            assert!((180..=330).contains(&n), "unbalanced share of {n}");
        }
    }

    #[test]
    fn a_member_leaving_moves_only_its_own_share() {
        let before = [11, 42, 7];
        let after = [11, 42];
        for &m in &after {
            let (b, a) = (assign(&before, m), assign(&after, m));
            assert!(
                b.iter().zip(&a).all(|(b, a)| !b || *a),
                "member {m} lost a partition"
            );
        }
    }
}
