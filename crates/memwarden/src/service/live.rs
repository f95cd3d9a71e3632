//! The ledger's live allocations with running totals kept as they come and go: bytes and count
//! per owner and per purpose, each owner's last allocate or free, each owner's
//! non-persistent allocations in age order, and the allocations of each pool (so a
//! defragmentation pass reads its own pool's records, not every device's). Analytics reads these instead of walking every
//! record: at 100,000 live allocations the walk took 55 ms, the totals take microseconds
//! (`examples/scale_bench.rs`, docs/PERFORMANCE.md).
//!
//! Every insert and remove goes through [`LiveSet`], so the totals cannot miss one. Records
//! may be changed in place ([`LiveSet::get_mut`]: placement, address, generation, export
//! flags) but never in a field the totals are keyed on (owner, purpose, kind, bytes,
//! persistence, time); [`LiveSet::check`] recomputes the totals from the records and says where
//! they differ.

use super::{Allocation, LedgerError};
use memwarden_core::{DeviceId, MemoryKind};
use std::collections::{BTreeSet, HashMap};

/// An allocation's place in age order: its time (Unix ns) and the UUID its id spells.
type AgeKey = (i64, u128);

/// Running totals of one owner or purpose.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Group {
    /// Committed bytes (pool bytes; reservations commit none).
    pub bytes: u64,
    /// Allocations, reservations included.
    pub count: u64,
    /// The newest allocate or free of this group (Unix ns).
    pub last_active_ns: i64,
    /// Non-persistent allocations, oldest first (owners only).
    aging: BTreeSet<AgeKey>,
}

/// Groups by name; `None` is "not named".
#[derive(Debug, Default)]
struct Groups {
    named: HashMap<String, Group>,
    unnamed: Group,
}

impl Groups {
    fn entry(&mut self, name: Option<&str>) -> &mut Group {
        match name {
            None => &mut self.unnamed,
            // A lookup by `&str` first: the name is copied only for a group's first allocation.
            Some(n) => {
                if !self.named.contains_key(n) {
                    self.named.insert(n.to_string(), Group::default());
                }
                self.named.get_mut(n).expect("just inserted")
            }
        }
    }

    fn add(&mut self, name: Option<&str>, bytes: u64, age: Option<AgeKey>, now_ns: i64) {
        let g = self.entry(name);
        g.bytes += bytes;
        g.count += 1;
        g.last_active_ns = g.last_active_ns.max(now_ns);
        if let Some(k) = age {
            g.aging.insert(k);
        }
    }

    fn sub(&mut self, name: Option<&str>, bytes: u64, age: Option<AgeKey>, now_ns: i64) {
        let g = self.entry(name);
        g.bytes = g.bytes.saturating_sub(bytes);
        g.count = g.count.saturating_sub(1);
        g.last_active_ns = g.last_active_ns.max(now_ns);
        if let Some(k) = age {
            g.aging.remove(&k);
        }
        // A group with nothing left is forgotten (unique owner names must not pile up).
        if let (Some(n), 0) = (name, g.count) {
            self.named.remove(n);
        }
    }

    fn iter(&self) -> impl Iterator<Item = (Option<&str>, &Group)> {
        std::iter::once((None, &self.unnamed))
            .filter(|(_, g)| g.count > 0)
            .chain(self.named.iter().map(|(n, g)| (Some(n.as_str()), g)))
    }
}

/// The UUID an id spells (ids are hyphenated UUIDs), or 0.
pub(super) fn uuid_of(id: &str) -> u128 {
    uuid::Uuid::try_parse(id).map(|u| u.as_u128()).unwrap_or(0)
}

fn age_key(r: &Allocation) -> Option<AgeKey> {
    (!r.persistent).then(|| (r.allocated_at.unix_timestamp_nanos() as i64, uuid_of(&r.id)))
}

/// The live allocations and their running totals.
#[derive(Debug, Default)]
pub(super) struct LiveSet {
    records: HashMap<String, Allocation>,
    owners: Groups,
    purposes: Groups,
    /// The UUIDs of the allocations placed in each pool (reservations have no pool).
    pools: HashMap<(DeviceId, MemoryKind), std::collections::HashSet<u128>>,
}

/// One owner's or purpose's totals as analytics reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupTotals {
    pub name: Option<String>,
    pub bytes: u64,
    pub count: u64,
    pub last_active_ns: i64,
}

/// What analytics needs of the live allocations, read from the running totals.
#[derive(Debug, Default)]
pub struct LiveDigest {
    pub owners: Vec<GroupTotals>,
    pub purposes: Vec<GroupTotals>,
    /// Per owner, up to the asked number of its oldest non-persistent allocations made before
    /// the cutoff, oldest first.
    pub oldest: Vec<(Option<String>, Vec<Allocation>)>,
}

impl LiveSet {
    pub fn get(&self, id: &str) -> Option<&Allocation> {
        self.records.get(id)
    }

    /// For changes that leave the totals' keys alone (see the module doc).
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Allocation> {
        self.records.get_mut(id)
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.records.contains_key(id)
    }

    pub fn values(&self) -> impl Iterator<Item = &Allocation> {
        self.records.values()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// The UUIDs of the allocations placed in one pool, in no order (a copy of 16 bytes each:
    /// the caller looks the records up in chunks, not all under one lock).
    pub fn pool_members(&self, device: DeviceId, kind: MemoryKind) -> Vec<u128> {
        self.pools.get(&(device, kind)).map(|m| m.iter().copied().collect()).unwrap_or_default()
    }

    /// Adds a live allocation at `now_ns`. An id already live is replaced, its totals first
    /// taken out (ids are fresh UUIDs, so this does not happen; the totals stay right if it did).
    pub fn insert(&mut self, r: Allocation, now_ns: i64) {
        if self.records.contains_key(&r.id) {
            self.remove(&r.id.clone(), now_ns);
        }
        let bytes = r.committed_bytes();
        self.owners.add(r.owner.as_deref(), bytes, age_key(&r), now_ns);
        self.purposes.add(r.purpose.as_deref(), bytes, None, now_ns);
        if r.placement.is_some() {
            self.pools.entry((r.device, r.kind)).or_default().insert(uuid_of(&r.id));
        }
        self.records.insert(r.id.clone(), r);
    }

    /// Takes an allocation out at `now_ns`.
    pub fn remove(&mut self, id: &str, now_ns: i64) -> Option<Allocation> {
        let r = self.records.remove(id)?;
        let bytes = r.committed_bytes();
        self.owners.sub(r.owner.as_deref(), bytes, age_key(&r), now_ns);
        self.purposes.sub(r.purpose.as_deref(), bytes, None, now_ns);
        if r.placement.is_some() {
            if let Some(m) = self.pools.get_mut(&(r.device, r.kind)) {
                m.remove(&uuid_of(&r.id));
            }
        }
        Some(r)
    }

    /// The totals, and per owner its `per_owner` oldest non-persistent allocations made before
    /// `older_than_ns`. Costs the number of owners and purposes, not of allocations.
    pub fn digest(&self, older_than_ns: i64, per_owner: usize) -> LiveDigest {
        let totals = |groups: &Groups| -> Vec<GroupTotals> {
            groups
                .iter()
                .map(|(n, g)| GroupTotals {
                    name: n.map(str::to_string),
                    bytes: g.bytes,
                    count: g.count,
                    last_active_ns: g.last_active_ns,
                })
                .collect()
        };
        let oldest = self
            .owners
            .iter()
            .filter_map(|(n, g)| {
                let old: Vec<Allocation> = g
                    .aging
                    .iter()
                    .take_while(|(at, _)| *at < older_than_ns)
                    .take(per_owner)
                    .filter_map(|(_, u)| self.records.get(&uuid::Uuid::from_u128(*u).to_string()).cloned())
                    .collect();
                (!old.is_empty()).then(|| (n.map(str::to_string), old))
            })
            .collect();
        LiveDigest { owners: totals(&self.owners), purposes: totals(&self.purposes), oldest }
    }

    /// Recomputes the totals from the records: an error names the first group that differs.
    pub fn check(&self) -> Result<(), LedgerError> {
        let mut owners = Groups::default();
        let mut purposes = Groups::default();
        let mut pools: HashMap<(DeviceId, MemoryKind), std::collections::HashSet<u128>> = HashMap::new();
        for r in self.records.values() {
            if r.placement.is_some() {
                pools.entry((r.device, r.kind)).or_default().insert(uuid_of(&r.id));
            }
            let bytes = r.committed_bytes();
            owners.add(r.owner.as_deref(), bytes, age_key(r), 0);
            purposes.add(r.purpose.as_deref(), bytes, None, 0);
        }
        let kept_pools: HashMap<_, _> = self.pools.iter().filter(|(_, m)| !m.is_empty()).collect();
        if kept_pools.len() != pools.len() || pools.iter().any(|(k, m)| kept_pools.get(k) != Some(&m)) {
            return Err(LedgerError::Totals {
                what: "pool",
                group: "index".into(),
                detail: "the per-pool index differs from the records' placements".into(),
            });
        }
        for (what, kept, fresh) in [("owner", &self.owners, &owners), ("purpose", &self.purposes, &purposes)] {
            let shape = |g: &Groups| -> Vec<(Option<String>, u64, u64, Vec<AgeKey>)> {
                let mut v: Vec<_> = g
                    .iter()
                    .map(|(n, g)| (n.map(str::to_string), g.bytes, g.count, g.aging.iter().copied().collect()))
                    .collect();
                v.sort();
                v
            };
            let (kept, fresh) = (shape(kept), shape(fresh));
            if kept != fresh {
                let differs = kept
                    .iter()
                    .zip(&fresh)
                    .find(|(a, b)| a != b)
                    .map(|(a, _)| a.0.clone().unwrap_or_else(|| "(none)".into()))
                    .unwrap_or_else(|| "a group present on one side only".into());
                return Err(LedgerError::Totals {
                    what,
                    group: differs,
                    detail: format!("the running totals hold {} groups, a recount {}", kept.len(), fresh.len()),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::AllocationRecord;
    use memwarden_core::DeviceId;
    use proptest::prelude::*;
    use std::sync::Arc;
    use time::OffsetDateTime;

    fn record(i: u64, owner: Option<&str>, purpose: Option<&str>, kind: MemoryKind, persistent: bool) -> Allocation {
        Arc::new(AllocationRecord {
            id: uuid::Uuid::from_u128(u128::from(i) + 1).to_string(),
            device: DeviceId::Cpu,
            kind,
            size_bytes: 1000 + i,
            allocated_bytes: 1024 + i,
            alignment_bytes: 256,
            address: None,
            placement: None,
            purpose: purpose.map(str::to_string),
            owner: owner.map(str::to_string),
            owner_pid: None,
            owner_client: None,
            persistent,
            movable: true,
            exported: false,
            generation: 0,
            allocated_at: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(i as i64),
        })
    }

    #[test]
    fn totals_follow_inserts_and_removes() {
        let mut set = LiveSet::default();
        set.insert(record(1, Some("a"), Some("kv"), MemoryKind::Host, false), 10);
        set.insert(record(2, Some("a"), None, MemoryKind::Reservation, false), 20);
        set.insert(record(3, None, Some("kv"), MemoryKind::Host, true), 30);
        let d = set.digest(i64::MAX, 10);
        let a = d.owners.iter().find(|g| g.name.as_deref() == Some("a")).expect("a");
        // The reservation is counted but commits no bytes.
        assert_eq!((a.bytes, a.count, a.last_active_ns), (1025, 2, 20));
        let kv = d.purposes.iter().find(|g| g.name.as_deref() == Some("kv")).expect("kv");
        assert_eq!((kv.bytes, kv.count), (1025 + 1027, 2));
        // The persistent allocation is never a leak candidate; a's two are, oldest first.
        let a_old = &d.oldest.iter().find(|(n, _)| n.as_deref() == Some("a")).expect("a's").1;
        assert_eq!(a_old.iter().map(|r| r.size_bytes).collect::<Vec<_>>(), vec![1001, 1002]);
        assert!(d.oldest.iter().all(|(n, _)| n.is_some()));
        // The cutoff and the per-owner limit hold.
        let cut = set.digest(2_000_000_000, 10);
        assert_eq!(cut.oldest[0].1.len(), 1);
        assert_eq!(set.digest(i64::MAX, 1).oldest[0].1.len(), 1);
        // Removing the last of an owner forgets it; the removal counts as activity.
        let id1 = uuid::Uuid::from_u128(2).to_string();
        assert!(set.remove(&id1, 40).is_some());
        let a = set.digest(i64::MAX, 10).owners.into_iter().find(|g| g.name.as_deref() == Some("a")).expect("a");
        assert_eq!((a.bytes, a.count, a.last_active_ns), (0, 1, 40));
        set.remove(&uuid::Uuid::from_u128(3).to_string(), 50);
        assert!(set.digest(i64::MAX, 10).owners.iter().all(|g| g.name.as_deref() != Some("a")));
        set.check().expect("totals = records");
    }

    #[test]
    fn an_id_inserted_twice_is_counted_once() {
        let mut set = LiveSet::default();
        set.insert(record(1, Some("a"), None, MemoryKind::Host, false), 0);
        set.insert(record(1, Some("b"), None, MemoryKind::Host, false), 1);
        assert_eq!(set.len(), 1);
        set.check().expect("totals = records");
        let owners = set.digest(i64::MAX, 10).owners;
        assert_eq!(owners.iter().map(|g| (g.name.clone(), g.count)).collect::<Vec<_>>(), vec![(Some("b".into()), 1)]);
    }

    #[test]
    fn a_change_behind_the_totals_back_is_caught() {
        let mut set = LiveSet::default();
        set.insert(record(1, Some("a"), None, MemoryKind::Host, false), 0);
        let id = uuid::Uuid::from_u128(2).to_string();
        Arc::make_mut(set.get_mut(&id).expect("live")).owner = Some("b".into());
        let e = set.check().expect_err("the owner changed without the totals");
        assert!(e.to_string().contains("owner"), "{e}");
    }

    proptest! {
        /// Any sequence of inserts and removes leaves totals equal to a recount of the records.
        #[test]
        fn totals_equal_a_recount(ops in prop::collection::vec((0u64..40, 0usize..3, 0usize..3, any::<bool>(), any::<bool>()), 1..200)) {
            let mut set = LiveSet::default();
            let owners = [None, Some("x"), Some("y")];
            let purposes = [None, Some("p"), Some("q")];
            for (i, (n, o, p, persistent, reserve)) in ops.into_iter().enumerate() {
                let id = uuid::Uuid::from_u128(u128::from(n) + 1).to_string();
                if set.contains_key(&id) {
                    set.remove(&id, i as i64);
                } else {
                    let kind = if reserve { MemoryKind::Reservation } else { MemoryKind::Host };
                    set.insert(record(n, owners[o], purposes[p], kind, persistent), i as i64);
                }
                prop_assert!(set.check().is_ok());
            }
            let d = set.digest(i64::MAX, usize::MAX);
            let counted: u64 = d.owners.iter().map(|g| g.count).sum();
            prop_assert_eq!(counted as usize, set.len());
        }
    }
}
