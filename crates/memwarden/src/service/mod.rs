//! The service layer: the device registry, the allocation ledger and every memory operation,
//! independent of HTTP. The REST API and tests call it; it calls the backends.

mod defrag;
mod device;
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

pub use device::Limits;
use device::{AllocFailure, Device};
use ledger::Ledger;
use memwarden_backends::Backend;
pub use memwarden_backends::BackendHealth;
use memwarden_core::{DeviceId, MemoryKind, PoolConfig};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
pub use types::{
    AllocateRequest, Allocation, AllocationRecord, ClearOutcome, DeviceStatus, FreedAllocation, LedgerError,
    ServiceError, DEFAULT_ALIGNMENT_BYTES,
};

use crate::config::Config;
use crate::util::lock;
use memwarden_core::units::MIB;

/// Longest free-text field (`purpose`, `owner`) an allocation takes, in characters: they go
/// into the event log and every listing.
pub const MAX_TEXT_CHARS: usize = 256;

pub struct Service {
    devices: Vec<(DeviceId, Device)>,
    ledger: Mutex<Ledger>,
    /// Signalled when a defragmentation batch finishes moving its allocations.
    settled: Condvar,
    transfers: Mutex<transfer::Transfers>,
    backends: Vec<BackendHealth>,
    pool_config: PoolConfig,
    /// Transfers up to this size answer synchronously; larger ones run in the background.
    sync_transfer_max_bytes: u64,
    /// When set, an allocation that does not fit on a fragmented device triggers a bounded pass.
    auto_defrag: Option<crate::config::DefragSection>,
    /// Per device: allocations that did not fit (a pressure signal of their own).
    failures: Mutex<HashMap<DeviceId, u64>>,
    /// `[[quotas]]`, fixed at start (what owners hold under them is in the ledger).
    quotas: quota::QuotaRules,
    /// The processes that own allocations (`ownerPid`), watched so their memory comes back.
    owners: owners::OwnerWatch,
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
        service.backends = found.health;
        service.host_signals = Some(found.host_signals);
        service.sync_transfer_max_bytes = config.transfer.sync_max_bytes;
        if let Err(e) = service.set_quotas(&config.quotas) {
            tracing::error!(error = %e, "no quota is enforced: [[quotas]] is invalid");
        }
        service
    }

    /// A service over the given backends (tests and embedding).
    pub fn with_backends(backends: Vec<Arc<dyn Backend>>, pool: PoolConfig, limits: Limits) -> Self {
        let health = vec![BackendHealth {
            name: "host",
            available: true,
            devices: backends.iter().map(|b| b.info().device_id.to_string()).collect(),
            reason: None,
        }];
        Service {
            devices: backends.into_iter().map(|b| (b.info().device_id, Device::new(b, pool, limits))).collect(),
            settled: Condvar::new(),
            ledger: Mutex::new(Ledger {
                records: live::LiveSet::default(),
                busy: HashMap::new(),
                moving: HashSet::new(),
                open_clients: HashSet::new(),
                reclaim_on_release: HashSet::new(),
                recorder: record::Recorder::new(true, 10_000),
                quota: quota::QuotaBooks::default(),
            }),
            transfers: Mutex::new(transfer::Transfers::default()),
            backends: health,
            pool_config: pool,
            sync_transfer_max_bytes: 64 * MIB,
            auto_defrag: None,
            failures: Mutex::new(HashMap::new()),
            quotas: quota::QuotaRules::default(),
            owners: owners::OwnerWatch::default(),
            started_at: OffsetDateTime::now_utc(),
            host_signals: None,
        }
    }

    /// Turns recording (counters, peaks, the event log of `log_size` entries) on or off; what
    /// was recorded is dropped.
    pub fn set_recording(&mut self, enabled: bool, log_size: usize) {
        lock(&self.ledger).recorder = record::Recorder::new(enabled, log_size);
    }

    pub fn started_at(&self) -> OffsetDateTime {
        self.started_at
    }

    pub fn backends(&self) -> &[BackendHealth] {
        &self.backends
    }

    /// The host's pressure signals (PSI, cgroup limit events, the stall trigger), when this
    /// service discovered its backends itself.
    pub fn host_signals(&self) -> Option<Arc<dyn memwarden_backends::HostSignals>> {
        self.host_signals.clone()
    }

    pub fn device_ids(&self) -> Vec<DeviceId> {
        self.devices.iter().map(|(id, _)| *id).collect()
    }

    /// Resolves a device id or alias to a device of this machine.
    pub fn resolve(&self, text: &str) -> Result<DeviceId, ServiceError> {
        let not_found = || ServiceError::DeviceNotFound {
            requested: text.to_string(),
            known: self.devices.iter().map(|(id, _)| id.to_string()).collect(),
        };
        let id = DeviceId::parse_among(text, &self.device_ids()).map_err(|_| not_found())?;
        if self.device(id).is_some() {
            return Ok(id);
        }
        // A GPU id whose backend is known here but not available (no driver, no device): say so,
        // with the canonical id and the backend's reason, rather than "not found".
        if let DeviceId::Gpu(api, _) = id {
            let down = self.backends.iter().find(|b| b.name == api.prefix() && !b.available);
            if let Some(b) = down {
                return Err(ServiceError::BackendUnavailable {
                    device: id.to_string(),
                    reason: format!(
                        "the {} backend is not available: {}",
                        b.name,
                        b.reason.as_deref().unwrap_or("no reason given")
                    ),
                });
            }
        }
        Err(ServiceError::DeviceNotFound {
            requested: id.to_string(),
            known: self.devices.iter().map(|(id, _)| id.to_string()).collect(),
        })
    }

    /// The device an allocation that names none goes to (the seed leaves this open): of the
    /// devices that provide `kind` (each device's own default kind when `None`; a reservation
    /// fits any), the one with the most available memory now. Ties go to the first listed.
    pub fn roomiest_device(&self, kind: Option<MemoryKind>) -> Result<DeviceId, ServiceError> {
        let mut best: Option<(DeviceId, u64)> = None;
        for (id, dev) in &self.devices {
            let k = kind.unwrap_or(id.default_kind());
            if k != MemoryKind::Reservation && !dev.backend.kinds().contains(&k) {
                continue;
            }
            let Ok(status) = self.status(*id) else { continue };
            if best.is_none_or(|(_, b)| status.available_bytes > b) {
                best = Some((*id, status.available_bytes));
            }
        }
        best.map(|(id, _)| id).ok_or_else(|| {
            ServiceError::invalid(
                "memoryType",
                format!("no device here provides {} memory", kind.unwrap_or(MemoryKind::Host)),
            )
        })
    }

    /// The backend of a device (the pressure monitor samples through it).
    pub fn backend(&self, id: DeviceId) -> Option<&Arc<dyn Backend>> {
        self.device(id).map(|d| &d.backend)
    }

    /// `(total, available)` bytes of `device` read from the OS or driver now (no cached sample;
    /// the status cache is dropped too, so the next status shows the change).
    pub fn measure_now(&self, device: DeviceId) -> Result<(u64, u64), ServiceError> {
        let dev = self.device_or_404(device)?;
        dev.backend.refresh();
        let reading = dev.backend.sample().map_err(|e| ServiceError::from_backend(device, e))?;
        lock(&dev.state).invalidate_sample();
        Ok(reading)
    }

    /// Allocations on `device` that did not fit, since start.
    pub fn allocation_failures(&self, device: DeviceId) -> u64 {
        lock(&self.failures).get(&device).copied().unwrap_or(0)
    }

    fn note_allocation_failure(&self, device: DeviceId) {
        *lock(&self.failures).entry(device).or_default() += 1;
    }

    fn device(&self, id: DeviceId) -> Option<&Device> {
        self.devices.iter().find(|(d, _)| *d == id).map(|(_, dev)| dev)
    }

    fn device_or_404(&self, id: DeviceId) -> Result<&Device, ServiceError> {
        self.device(id).ok_or_else(|| ServiceError::DeviceNotFound {
            requested: id.to_string(),
            known: self.devices.iter().map(|(id, _)| id.to_string()).collect(),
        })
    }

    /// Status of one device, from a sample no older than the configured maximum age.
    pub fn status(&self, id: DeviceId) -> Result<DeviceStatus, ServiceError> {
        let dev = self.device_or_404(id)?;
        let mut st = lock(&dev.state);
        let max_age = st.max_age();
        let sample = st.sample(dev.backend.as_ref(), max_age).map_err(|e| ServiceError::from_backend(id, e))?;
        let info = dev.backend.info();
        Ok(DeviceStatus {
            device: id,
            device_type: info.device_type,
            name: info.name.clone(),
            memory_type: info.memory_type,
            total_bytes: sample.reading.total_bytes,
            available_bytes: sample.reading.available_bytes,
            used_bytes: sample.reading.used_bytes,
            source: sample.reading.source.clone(),
            last_updated: sample.taken_at,
            pools: st.pools.iter().map(|p| (p.kind(), p.stats())).collect(),
            reservation_bytes: st.reservation_bytes,
            gpu: info.gpu.clone(),
            extra: info.extra.clone(),
            driver_reserved_bytes: sample.reading.reserved_bytes,
            processes: sample.reading.processes.clone(),
            fault: dev.backend.fault(),
        })
    }

    pub fn status_all(&self) -> Result<Vec<DeviceStatus>, ServiceError> {
        self.devices.iter().map(|(id, _)| self.status(*id)).collect()
    }

    /// Allocates, creating pool blocks as needed (which can take milliseconds per GiB).
    pub fn allocate(&self, req: AllocateRequest) -> Result<Allocation, ServiceError> {
        let device = req.device.clone();
        let is_reservation = req.kind == Some(MemoryKind::Reservation);
        // Keep a copy for the retry only when an automatic pass could retry it.
        let retry = self.auto_defrag.as_ref().map(|auto| (auto.clone(), req.clone()));
        let first = self.allocate_inner(req, true);
        let result = match (first, retry) {
            (Err(e @ ServiceError::InsufficientMemory { .. }), retry) => {
                let id = self.resolve(&device)?;
                self.note_allocation_failure(id);
                // A reservation that does not fit is a budget answer, not a placement failure.
                if let (ServiceError::InsufficientMemory { requested_bytes, .. }, false) = (&e, is_reservation) {
                    lock(&self.ledger).recorder.failed(id, *requested_bytes);
                }
                let Some((auto, req)) = retry else { return Err(e) };
                // Fragmented and out of room: one bounded pass, then one more try.
                if self.fragmentation(id) < auto.fragmentation_threshold {
                    return Err(e);
                }
                let options = memwarden_core::defrag::DefragOptions {
                    strategy: auto.strategy,
                    max_bytes_to_move: auto.max_bytes_to_move,
                    max_allocations_to_move: usize::MAX,
                };
                // A pass already running on the device is not waited for: the allocation fails.
                let Some(report) = self.defragment_if_idle(id, options, Some(Duration::from_millis(auto.max_time_ms)))
                else {
                    return Err(e);
                };
                let report = report?;
                tracing::info!(device = %id, moved = report.bytes_moved, released = report.bytes_released, "automatic defragmentation after a failed allocation");
                self.allocate_inner(req, true)
            }
            (r, _) => r,
        };
        result?.ok_or_else(|| ServiceError::BackendFailed {
            device,
            message: "allocation deferred although blocking was allowed".into(),
        })
    }

    /// Allocates only if no OS or driver call is needed (a pool hit or a reservation):
    /// `Ok(None)` when it would need a new block, or does not fit (then `allocate` records the
    /// failure and may defragment). Lets async callers skip a thread hand-off on the
    /// microsecond path.
    pub fn try_allocate_now(&self, req: AllocateRequest) -> Result<Option<Allocation>, ServiceError> {
        match self.allocate_inner(req, false) {
            Err(ServiceError::InsufficientMemory { .. }) => Ok(None),
            other => other,
        }
    }

    fn allocate_inner(&self, req: AllocateRequest, may_block: bool) -> Result<Option<Allocation>, ServiceError> {
        let id = self.resolve(&req.device)?;
        for (field, text) in [("purpose", &req.purpose), ("owner", &req.owner)] {
            if let Some(t) = text.as_deref().filter(|t| t.chars().count() > MAX_TEXT_CHARS) {
                return Err(ServiceError::invalid(
                    field,
                    format!("{} characters, more than the {MAX_TEXT_CHARS} allowed", t.chars().count()),
                ));
            }
        }
        if req.size_bytes == 0 {
            return Err(ServiceError::invalid("sizeBytes", "must be greater than 0"));
        }
        if let Some(pid) = req.owner_pid {
            self.owners.watch(pid)?;
        }
        if !req.alignment_bytes.is_power_of_two() {
            return Err(ServiceError::invalid("alignment", format!("{} is not a power of two", req.alignment_bytes)));
        }
        let dev = self.device_or_404(id)?;
        let backend = dev.backend.as_ref();
        if req.alignment_bytes > backend.max_alignment_bytes() {
            return Err(ServiceError::invalid(
                "alignment",
                format!(
                    "{} exceeds the largest alignment {id} supports ({})",
                    req.alignment_bytes,
                    backend.max_alignment_bytes()
                ),
            ));
        }
        let kind = req.kind.unwrap_or(id.default_kind());
        if kind != MemoryKind::Reservation && !backend.kinds().contains(&kind) {
            let offered: Vec<&str> = backend.kinds().iter().map(|k| k.as_str()).chain(["reservation"]).collect();
            return Err(ServiceError::invalid(
                "memoryType",
                format!("{id} does not provide {kind} memory (it offers {})", offered.join(", ")),
            ));
        }
        // Charged before the pool is asked, so concurrent requests cannot overshoot together.
        let charge = self.charge_quota(req.owner.as_deref(), id, kind, req.size_bytes)?;
        let outcome = {
            let mut st = lock(&dev.state);
            if kind == MemoryKind::Reservation {
                st.reserve(backend, req.size_bytes).map(|()| (req.size_bytes, None, None))
            } else {
                st.allocate(backend, kind, req.size_bytes, req.alignment_bytes, may_block)
                    .map(|a| (a.placement.size_bytes, Some(a.address), Some(a.placement)))
            }
        };
        let charge = match (&outcome, charge) {
            (Err(_), Some(c)) => {
                lock(&self.ledger).quota.abandon(c);
                None
            }
            (_, c) => c,
        };
        let (allocated_bytes, address, placement) = match outcome {
            Ok(placed) => placed,
            Err(AllocFailure::WouldBlock) => return Ok(None),
            Err(AllocFailure::Backend(e)) => return Err(ServiceError::from_backend(id, e)),
            Err(AllocFailure::OverBudget { requested_bytes, available_bytes, detail }) => {
                return Err(ServiceError::InsufficientMemory {
                    device: id.to_string(),
                    requested_bytes,
                    available_bytes,
                    detail,
                })
            }
        };
        // One clock read serves the record and the event log.
        let now = std::time::SystemTime::now();
        let now_ns = now.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
        let uuid = uuid::Uuid::new_v4();
        let record = Arc::new(AllocationRecord {
            id: uuid.to_string(),
            device: id,
            kind,
            size_bytes: req.size_bytes,
            allocated_bytes,
            alignment_bytes: req.alignment_bytes,
            address,
            placement,
            purpose: req.purpose,
            owner: req.owner,
            owner_pid: req.owner_pid,
            owner_client: req.owner_client,
            persistent: req.persistent,
            movable: req.movable,
            exported: false,
            generation: 0,
            allocated_at: OffsetDateTime::from(now),
        });
        let orphan = {
            let mut ledger = lock(&self.ledger);
            let orphan = record.owner_client.as_ref().is_some_and(|c| !ledger.open_clients.contains(c));
            match (orphan, charge) {
                (true, Some(c)) => ledger.quota.abandon(c),
                (false, Some(c)) => ledger.quota.settle(c, allocated_bytes),
                (_, None) => {}
            }
            if !orphan {
                ledger.recorder.allocated(&record, uuid.as_u128(), now_ns);
                ledger.records.insert(record.clone(), now_ns);
            }
            orphan
        };
        if orphan {
            // The connection that asked closed meanwhile (its memory is already reclaimed):
            // give the placement back rather than leave memory nobody owns.
            if let Err(e) = lock(&dev.state).free(kind, record.placement.as_ref(), record.size_bytes) {
                tracing::warn!(device = %id, error = %e, "an allocation for a closed connection was not given back");
            }
            return Err(ServiceError::InvalidOperation(format!(
                "the connection '{}' closed before its allocation was made",
                record.owner_client.as_deref().unwrap_or_default()
            )));
        }
        Ok(Some(record))
    }

    /// True when freeing this allocation returns no memory to the OS or driver (it stays in a
    /// shared block, or is a reservation) and waits for no defragmentation batch, so it takes
    /// microseconds.
    pub fn free_is_quick(&self, allocation_id: &str) -> bool {
        let ledger = lock(&self.ledger);
        !ledger.moving.contains(allocation_id)
            && ledger.get(allocation_id).is_none_or(|r| {
                r.kind == MemoryKind::Reservation || r.allocated_bytes < self.pool_config.dedicated_threshold_bytes
            })
    }

    /// Frees an allocation. Unknown and already-freed ids are `AllocationNotFound`.
    pub fn free(&self, allocation_id: &str) -> Result<FreedAllocation, ServiceError> {
        self.free_as(allocation_id, false)
    }

    fn free_as(&self, allocation_id: &str, reclaimed: bool) -> Result<FreedAllocation, ServiceError> {
        let (freed, kept) = {
            let mut ledger = self.ledger_settled(&[allocation_id]);
            if let Some(&n) = (!ledger.busy.is_empty()).then(|| ledger.busy.get(allocation_id)).flatten() {
                if reclaimed {
                    // Its owner is gone: free it when the copy is done (`release`).
                    ledger.reclaim_on_release.insert(allocation_id.to_string());
                }
                return Err(ServiceError::InvalidOperation(format!(
                    "allocation '{allocation_id}' is in use by {n} transfer(s); free it when they finish"
                )));
            }
            let record = ledger
                .records
                .remove(allocation_id, memwarden_sys::coarse_unix_nanos())
                .ok_or_else(|| ServiceError::AllocationNotFound { id: allocation_id.to_string() })?;
            let freed = FreedAllocation {
                device: record.device,
                kind: record.kind,
                placement: record.placement,
                size_bytes: record.size_bytes,
                allocated_bytes: record.allocated_bytes,
            };
            ledger.quota.give_back(&self.quotas, &record);
            // The ledger's record moves into the event log (no copy); it comes back when
            // recording is off.
            (freed, ledger.recorder.freed(record, reclaimed))
        };
        let dev = self.device_or_404(freed.device)?;
        let result = lock(&dev.state).free(freed.kind, freed.placement.as_ref(), freed.size_bytes);
        if let Err(e) = result {
            // Keep the handle so the caller can retry; the pool did not change.
            let mut ledger = lock(&self.ledger);
            if let Some(record) = ledger.recorder.unfreed(allocation_id, kept) {
                ledger.quota.take_back(&self.quotas, &record);
                ledger.records.insert(record, memwarden_sys::coarse_unix_nanos());
            }
            return Err(ServiceError::from_backend(freed.device, e));
        }
        Ok(freed)
    }

    pub fn allocation(&self, allocation_id: &str) -> Result<Allocation, ServiceError> {
        lock(&self.ledger)
            .get(allocation_id)
            .cloned()
            .ok_or_else(|| ServiceError::AllocationNotFound { id: allocation_id.to_string() })
    }

    /// Live allocations, oldest first; only those of `device` when given.
    pub fn allocations(&self, device: Option<DeviceId>) -> Vec<Allocation> {
        let mut list: Vec<_> =
            lock(&self.ledger).records.values().filter(|r| device.is_none_or(|d| r.device == d)).cloned().collect();
        list.sort_by(|a, b| a.allocated_at.cmp(&b.allocated_at).then_with(|| a.id.cmp(&b.id)));
        list
    }

    /// Returns cached empty pool blocks to the OS or driver, on one device or all.
    pub fn clear(&self, device: Option<DeviceId>) -> Result<Vec<ClearOutcome>, ServiceError> {
        let ids = match device {
            Some(d) => vec![d],
            None => self.device_ids(),
        };
        let outcomes = ids
            .into_iter()
            .map(|id| {
                let dev = self.device_or_404(id)?;
                let mut st = lock(&dev.state);
                let cleared_bytes = st.clear().map_err(|e| ServiceError::from_backend(id, e))?;
                Ok(ClearOutcome { device: id, cleared_bytes, reserved_bytes_after: st.pool_totals().reserved_bytes })
            })
            .collect();
        // The daemon's own heap too: what request and answer buffers left free in it.
        if device.is_none_or(|d| d == DeviceId::Cpu) {
            memwarden_sys::release_free_heap();
        }
        outcomes
    }

    /// Checks every pool's invariants and that the ledger matches the pools.
    pub fn validate(&self) -> Result<(), LedgerError> {
        {
            let ledger = lock(&self.ledger);
            ledger.quota.check(&self.quotas, ledger.records.values())?;
            ledger.records.check()?;
        }
        for (id, dev) in &self.devices {
            // A device, then the ledger: the order every path that takes both keeps.
            let st = lock(&dev.state);
            let ledger = lock(&self.ledger);
            for pool in &st.pools {
                pool.validate().map_err(|source| LedgerError::Pool { device: *id, kind: pool.kind(), source })?;
                let in_ledger: u64 = ledger
                    .records
                    .values()
                    .filter(|r| r.device == *id && r.kind == pool.kind())
                    .map(|r| r.allocated_bytes)
                    .sum();
                if in_ledger != pool.stats().allocated_bytes {
                    return Err(LedgerError::Allocated {
                        device: *id,
                        kind: pool.kind(),
                        ledger_bytes: in_ledger,
                        pool_bytes: pool.stats().allocated_bytes,
                    });
                }
            }
            let reserved: u64 = ledger
                .records
                .values()
                .filter(|r| r.device == *id && r.kind == MemoryKind::Reservation)
                .map(|r| r.size_bytes)
                .sum();
            if reserved != st.reservation_bytes {
                return Err(LedgerError::Reserved {
                    device: *id,
                    ledger_bytes: reserved,
                    device_bytes: st.reservation_bytes,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
