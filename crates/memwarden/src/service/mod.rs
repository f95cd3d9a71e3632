//! The service layer: the device registry, the allocation ledger and every memory operation,
//! independent of HTTP. The REST API and tests call it; it calls the backends.
//!
//! [`Service`] is the composition root of its parts, each a type with its own state and lock:
//! the devices (`devices.rs`: each device's pools and budget, `device.rs`; defragmentation,
//! `defrag.rs`), the ledger (`ledger.rs`: records and the live set, `live.rs`; what is
//! recorded, `record.rs`; listing, `listing.rs`), the quotas (`quota.rs`), the owner watch and
//! reclaim (`owners.rs`) and the transfers (`transfer.rs`). The service runs each operation as
//! a sequence of calls to them (an allocation's and a free's in `allocate.rs`); they do not
//! call each other, except the defragmentation pass, which switches what it moves in the
//! ledger it is given, and the transfers, which allocate and free through the service.
//!
//! Lock order, when several are held: a device's defragmentation lock, the device's state, the
//! ledger, the quota books.

mod allocate;
mod defrag;
mod device;
mod devices;
mod ledger;
mod listing;
mod live;
mod owners;
mod quota;
mod record;
mod transfer;
mod types;

pub use record::{AllocationEvent, DeviceRecord, EventKind};

pub use listing::{AllocationFilter, AllocationPage, ListPosition};
pub use live::{GroupTotals, LiveDigest};

pub use defrag::{BlockDump, CanAllocate, DefragReport, PoolDump, RangeView};
pub use device::Fit;
pub use quota::{OwnerUsage, OwnersReport, QuotaUse};

pub use transfer::{ExportInfo, ExportVia, TransferRecord, TransferRequest, TransferStatus, TransferTarget};

pub use allocate::PendingAllocation;
use allocate::{Checked, NotPlaced, Parts};
pub use device::Limits;
use devices::Devices;
use ledger::Ledger;
use memwarden_backends::Backend;
pub use memwarden_backends::BackendHealth;
use memwarden_core::defrag::DefragOptions;
use memwarden_core::{DeviceId, MemoryKind, PoolConfig};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
pub use types::{
    AllocateRequest, Allocation, AllocationRecord, ClearOutcome, DeviceStatus, FreedAllocation, LedgerError,
    ServiceError, DEFAULT_ALIGNMENT_BYTES,
};

use crate::config::Config;
use memwarden_core::units::MIB;

/// Longest free-text field (`purpose`, `owner`) an allocation takes, in characters: they go
/// into the event log and every listing.
pub const MAX_TEXT_CHARS: usize = 256;

/// The memory service: the thin composition root of its parts, and the one object the rest of
/// the daemon calls. It owns the parts and nothing of its own but the automatic
/// defragmentation setting and its start time:
/// - the devices (`Devices`): each device's pools and budget, its status and defragmentation;
/// - the ledger (`Ledger`): every live allocation, what copies use and passes move, and what
///   is recorded (counters, peaks, the event log);
/// - the quotas (`Quotas`): the rules and what owners hold under them;
/// - the owner watch (`OwnerWatch`): the processes that own memory, and what their exit
///   reclaims;
/// - the transfers (`Transfers`): copies between allocations and their threads.
///
/// Each operation is a short sequence of calls to those parts: allocate and free in
/// `allocate.rs`, transfer, export, read and write in `transfer.rs`, the rest here.
pub struct Service {
    devices: Devices,
    ledger: Ledger,
    quotas: quota::Quotas,
    /// The processes that own allocations (`ownerPid`), watched so their memory comes back.
    owners: owners::OwnerWatch,
    transfers: transfer::Transfers,
    /// When set, an allocation that does not fit on a fragmented device triggers a bounded pass.
    auto_defrag: Option<crate::config::DefragSection>,
    started_at: OffsetDateTime,
    /// The host's pressure signals, from discovery (`None` over given backends).
    host_signals: Option<Arc<dyn memwarden_backends::HostSignals>>,
}

impl Service {
    /// The service with every backend this machine has: the host always, each GPU API's
    /// devices when it finds them (otherwise listed as unavailable with the reason).
    pub fn from_config(config: &Config) -> Self {
        let pool = PoolConfig {
            block_size_bytes: config.pool.block_size_bytes,
            dedicated_threshold_bytes: config.pool.dedicated_threshold_bytes,
            ..PoolConfig::default()
        };
        let found = memwarden_backends::discover(&config.into());
        let mut service = Service::with_backends(found.backends, pool, Limits::from(&config.pool));
        service.set_recording(config.analytics.enabled, config.analytics.event_log_size);
        service.auto_defrag = config.defrag.auto.then_some(config.defrag.clone());
        service.devices.set_health(found.health);
        service.host_signals = Some(found.host_signals);
        service.transfers.set_sync_max_bytes(config.transfer.sync_max_bytes);
        if let Err(e) = service.set_quotas(&config.quotas) {
            tracing::error!(error = %e, "no quota is enforced: [[quotas]] is invalid");
        }
        service
    }

    /// A service over the given backends (tests and embedding).
    pub fn with_backends(backends: Vec<Arc<dyn Backend>>, pool: PoolConfig, limits: Limits) -> Self {
        Service {
            devices: Devices::new(backends, pool, limits),
            ledger: Ledger::new(),
            quotas: quota::Quotas::default(),
            owners: owners::OwnerWatch::default(),
            transfers: transfer::Transfers::new(64 * MIB),
            auto_defrag: None,
            started_at: OffsetDateTime::now_utc(),
            host_signals: None,
        }
    }

    /// Turns recording (counters, peaks, the event log of `log_size` entries) on or off; what
    /// was recorded is dropped.
    pub fn set_recording(&mut self, enabled: bool, log_size: usize) {
        self.ledger.set_recording(enabled, log_size);
    }

    pub fn started_at(&self) -> OffsetDateTime {
        self.started_at
    }

    pub fn backends(&self) -> &[BackendHealth] {
        self.devices.health()
    }

    /// The host's pressure signals (PSI, cgroup limit events, the stall trigger), when this
    /// service discovered its backends itself.
    pub fn host_signals(&self) -> Option<Arc<dyn memwarden_backends::HostSignals>> {
        self.host_signals.clone()
    }

    pub fn device_ids(&self) -> Vec<DeviceId> {
        self.devices.ids()
    }

    /// Resolves a device id or alias to a device of this machine.
    pub fn resolve(&self, text: &str) -> Result<DeviceId, ServiceError> {
        self.devices.resolve(text)
    }

    /// The backend of a device (the pressure monitor samples through it).
    pub fn backend(&self, id: DeviceId) -> Option<&Arc<dyn Backend>> {
        self.devices.get(id).map(|d| &d.backend)
    }

    /// `(total, available)` bytes of `device` read from the OS or driver now (no cached sample;
    /// the status cache is dropped too, so the next status shows the change).
    pub fn measure_now(&self, device: DeviceId) -> Result<(u64, u64), ServiceError> {
        self.devices.measure_now(device)
    }

    /// Allocations on `device` that did not fit, since start.
    pub fn allocation_failures(&self, device: DeviceId) -> u64 {
        self.devices.failures(device)
    }

    /// Status of one device, from a sample no older than the configured maximum age.
    pub fn status(&self, id: DeviceId) -> Result<DeviceStatus, ServiceError> {
        self.devices.status(id)
    }

    pub fn status_all(&self) -> Result<Vec<DeviceStatus>, ServiceError> {
        self.devices.ids().into_iter().map(|id| self.devices.status(id)).collect()
    }

    /// Allocates, creating pool blocks as needed (which can take milliseconds per GiB).
    pub fn allocate(&self, req: AllocateRequest) -> Result<Allocation, ServiceError> {
        let checked = self.check(req)?;
        allocate::finish(self.parts(), self.auto_defrag.as_ref(), checked, None)
    }

    /// Allocates only if no OS or driver call is needed (a pool hit or a reservation):
    /// `Ok(None)` when it would need a new block, or does not fit (then `allocate` records the
    /// failure and may defragment). [`Service::allocate_or_defer`] does the same without
    /// checking the request again when it must go on.
    pub fn try_allocate_now(&self, req: AllocateRequest) -> Result<Option<Allocation>, ServiceError> {
        self.allocate_or_defer(req).map(Result::ok)
    }

    /// Allocates if no OS or driver call is needed (a pool hit or a reservation); otherwise,
    /// when it would need a new block or does not fit, `Ok(Err(pending))`, which
    /// [`Service::allocate_pending`] finishes (creating the block, or recording the failure and
    /// maybe defragmenting) without checking the request again. Lets async callers skip a
    /// thread hand-off on the microsecond path, and go down the path once on the other.
    pub fn allocate_or_defer(
        &self,
        req: AllocateRequest,
    ) -> Result<Result<Allocation, PendingAllocation>, ServiceError> {
        match allocate::place(self.parts(), self.check(req)?, false) {
            Ok(a) => Ok(Ok(a)),
            Err(NotPlaced::WouldBlock(checked)) => Ok(Err(PendingAllocation { checked, failed: None })),
            Err(NotPlaced::NoRoom(checked, e)) => Ok(Err(PendingAllocation { checked, failed: Some(e) })),
            Err(NotPlaced::Failed(e)) => Err(e),
        }
    }

    /// Finishes what [`Service::allocate_or_defer`] could not, creating pool blocks as needed.
    pub fn allocate_pending(&self, pending: PendingAllocation) -> Result<Allocation, ServiceError> {
        allocate::finish(self.parts(), self.auto_defrag.as_ref(), *pending.checked, pending.failed)
    }

    fn parts(&self) -> Parts<'_> {
        Parts { devices: &self.devices, quotas: &self.quotas, ledger: &self.ledger }
    }

    /// The request's checks, each in one place and each once: its fields here, its owner
    /// process (watched from now on), then the device's (`Device::check_request`).
    fn check(&self, req: AllocateRequest) -> Result<Checked, ServiceError> {
        let id = self.devices.resolve(&req.device)?;
        allocate::check_fields(&req)?;
        if let Some(pid) = req.owner_pid {
            self.owners.watch(pid)?;
        }
        let kind = self.devices.get_or_404(id)?.check_request(id, &req)?;
        Ok(Checked { id, kind, req })
    }

    /// True when freeing this allocation returns no memory to the OS or driver (it stays in a
    /// shared block, or is a reservation) and waits for no defragmentation batch, so it takes
    /// microseconds.
    pub fn free_is_quick(&self, allocation_id: &str) -> bool {
        self.ledger.free_is_quick(allocation_id, self.devices.pool_config().dedicated_threshold_bytes)
    }

    /// Frees an allocation. Unknown and already-freed ids are `AllocationNotFound`.
    pub fn free(&self, allocation_id: &str) -> Result<FreedAllocation, ServiceError> {
        self.free_as(allocation_id, false)
    }

    fn free_as(&self, allocation_id: &str, reclaimed: bool) -> Result<FreedAllocation, ServiceError> {
        allocate::free(self.parts(), allocation_id, reclaimed)
    }

    pub fn allocation(&self, allocation_id: &str) -> Result<Allocation, ServiceError> {
        self.ledger.allocation(allocation_id)
    }

    /// Live allocations, oldest first; only those of `device` when given.
    pub fn allocations(&self, device: Option<DeviceId>) -> Vec<Allocation> {
        self.ledger.allocations(device)
    }

    /// The live allocations that match `filter` and come after `after` (from the first without
    /// it), at most `limit` (at least 1) of them, with the count and bytes of all that match.
    pub fn allocation_page(
        &self,
        filter: &AllocationFilter,
        after: Option<&ListPosition>,
        limit: usize,
    ) -> AllocationPage {
        self.ledger.lock().records.page(filter, after, limit)
    }

    /// What analytics needs of the live allocations, from the ledger's running totals (no walk
    /// over the allocations): bytes, count and last activity per owner and per purpose, and
    /// per owner its `per_owner` oldest non-persistent allocations made before `older_than`.
    pub fn live_digest(&self, older_than: OffsetDateTime, per_owner: usize) -> LiveDigest {
        self.ledger.lock().records.digest(older_than.unix_timestamp_nanos() as i64, per_owner)
    }

    /// Returns cached empty pool blocks to the OS or driver, on one device or all.
    pub fn clear(&self, device: Option<DeviceId>) -> Result<Vec<ClearOutcome>, ServiceError> {
        let outcomes = self.devices.clear(device);
        // The daemon's own heap too: what request and answer buffers left free in it.
        if device.is_none_or(|d| d == DeviceId::Cpu) {
            memwarden_sys::release_free_heap();
        }
        outcomes
    }

    /// Checks every pool's invariants, that the ledger matches the pools, and that the quota
    /// books and the ledger's running totals match its records.
    pub fn validate(&self) -> Result<(), LedgerError> {
        {
            let ledger = self.ledger.lock();
            self.quotas.check(ledger.records.values())?;
            ledger.records.check()?;
        }
        self.devices.check_against(&self.ledger)
    }

    /// One defragmentation pass on `device`: every pool of it, within the options' budgets and
    /// `max_time` (checked between moves). Allocations that are not movable, exported, or in use
    /// by a transfer stay where they are.
    ///
    /// The pass takes the global ledger only for moments (to mark a batch of allocations as
    /// moving, and to switch them to their new places), so requests on other devices never wait
    /// for it. It holds this device's lock for one batch of moves at a time. Requests that need
    /// an allocation being moved (free, read, write, transfer, export) wait until its batch is
    /// done; no request ever sees an allocation half-moved.
    pub fn defragment(
        &self,
        device: DeviceId,
        options: DefragOptions,
        max_time: Option<Duration>,
    ) -> Result<DefragReport, ServiceError> {
        self.defragment_with_progress(device, options, max_time, &mut |_, _| {})
    }

    /// [`Service::defragment`], calling `progress(bytes_moved, bytes_planned)` as the pass goes:
    /// once each pool's plan is made and after each batch of moves, and once at the end.
    /// `bytes_moved` never decreases and ends at the report's `bytes_moved`; `bytes_planned` is
    /// what was moved plus what the plan being carried out has left, so it changes as each pool
    /// is planned (or planned again), and ends equal to `bytes_moved` unless moves were skipped.
    pub fn defragment_with_progress(
        &self,
        device: DeviceId,
        options: DefragOptions,
        max_time: Option<Duration>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<DefragReport, ServiceError> {
        let dev = self.devices.get_or_404(device)?;
        Ok(dev.defragment(device, &self.ledger, options, max_time, progress))
    }

    /// The plan a pass would make for one pool now (tests compare it with what the pass did).
    #[cfg(test)]
    fn plan_now(
        &self,
        device: DeviceId,
        kind: MemoryKind,
        options: DefragOptions,
    ) -> memwarden_core::defrag::DefragPlan {
        self.devices.get_or_404(device).expect("device").plan_now(device, &self.ledger, kind, options)
    }

    /// Every block of every pool of `device`, with its ranges and the allocation in each.
    pub fn pools(&self, device: DeviceId) -> Result<Vec<PoolDump>, ServiceError> {
        Ok(self.devices.get_or_404(device)?.pools(device, &self.ledger))
    }

    /// Whether `size_bytes` of `kind` fits on `device` now: in the pool's free space, in new
    /// memory from the OS or driver, or not at all (with the reason). Changes nothing.
    pub fn can_allocate(
        &self,
        device: DeviceId,
        size_bytes: u64,
        kind: Option<MemoryKind>,
    ) -> Result<CanAllocate, ServiceError> {
        self.devices.get_or_404(device)?.can_allocate(device, size_bytes, kind)
    }

    /// Enforces `entries` from now on (the service starts with none); allocations already
    /// live count against them. Refused, changing nothing, when `Config::validate` would refuse
    /// them.
    pub fn set_quotas(
        &mut self,
        entries: &[crate::config::quotas::QuotaEntry],
    ) -> Result<(), crate::config::ConfigError> {
        let offered = self.devices.offered();
        let ledger = self.ledger.lock();
        self.quotas.set(entries, &offered, ledger.records.values())
    }

    /// Every owner's live allocations per device and kind (bytes, count, the quota that binds),
    /// and every quota with its use.
    pub fn owners(&self) -> OwnersReport {
        let offered = self.devices.offered();
        self.quotas.report(self.ledger.lock().records.values(), &offered)
    }

    /// How often to call [`Service::reap_dead_owners`].
    pub const REAP_INTERVAL: Duration = owners::REAP_INTERVAL;

    /// Frees what owner processes that exited held (`ownerPid`), each logged as `reclaimed`:
    /// per process, its pid, the allocations freed and their bytes. The server calls this every
    /// [`Service::REAP_INTERVAL`].
    pub fn reap_dead_owners(&self) -> Vec<(u32, usize, u64)> {
        self.owners.reap(&self.ledger, |id| self.free_as(id, true))
    }

    /// Lets a connection own memory (`owner_client`) until [`Service::reclaim_client`].
    pub fn open_client(&self, client: &str) {
        self.ledger.open_client(client);
    }

    /// Closes a connection's ownership and frees what it owned, each logged as `reclaimed`:
    /// the count and bytes freed, and the ids a copy is still using (freed when it is done).
    /// Closing and collecting happen under one lock, so an allocation still in flight for the
    /// connection is refused, never missed.
    pub fn reclaim_client(&self, client: &str) -> (usize, u64, Vec<String>) {
        self.reclaim(&self.ledger.close_client(client))
    }

    /// Frees these allocations as `reclaimed` (their owner is gone): the count and bytes freed,
    /// and the ids still in use by a copy, which are freed (also as `reclaimed`) when the last
    /// copy releases them. Ids already gone are skipped.
    pub fn reclaim(&self, ids: &[String]) -> (usize, u64, Vec<String>) {
        owners::reclaim(ids, |id| self.free_as(id, true))
    }

    /// Whether the service records counters and events (`analytics.enabled`).
    pub fn recording(&self) -> bool {
        self.ledger.lock().recorder.enabled()
    }

    /// A device's counters, live bytes, peak and last failure (zeros before its first event).
    pub fn device_record(&self, device: DeviceId) -> DeviceRecord {
        self.ledger.lock().recorder.device_record(device)
    }

    /// The event log, oldest first: only `device`'s when given, only events at or after `since`.
    /// `allocated` entries get their record from the ledger (live) or their `freed` entry.
    pub fn allocation_events(&self, device: Option<DeviceId>, since: Option<OffsetDateTime>) -> Vec<AllocationEvent> {
        let ledger = self.ledger.lock();
        ledger.recorder.events(&ledger.records, device, since)
    }

    /// The log's capacity, the time of its oldest event, and of the newest event it dropped
    /// (a window that starts before that is incomplete).
    pub fn event_log_extent(&self) -> (usize, Option<OffsetDateTime>, Option<OffsetDateTime>) {
        self.ledger.lock().recorder.extent()
    }

    /// When each owner that holds live allocations last allocated or freed (the ledger's
    /// running totals; analytics' leak suspects read the same figure).
    pub fn owner_activity(&self) -> HashMap<String, OffsetDateTime> {
        self.ledger.owner_activity()
    }

    /// Starts every device's live-bytes peak over from its current value.
    pub fn reset_live_peaks(&self, at: OffsetDateTime) {
        self.ledger.lock().recorder.reset_live_peaks(at);
    }

    /// Starts a transfer: checks every field, places a new destination if asked, marks both
    /// allocations busy, and copies — synchronously up to the configured size, otherwise on a
    /// background thread (`status: running`). A failed copy reports `failed` with the error;
    /// a destination it created is freed again, and a `move` keeps its source.
    pub fn transfer(self: &Arc<Self>, req: TransferRequest) -> Result<TransferRecord, ServiceError> {
        self.transfers.start(self, req)
    }

    /// A transfer by id (running, or among the last finished ones).
    pub fn transfer_status(&self, id: &str) -> Result<TransferRecord, ServiceError> {
        self.transfers.status(id)
    }
}

#[cfg(test)]
mod tests;
