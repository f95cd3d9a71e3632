//! Quotas (`[[quotas]]`): per-owner byte limits per device and memory kind, and the owners
//! listing.
//!
//! An allocation whose owner has a quota covering its device and kind is charged before its
//! pool is asked, in the books under their lock, so two requests cannot both take the last room.
//! The charge is settled when the allocation is recorded, and given back when placement fails.
//! A free gives the bytes back in the same step that drops the record. Bytes are what the pool
//! gives (`allocated_bytes`: the request rounded up to the pool's granularity; a reservation's
//! own size), so a quota bounds the memory an owner actually holds.

use super::{Allocation, LedgerError, ServiceError};
use crate::config::quotas::{QuotaEntry, QuotaRule};
use crate::config::ConfigError;
use crate::sync::lock;
use memwarden_core::units::align_up;
use memwarden_core::{DeviceId, MemoryKind, GRANULARITY_BYTES};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// The quotas part of the service. Owns the configured `[[quotas]]` rules (fixed once set) and
/// the books of what each owner with a quota holds under them, behind their own lock. The
/// service charges an allocation here before placing it, and settles, abandons or gives the
/// bytes back as the allocation is recorded, fails or is freed: those steps run under the
/// ledger's lock, so the books lock comes after the ledger's and the books always match the
/// ledger's records (`Quotas::check`).
#[derive(Default)]
pub(crate) struct Quotas {
    rules: QuotaRules,
    books: Mutex<QuotaBooks>,
}

/// The configured quotas (fixed at start), indexed by owner: an allocation whose owner has none
/// costs one hash lookup, and nothing when no quota is configured.
#[derive(Debug, Default)]
pub(crate) struct QuotaRules {
    rules: Vec<QuotaRule>,
    /// Owner → its slot (in `owners` and the books) and the indexes of its rules.
    by_owner: HashMap<String, (usize, Vec<usize>)>,
    /// Slot → owner.
    owners: Vec<String>,
}

impl QuotaRules {
    fn new(rules: Vec<QuotaRule>) -> Self {
        let mut by_owner: HashMap<String, (usize, Vec<usize>)> = HashMap::new();
        let mut owners = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let (_, of_owner) = by_owner.entry(r.owner.clone()).or_insert_with(|| {
                owners.push(r.owner.clone());
                (owners.len() - 1, Vec::new())
            });
            of_owner.push(i);
        }
        QuotaRules { rules, by_owner, owners }
    }

    /// `owner`'s slot, when a quota of it covers bytes on `device` of `kind`.
    fn slot(&self, owner: Option<&str>, device: DeviceId, kind: MemoryKind) -> Option<usize> {
        let (slot, of_owner) = self.by_owner.get(owner.filter(|_| !self.rules.is_empty())?)?;
        of_owner.iter().any(|&i| self.rules[i].covers(device, kind)).then_some(*slot)
    }

    /// The quotas of the owner in `slot` that cover bytes on `device` of `kind`.
    fn covering(&self, slot: usize, device: DeviceId, kind: MemoryKind) -> impl Iterator<Item = &QuotaRule> {
        let of_owner = self.owners.get(slot).and_then(|o| self.by_owner.get(o)).map(|(_, r)| r.as_slice());
        of_owner.unwrap_or_default().iter().map(|&i| &self.rules[i]).filter(move |r| r.covers(device, kind))
    }
}

/// Bytes an allocation of `size_bytes` takes from its pool: what quotas count. Exact for the
/// pools today (they round to [`GRANULARITY_BYTES`] and nothing else); `settle` corrects the
/// books should a pool ever give a different size.
fn pool_bytes(kind: MemoryKind, size_bytes: u64) -> u64 {
    if kind == MemoryKind::Reservation {
        size_bytes
    } else {
        align_up(size_bytes, GRANULARITY_BYTES).unwrap_or(u64::MAX)
    }
}

/// What the owners with a quota hold, under the [`Quotas`]' lock.
#[derive(Debug, Default)]
pub(crate) struct QuotaBooks {
    /// Per owner slot: bytes per (device, kind) that some quota of the owner covers, of its
    /// live allocations plus the charges of those being placed.
    held: Vec<Vec<((DeviceId, MemoryKind), u64)>>,
    /// Charges taken and not yet settled or abandoned (`check` needs none in flight).
    in_flight: usize,
}

/// Bytes charged to an owner for an allocation being placed: settle it when the allocation is
/// recorded, abandon it when placement fails.
#[derive(Debug)]
#[must_use]
pub(crate) struct Charge {
    slot: usize,
    device: DeviceId,
    kind: MemoryKind,
    bytes: u64,
}

impl QuotaBooks {
    fn for_rules(rules: &QuotaRules) -> Self {
        QuotaBooks { held: vec![Vec::new(); rules.owners.len()], in_flight: 0 }
    }

    fn cell(&mut self, slot: usize, device: DeviceId, kind: MemoryKind) -> &mut u64 {
        if self.held.len() <= slot {
            self.held.resize(slot + 1, Vec::new());
        }
        let cells = &mut self.held[slot];
        let i = cells.iter().position(|(at, _)| *at == (device, kind)).unwrap_or_else(|| {
            cells.push(((device, kind), 0));
            cells.len() - 1
        });
        &mut cells[i].1
    }

    /// Charges `bytes` to the owner in `slot` on `device` of `kind` when every quota that
    /// covers them leaves room; otherwise `QuotaExceeded` for the first that does not, and
    /// nothing changes.
    fn charge(
        &mut self,
        rules: &QuotaRules,
        slot: usize,
        device: DeviceId,
        kind: MemoryKind,
        bytes: u64,
    ) -> Result<Charge, ServiceError> {
        let held = self.held.get(slot).map(Vec::as_slice).unwrap_or_default();
        for rule in rules.covering(slot, device, kind) {
            let used_bytes: u64 = held.iter().filter(|((d, k), _)| rule.covers(*d, *k)).map(|(_, b)| b).sum();
            if used_bytes.saturating_add(bytes) > rule.max_bytes {
                return Err(ServiceError::QuotaExceeded {
                    owner: rule.owner.clone(),
                    device: rule.device,
                    kind: rule.kind,
                    limit_bytes: rule.max_bytes,
                    used_bytes,
                    requested_bytes: bytes,
                });
            }
        }
        *self.cell(slot, device, kind) += bytes;
        self.in_flight += 1;
        Ok(Charge { slot, device, kind, bytes })
    }

    /// The allocation was recorded, occupying `allocated_bytes`.
    pub fn settle(&mut self, charge: Charge, allocated_bytes: u64) {
        let cell = self.cell(charge.slot, charge.device, charge.kind);
        *cell = cell.saturating_sub(charge.bytes).saturating_add(allocated_bytes);
        self.in_flight -= 1;
    }

    /// The allocation was not made: the charge goes back.
    pub fn abandon(&mut self, charge: Charge) {
        self.settle(charge, 0);
    }

    /// A recorded allocation left the ledger (freed): its bytes go back to its owner's quotas.
    pub fn give_back(&mut self, rules: &QuotaRules, r: &Allocation) {
        if let Some(slot) = rules.slot(r.owner.as_deref(), r.device, r.kind) {
            let cell = self.cell(slot, r.device, r.kind);
            *cell = cell.saturating_sub(r.allocated_bytes);
        }
    }

    /// A freed allocation came back into the ledger (its free failed): its bytes count again.
    pub fn take_back(&mut self, rules: &QuotaRules, r: &Allocation) {
        if let Some(slot) = rules.slot(r.owner.as_deref(), r.device, r.kind) {
            *self.cell(slot, r.device, r.kind) += r.allocated_bytes;
        }
    }

    /// Checks the books against the ledger's allocations (skipped while a charge is in flight).
    pub fn check<'a>(
        &self,
        rules: &QuotaRules,
        records: impl Iterator<Item = &'a Allocation>,
    ) -> Result<(), LedgerError> {
        if self.in_flight > 0 {
            return Ok(());
        }
        let mut in_ledger: HashMap<(usize, DeviceId, MemoryKind), u64> = HashMap::new();
        for r in records {
            if let Some(slot) = rules.slot(r.owner.as_deref(), r.device, r.kind) {
                *in_ledger.entry((slot, r.device, r.kind)).or_default() += r.allocated_bytes;
            }
        }
        let in_books = self
            .held
            .iter()
            .enumerate()
            .flat_map(|(slot, cells)| cells.iter().map(move |((d, k), b)| ((slot, *d, *k), *b)));
        let mismatch = |(slot, device, kind): (usize, DeviceId, MemoryKind), books_bytes, ledger_bytes| {
            let owner = rules.owners.get(slot).cloned().unwrap_or_default();
            LedgerError::Quota { owner, device, kind, books_bytes, ledger_bytes }
        };
        for (key, books_bytes) in in_books {
            let ledger_bytes = in_ledger.remove(&key).unwrap_or(0);
            if ledger_bytes != books_bytes {
                return Err(mismatch(key, books_bytes, ledger_bytes));
            }
        }
        match in_ledger.into_iter().next() {
            Some((key, ledger_bytes)) => Err(mismatch(key, 0, ledger_bytes)),
            None => Ok(()),
        }
    }
}

/// A quota and what its owner holds under it now.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaUse {
    pub rule: QuotaRule,
    /// Bytes of the owner's live allocations the quota covers.
    pub used_bytes: u64,
}

impl QuotaUse {
    pub fn remaining_bytes(&self) -> u64 {
        self.rule.max_bytes.saturating_sub(self.used_bytes)
    }
}

/// One owner's allocations on one device of one kind.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnerUsage {
    /// `None`: allocations that name no owner.
    pub owner: Option<String>,
    pub device: DeviceId,
    pub kind: MemoryKind,
    /// Bytes they occupy in their pools (what quotas count).
    pub allocated_bytes: u64,
    /// Bytes they asked for.
    pub requested_bytes: u64,
    pub allocation_count: usize,
    /// The quota covering these bytes with the least room left (the first configured on a
    /// tie); `None` when no quota covers them.
    pub quota: Option<QuotaUse>,
}

/// Every owner's bytes per device and kind, and every quota with its use.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnersReport {
    /// By owner (no owner first), device and kind. An owner with a quota is listed on every
    /// device and kind of this host the quota covers, also where it holds nothing.
    pub owners: Vec<OwnerUsage>,
    /// In configuration order.
    pub quotas: Vec<QuotaUse>,
}

impl Quotas {
    /// Enforces `entries` from now on (the service starts with none); `live`, the allocations
    /// already live, count against them. `offered`: each device of this host with the memory
    /// kinds it provides, to warn about a quota that covers none. Refused, changing nothing,
    /// when `Config::validate` would refuse them. `&mut self`: no allocation is in flight.
    pub fn set<'a>(
        &mut self,
        entries: &[QuotaEntry],
        offered: &[(DeviceId, Vec<MemoryKind>)],
        live: impl Iterator<Item = &'a Allocation>,
    ) -> Result<(), ConfigError> {
        let rules = crate::config::quotas::rules(entries).map_err(ConfigError::Invalid)?;
        for r in &rules {
            let applies = offered.iter().any(|(id, kinds)| kinds.iter().any(|k| r.covers(*id, *k)));
            if !applies {
                tracing::warn!(owner = %r.owner, device = %r.device_text(), memory_type = r.kind_text(), "a quota covers no device and memory type of this host");
            }
        }
        self.rules = QuotaRules::new(rules);
        // No allocation is in flight, so the books are the ledger's records.
        let mut books = QuotaBooks::for_rules(&self.rules);
        for r in live {
            books.take_back(&self.rules, r);
        }
        *lock(&self.books) = books;
        Ok(())
    }

    /// Charges an allocation of `size_bytes` to `owner`'s quotas before it is placed: `None`
    /// when no quota covers it, `QuotaExceeded` (nothing charged) when one has no room.
    pub fn charge(
        &self,
        owner: Option<&str>,
        device: DeviceId,
        kind: MemoryKind,
        size_bytes: u64,
    ) -> Result<Option<Charge>, ServiceError> {
        let Some(slot) = self.rules.slot(owner, device, kind) else { return Ok(None) };
        lock(&self.books).charge(&self.rules, slot, device, kind, pool_bytes(kind, size_bytes)).map(Some)
    }

    /// The allocation was recorded, occupying `allocated_bytes`.
    pub fn settle(&self, charge: Charge, allocated_bytes: u64) {
        lock(&self.books).settle(charge, allocated_bytes);
    }

    /// The allocation was not made: the charge goes back.
    pub fn abandon(&self, charge: Charge) {
        lock(&self.books).abandon(charge);
    }

    /// A recorded allocation left the ledger (freed): its bytes go back to its owner's quotas.
    pub fn give_back(&self, r: &Allocation) {
        if self.rules.slot(r.owner.as_deref(), r.device, r.kind).is_some() {
            lock(&self.books).give_back(&self.rules, r);
        }
    }

    /// A freed allocation came back into the ledger (its free failed): its bytes count again.
    pub fn take_back(&self, r: &Allocation) {
        if self.rules.slot(r.owner.as_deref(), r.device, r.kind).is_some() {
            lock(&self.books).take_back(&self.rules, r);
        }
    }

    /// Checks the books against the ledger's allocations (skipped while a charge is in flight).
    pub fn check<'a>(&self, records: impl Iterator<Item = &'a Allocation>) -> Result<(), LedgerError> {
        lock(&self.books).check(&self.rules, records)
    }

    /// Every owner's `live` allocations per device and kind (bytes, count, the quota that
    /// binds), and every quota with its use; `offered` as for [`Quotas::set`].
    pub fn report<'a>(
        &self,
        live: impl Iterator<Item = &'a Allocation>,
        offered: &[(DeviceId, Vec<MemoryKind>)],
    ) -> OwnersReport {
        #[derive(Default)]
        struct Tally {
            allocated_bytes: u64,
            requested_bytes: u64,
            count: usize,
        }
        let mut cells: BTreeMap<(Option<String>, DeviceId, MemoryKind), Tally> = BTreeMap::new();
        for r in live {
            let t = cells.entry((r.owner.clone(), r.device, r.kind)).or_default();
            t.allocated_bytes += r.allocated_bytes;
            t.requested_bytes += r.size_bytes;
            t.count += 1;
        }
        for rule in &self.rules.rules {
            for (id, kinds) in offered {
                for &kind in kinds {
                    if rule.covers(*id, kind) {
                        cells.entry((Some(rule.owner.clone()), *id, kind)).or_default();
                    }
                }
            }
        }
        let quotas: Vec<QuotaUse> = self
            .rules
            .rules
            .iter()
            .map(|rule| QuotaUse {
                rule: rule.clone(),
                used_bytes: cells
                    .iter()
                    .filter(|((o, d, k), _)| o.as_deref() == Some(rule.owner.as_str()) && rule.covers(*d, *k))
                    .map(|(_, t)| t.allocated_bytes)
                    .sum(),
            })
            .collect();
        let owners = cells
            .into_iter()
            .map(|((owner, device, kind), t)| {
                let quota = quotas
                    .iter()
                    .filter(|q| owner.as_deref() == Some(q.rule.owner.as_str()) && q.rule.covers(device, kind))
                    .min_by_key(|q| q.remaining_bytes())
                    .cloned();
                OwnerUsage {
                    owner,
                    device,
                    kind,
                    allocated_bytes: t.allocated_bytes,
                    requested_bytes: t.requested_bytes,
                    allocation_count: t.count,
                    quota,
                }
            })
            .collect();
        OwnersReport { owners, quotas }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memwarden_core::units::KIB;

    fn rule(owner: &str, device: Option<DeviceId>, kind: Option<MemoryKind>, max_bytes: u64) -> QuotaRule {
        QuotaRule { owner: owner.into(), device, kind, max_bytes }
    }

    #[test]
    fn charges_stop_at_every_covering_limit_and_come_back() {
        let rules = QuotaRules::new(vec![
            rule("a", Some(DeviceId::Cpu), Some(MemoryKind::Pinned), 1000),
            rule("a", None, None, 1500),
        ]);
        let mut books = QuotaBooks::for_rules(&rules);
        let (cpu, pinned, host) = (DeviceId::Cpu, MemoryKind::Pinned, MemoryKind::Host);
        let a = rules.slot(Some("a"), cpu, pinned).expect("a has quotas");
        let c = books.charge(&rules, a, cpu, pinned, 768).expect("room");
        books.settle(c, 768);
        match books.charge(&rules, a, cpu, pinned, 512) {
            Err(ServiceError::QuotaExceeded { limit_bytes: 1000, used_bytes: 768, requested_bytes: 512, .. }) => {}
            other => panic!("{other:?}"),
        }
        let c = books.charge(&rules, a, cpu, host, 700).expect("the * quota has 732 left");
        match books.charge(&rules, a, cpu, host, 100) {
            Err(ServiceError::QuotaExceeded {
                limit_bytes: 1500, used_bytes: 1468, device: None, kind: None, ..
            }) => {}
            other => panic!("in flight counts: {other:?}"),
        }
        books.abandon(c);
        assert_eq!(books.in_flight, 0);
        assert!(books.charge(&rules, a, cpu, host, 700).is_ok(), "an abandoned charge gives its room back");
        assert_eq!((rules.slot(Some("b"), cpu, host), rules.slot(None, cpu, host)), (None, None));
        assert_eq!(rules.slot(Some("a"), DeviceId::cuda(0), MemoryKind::Device), Some(a));
        let only_pinned = QuotaRules::new(vec![rule("p", None, Some(pinned), 1)]);
        assert_eq!(only_pinned.slot(Some("p"), cpu, host), None, "no quota of p covers host memory");
    }

    #[test]
    fn concurrent_requests_never_overshoot_and_frees_balance_the_books() {
        use memwarden_backends::{HostBackend, HostStatusReader};
        let backend = std::sync::Arc::new(HostBackend::new(HostStatusReader::default()));
        let mut s = crate::service::Service::with_backends(
            vec![backend],
            memwarden_core::PoolConfig::default(),
            Default::default(),
        );
        s.set_quotas(&[QuotaEntry {
            owner: "c".into(),
            device: "cpu".into(),
            memory_type: "host".into(),
            max_bytes: 64 * KIB,
        }])
        .expect("valid");
        let request = || crate::service::AllocateRequest {
            owner: Some("c".into()),
            ..super::super::AllocateRequest::new("cpu", 1000)
        };
        let made: Vec<String> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        (0..32).filter_map(|_| s.allocate(request()).ok()).map(|a| a.id.clone()).collect::<Vec<_>>()
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
        });
        assert_eq!(made.len(), 64, "exactly the 64 KiB the quota allows, in 1 KiB pool slots");
        s.validate().expect("books, ledger and pools agree");
        assert_eq!(s.owners().quotas[0].used_bytes, 64 * KIB);
        for id in &made {
            s.free(id).expect("free");
        }
        s.validate().expect("balanced after the frees");
        assert_eq!(s.owners().quotas[0].remaining_bytes(), 64 * KIB);
        assert!(s.allocate(request()).is_ok());
    }

    #[test]
    fn pool_bytes_are_what_the_pool_gives() {
        assert_eq!(pool_bytes(MemoryKind::Host, 1000), 1024);
        assert_eq!(pool_bytes(MemoryKind::Pinned, 1024), 1024);
        assert_eq!(pool_bytes(MemoryKind::Reservation, 1000), 1000);
        assert_eq!(pool_bytes(MemoryKind::Host, u64::MAX), u64::MAX);
    }
}
