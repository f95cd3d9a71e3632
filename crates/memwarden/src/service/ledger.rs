//! The ledger: every live allocation with its running totals, which allocations a copy is
//! using or a defragmentation batch is moving, which connections may own memory, and what the
//! service records. One lock guards it; a device's lock, when both are taken, comes first.

use super::{live, quota, record, Allocation, Service};
use crate::util::lock;
use std::collections::{HashMap, HashSet};
use std::sync::MutexGuard;

/// Live allocations, which of them a copy is using (those cannot be freed meanwhile), and what
/// the service records about them.
pub(super) struct Ledger {
    pub(super) records: live::LiveSet,
    pub(super) busy: HashMap<String, u32>,
    /// Allocations a defragmentation batch is moving now: requests for them wait on
    /// [`Service::settled`] until the batch is done.
    pub(super) moving: HashSet<String>,
    /// Connections that may own memory (`owner_client`): opened at hello, closed when the
    /// connection ends. An allocation for a closed one is refused where it would be recorded,
    /// so none can slip in after the connection's memory was reclaimed.
    pub(super) open_clients: HashSet<String>,
    /// Allocations of gone owners that a copy was using when they were reclaimed: freed (as
    /// `reclaimed`) when the last copy releases them.
    pub(super) reclaim_on_release: HashSet<String>,
    pub(super) recorder: record::Recorder,
    pub(super) quota: quota::QuotaBooks,
}

impl Ledger {
    pub(super) fn get(&self, id: &str) -> Option<&Allocation> {
        self.records.get(id)
    }
}

impl Service {
    /// The ledger, once none of `ids` is being moved by a defragmentation batch. A batch holds
    /// its allocations for the time their bytes take to copy; only requests for them wait.
    pub(super) fn ledger_settled(&self, ids: &[&str]) -> MutexGuard<'_, Ledger> {
        let mut ledger = lock(&self.ledger);
        while !ledger.moving.is_empty() && ids.iter().any(|id| ledger.moving.contains(*id)) {
            ledger = self.settled.wait(ledger).unwrap_or_else(|e| e.into_inner());
        }
        ledger
    }
}
