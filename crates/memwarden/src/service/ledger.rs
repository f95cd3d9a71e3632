//! The ledger: every live allocation with its running totals, which allocations a copy is
//! using or a defragmentation batch is moving, which connections may own memory, and what the
//! service records. One lock guards it; a device's lock, when both are taken, comes first, and
//! the quota books' lock, when both are taken, comes after it.

use super::{live, record, Allocation, ServiceError};
use crate::sync::lock;
use memwarden_core::{DeviceId, MemoryKind};
use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};
use time::OffsetDateTime;

/// The allocation ledger. Owns the live allocations (the [`live::LiveSet`] and its running
/// totals), which of them copies are using or a defragmentation batch is moving, the
/// connections that may own memory, the reclaims waiting for a copy to finish, and the
/// [`record::Recorder`] (counters, peaks, event log): all behind one lock, with the condition
/// variable that wakes requests waiting for a moved allocation to settle. It places nothing:
/// the devices do, and the service records what they placed here.
pub(crate) struct Ledger {
    book: Mutex<Book>,
    /// Signalled when a defragmentation batch finishes moving its allocations.
    settled: Condvar,
}

/// Live allocations, which of them a copy is using (those cannot be freed meanwhile), and what
/// the service records about them: what the ledger's lock guards.
pub(super) struct Book {
    pub(super) records: live::LiveSet,
    pub(super) busy: HashMap<String, u32>,
    /// Allocations a defragmentation batch is moving now: requests for them wait on
    /// [`Ledger::settled`] until the batch is done.
    pub(super) moving: HashSet<String>,
    /// Connections that may own memory (`owner_client`): opened at hello, closed when the
    /// connection ends. An allocation for a closed one is refused where it would be recorded,
    /// so none can slip in after the connection's memory was reclaimed.
    pub(super) open_clients: HashSet<String>,
    /// Allocations of gone owners that a copy was using when they were reclaimed: freed (as
    /// `reclaimed`) when the last copy releases them.
    pub(super) reclaim_on_release: HashSet<String>,
    pub(super) recorder: record::Recorder,
}

impl Book {
    pub(super) fn get(&self, id: &str) -> Option<&Allocation> {
        self.records.get(id)
    }
}

impl Ledger {
    pub(super) fn new() -> Self {
        Ledger {
            book: Mutex::new(Book {
                records: live::LiveSet::default(),
                busy: HashMap::new(),
                moving: HashSet::new(),
                open_clients: HashSet::new(),
                reclaim_on_release: HashSet::new(),
                recorder: record::Recorder::new(true, 10_000),
            }),
            settled: Condvar::new(),
        }
    }

    /// The ledger, locked.
    pub(super) fn lock(&self) -> MutexGuard<'_, Book> {
        lock(&self.book)
    }

    /// The ledger, once none of `ids` is being moved by a defragmentation batch. A batch holds
    /// its allocations for the time their bytes take to copy; only requests for them wait.
    pub(super) fn settled(&self, ids: &[&str]) -> MutexGuard<'_, Book> {
        let mut ledger = self.lock();
        while !ledger.moving.is_empty() && ids.iter().any(|id| ledger.moving.contains(*id)) {
            ledger = self.settled.wait(ledger).unwrap_or_else(|e| e.into_inner());
        }
        ledger
    }

    /// Takes the moving marks off `ids` and wakes the requests waiting for them.
    pub(super) fn unmark_moving(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        {
            let mut ledger = self.lock();
            for id in ids {
                ledger.moving.remove(id);
            }
        }
        self.settled.notify_all();
    }

    /// Turns recording (counters, peaks, the event log of `log_size` entries) on or off; what
    /// was recorded is dropped.
    pub(super) fn set_recording(&self, enabled: bool, log_size: usize) {
        self.lock().recorder = record::Recorder::new(enabled, log_size);
    }

    pub(super) fn allocation(&self, id: &str) -> Result<Allocation, ServiceError> {
        self.lock().get(id).cloned().ok_or_else(|| ServiceError::AllocationNotFound { id: id.to_string() })
    }

    /// Live allocations, oldest first; only those of `device` when given.
    pub(super) fn allocations(&self, device: Option<DeviceId>) -> Vec<Allocation> {
        let mut list: Vec<_> =
            self.lock().records.values().filter(|r| device.is_none_or(|d| r.device == d)).cloned().collect();
        list.sort_by(|a, b| a.allocated_at.cmp(&b.allocated_at).then_with(|| a.id.cmp(&b.id)));
        list
    }

    /// True when the allocation is not being moved and freeing it returns no memory to the OS
    /// or driver: a reservation, or smaller than `dedicated_threshold_bytes` (it stays in a
    /// shared block).
    pub(super) fn free_is_quick(&self, id: &str, dedicated_threshold_bytes: u64) -> bool {
        let ledger = self.lock();
        !ledger.moving.contains(id)
            && ledger
                .get(id)
                .is_none_or(|r| r.kind == MemoryKind::Reservation || r.allocated_bytes < dedicated_threshold_bytes)
    }

    /// Marks allocations as used by a copy (they cannot be freed meanwhile); fails if one of
    /// them is gone.
    pub(super) fn acquire(&self, ids: &[&str]) -> Result<(), ServiceError> {
        let mut ledger = self.settled(ids);
        if let Some(missing) = ids.iter().find(|id| !ledger.records.contains_key(id)) {
            return Err(ServiceError::AllocationNotFound { id: missing.to_string() });
        }
        for id in ids {
            *ledger.busy.entry(id.to_string()).or_default() += 1;
        }
        Ok(())
    }

    /// Takes a copy's marks off; returns the allocations whose owner went away while copies
    /// used them and that no copy uses any more (the caller reclaims them).
    pub(super) fn release(&self, ids: &[&str]) -> Vec<String> {
        let mut deferred = Vec::new();
        let mut ledger = self.lock();
        for id in ids {
            if let Some(n) = ledger.busy.get_mut(*id) {
                *n -= 1;
                if *n == 0 {
                    ledger.busy.remove(*id);
                    if ledger.reclaim_on_release.remove(*id) {
                        deferred.push(id.to_string());
                    }
                }
            }
        }
        deferred
    }

    /// Lets a connection own memory (`owner_client`) until [`Ledger::close_client`].
    pub(super) fn open_client(&self, client: &str) {
        self.lock().open_clients.insert(client.to_string());
    }

    /// Closes a connection's ownership and returns the ids of what it owns, under one lock, so
    /// an allocation still in flight for the connection is refused, never missed.
    pub(super) fn close_client(&self, client: &str) -> Vec<String> {
        let mut ledger = self.lock();
        ledger.open_clients.remove(client);
        ledger.records.values().filter(|r| r.owner_client.as_deref() == Some(client)).map(|r| r.id.clone()).collect()
    }

    /// The ids of the allocations owned by process `pid`.
    pub(super) fn owned_by_pid(&self, pid: u32) -> Vec<String> {
        self.lock().records.values().filter(|r| r.owner_pid == Some(pid)).map(|r| r.id.clone()).collect()
    }

    /// When each owner that holds live allocations last allocated or freed (the running
    /// totals; analytics' leak suspects read the same figure).
    pub(super) fn owner_activity(&self) -> HashMap<String, OffsetDateTime> {
        let live = self.lock().records.digest(i64::MIN, 0);
        live.owners
            .into_iter()
            .filter_map(|g| {
                let at = OffsetDateTime::from_unix_timestamp_nanos(g.last_active_ns as i128).ok()?;
                Some((g.name?, at))
            })
            .collect()
    }
}
