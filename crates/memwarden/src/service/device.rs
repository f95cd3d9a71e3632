//! One device: its backend, its pools (one per memory kind), its reservations and its cached
//! status sample, behind one lock. The device decides everything about placing bytes on it:
//! whether a request suits it ([`Device::check_request`], the one place a request's size and
//! alignment are checked), whether it fits the budget, and when a pool grows by a block (budget
//! admission and block growth side by side in [`DeviceState::allocate`]).

use super::{AllocateRequest, ServiceError};
use memwarden_backends::{Backend, BackendError, MemoryPool, MemoryReading, PoolAllocation};
use memwarden_core::{DeviceId, MemoryKind, Placement, PoolConfig, PoolError, PoolStats};
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// Per-device limits from the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Bytes of available memory allocations never take.
    pub headroom_bytes: u64,
    /// Largest size of each pool; 0: no cap.
    pub pool_cap_bytes: u64,
    /// Largest age of a status sample used for budgets and status.
    pub max_age: Duration,
}

impl From<&crate::config::PoolSection> for Limits {
    fn from(c: &crate::config::PoolSection) -> Self {
        Limits {
            headroom_bytes: c.headroom_bytes,
            pool_cap_bytes: c.max_pool_bytes,
            max_age: Duration::from_millis(c.status_max_age_ms),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits { headroom_bytes: 0, pool_cap_bytes: 0, max_age: Duration::from_millis(100) }
    }
}

/// One device of this machine. Owns its backend, its [`DeviceState`] (pools and budget) behind
/// one lock, and the lock that lets one defragmentation pass at a time run on it (the pass
/// itself is in `defrag.rs`).
pub(crate) struct Device {
    pub backend: Arc<dyn Backend>,
    pub state: std::sync::Mutex<DeviceState>,
    /// Held for a defragmentation pass: one pass per device at a time.
    pub defrag: std::sync::Mutex<()>,
    /// The largest alignment its pools take (fixed when they are made).
    pool_max_alignment_bytes: u64,
}

/// What a device holds, under its lock: one [`MemoryPool`] per memory kind, the bytes promised
/// to reservations, the cached status sample and the configured limits (headroom, pool cap,
/// sample age). It owns the budget: every allocation is admitted here, against a fresh reading
/// when it needs a new block, just before the pool grows by that block.
pub(crate) struct DeviceState {
    pub pools: Vec<MemoryPool>,
    /// Bytes promised to `reservation` allocations (budget without memory).
    pub reservation_bytes: u64,
    sample: Option<Arc<Sample>>,
    headroom_bytes: u64,
    /// Largest size of each pool (bytes held from the OS or driver); 0: no cap.
    pool_cap_bytes: u64,
    max_age: Duration,
}

#[derive(Clone)]
pub(crate) struct Sample {
    pub reading: MemoryReading,
    pub taken: Instant,
    pub taken_at: OffsetDateTime,
}

/// Where N bytes would come from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Free space the pool already holds.
    Pool,
    /// A new block from the OS or driver.
    NewMemory,
    /// Budget only (a reservation).
    Budget,
    No,
}

impl Fit {
    pub fn as_str(self) -> &'static str {
        match self {
            Fit::Pool => "pool",
            Fit::NewMemory => "newMemory",
            Fit::Budget => "budget",
            Fit::No => "no",
        }
    }
}

/// Why an allocation did not happen; in every case nothing was changed.
pub(crate) enum AllocFailure {
    Backend(BackendError),
    /// The request does not fit the budget.
    OverBudget {
        requested_bytes: u64,
        available_bytes: u64,
        detail: String,
    },
    /// It needs a new block and the caller asked not to wait for one.
    WouldBlock,
}

impl From<BackendError> for AllocFailure {
    fn from(e: BackendError) -> Self {
        AllocFailure::Backend(e)
    }
}

impl Device {
    /// The device's checks of an allocation request, in the order they are reported: alignment
    /// (a power of two, at most what the backend and the pool of its kind allow) and memory
    /// kind (one the backend offers, or a reservation). The request's size and text were
    /// checked before (`Service::allocate`); nothing below checks them again. Returns the kind.
    pub fn check_request(&self, id: DeviceId, req: &AllocateRequest) -> Result<MemoryKind, ServiceError> {
        if !req.alignment_bytes.is_power_of_two() {
            return Err(ServiceError::invalid("alignment", format!("{} is not a power of two", req.alignment_bytes)));
        }
        let backend = self.backend.as_ref();
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
        if kind != MemoryKind::Reservation {
            // The pools' own limit (the configured one, capped at the backend's).
            let max = self.pool_max_alignment_bytes;
            if req.alignment_bytes > max {
                let e = PoolError::AlignmentTooLarge { requested: req.alignment_bytes, max };
                return Err(ServiceError::from_backend(id, BackendError::InvalidArgument(e.to_string())));
            }
        }
        Ok(kind)
    }

    pub fn new(backend: Arc<dyn Backend>, pool: PoolConfig, limits: Limits) -> Self {
        let pools: Vec<MemoryPool> =
            backend.kinds().iter().map(|&k| MemoryPool::new(backend.clone(), k, pool)).collect();
        Device {
            pool_max_alignment_bytes: pools.iter().map(|p| p.max_alignment_bytes()).min().unwrap_or(u64::MAX),
            backend,
            state: std::sync::Mutex::new(DeviceState {
                pools,
                reservation_bytes: 0,
                sample: None,
                headroom_bytes: limits.headroom_bytes,
                pool_cap_bytes: limits.pool_cap_bytes,
                max_age: limits.max_age,
            }),
            defrag: std::sync::Mutex::new(()),
        }
    }
}

impl DeviceState {
    pub fn pool_mut(&mut self, kind: MemoryKind) -> Option<&mut MemoryPool> {
        self.pools.iter_mut().find(|p| p.kind() == kind)
    }

    pub fn pool(&self, kind: MemoryKind) -> Option<&MemoryPool> {
        self.pools.iter().find(|p| p.kind() == kind)
    }

    /// A status sample no older than `max_age` (zero: read now).
    /// Shared, so the per-allocation budget check copies no strings or process lists.
    pub fn sample(&mut self, backend: &dyn Backend, max_age: Duration) -> Result<Arc<Sample>, BackendError> {
        match &self.sample {
            Some(s) if s.taken.elapsed() <= max_age => Ok(s.clone()),
            _ => {
                let s = Arc::new(Sample {
                    reading: backend.read_status()?,
                    taken: Instant::now(),
                    taken_at: OffsetDateTime::now_utc(),
                });
                self.sample = Some(s.clone());
                Ok(s)
            }
        }
    }

    /// The configured largest age of a status sample.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// Forgets the cached sample (after this daemon changed the device's memory).
    pub fn invalidate_sample(&mut self) {
        self.sample = None;
    }

    pub fn pool_totals(&self) -> PoolStats {
        let mut t = PoolStats::default();
        for p in &self.pools {
            let s = p.stats();
            t.reserved_bytes += s.reserved_bytes;
            t.allocated_bytes += s.allocated_bytes;
            t.free_in_pool_bytes += s.free_in_pool_bytes;
            t.largest_free_block_bytes = t.largest_free_block_bytes.max(s.largest_free_block_bytes);
            t.block_count += s.block_count;
            t.allocation_count += s.allocation_count;
            t.empty_block_bytes += s.empty_block_bytes;
            t.free_range_count += s.free_range_count;
        }
        t
    }

    /// Where `size_bytes` of `kind` would come from now, without allocating anything (a pool
    /// hit is tried and undone under the lock).
    pub fn probe(&mut self, backend: &dyn Backend, kind: MemoryKind, size_bytes: u64) -> (Fit, Option<AllocFailure>) {
        if kind == MemoryKind::Reservation {
            return match self.admit(backend, kind, size_bytes, 0) {
                Ok(()) => (Fit::Budget, None),
                Err(f) => (Fit::No, Some(f)),
            };
        }
        let Some(pool) = self.pool_mut(kind) else {
            return (
                Fit::No,
                Some(AllocFailure::Backend(BackendError::UnsupportedKind { device: backend.info().device_id, kind })),
            );
        };
        let align = crate::service::DEFAULT_ALIGNMENT_BYTES;
        if let Some(hit) = pool.try_allocate_cached(size_bytes, align) {
            let _ = pool.free(&hit.placement);
            return match self.admit(backend, kind, size_bytes, 0) {
                Ok(()) => (Fit::Pool, None),
                Err(f) => (Fit::No, Some(f)),
            };
        }
        let new_block = pool.new_block_bytes(size_bytes, align);
        match self.admit(backend, kind, size_bytes, new_block) {
            Ok(()) => (Fit::NewMemory, None),
            Err(f) => (Fit::No, Some(f)),
        }
    }

    /// What allocations may still take: available memory plus free space cached in the pools,
    /// less outstanding reservations and the configured headroom; for a kind with its own limit
    /// (pinned: RLIMIT_MEMLOCK) no more than that limit leaves.
    fn budget_bytes(&self, backend: &dyn Backend, reading: &MemoryReading, kind: MemoryKind) -> u64 {
        let pooled: u64 = self.pools.iter().map(|p| p.free_in_pool_bytes()).sum();
        let mut budget =
            (reading.available_bytes + pooled).saturating_sub(self.reservation_bytes + self.headroom_bytes);
        if let Some(limit) = backend.kind_limit_bytes(kind) {
            let held = self.pool(kind).map(|p| p.reserved_bytes()).unwrap_or(0);
            budget = budget.min(limit.saturating_sub(held));
        }
        budget
    }

    /// Checks `size_bytes` (and a new block of `new_block_bytes`, if one is needed) against the
    /// budget. New blocks are checked against a fresh reading; pool hits against the cached one.
    fn admit(
        &mut self,
        backend: &dyn Backend,
        kind: MemoryKind,
        size_bytes: u64,
        new_block_bytes: u64,
    ) -> Result<(), AllocFailure> {
        if new_block_bytes == 0 && kind != MemoryKind::Reservation && self.reservation_bytes + self.headroom_bytes == 0
        {
            // A pool hit takes no new memory, and with nothing reserved or held back the budget
            // (available + cached free − 0) is at least the cached free space the hit came
            // from: it fits by construction, so no status sample (and no clock read) is needed.
            return Ok(());
        }
        let age = if new_block_bytes > 0 { Duration::ZERO } else { self.max_age };
        let sample = self.sample(backend, age)?;
        let reading = &sample.reading;
        let budget = self.budget_bytes(backend, reading, kind);
        if size_bytes > budget {
            return Err(AllocFailure::OverBudget {
                requested_bytes: size_bytes,
                available_bytes: budget,
                detail: format!(
                    "{} budget for {kind} memory{}",
                    backend.info().device_id,
                    self.limit_note(backend, kind)
                ),
            });
        }
        if new_block_bytes > 0 {
            // The block must come out of memory the OS or driver has, not out of cached pools.
            let mut fresh = reading.available_bytes.saturating_sub(self.reservation_bytes + self.headroom_bytes);
            if let Some(limit) = backend.kind_limit_bytes(kind) {
                let held = self.pool(kind).map(|p| p.reserved_bytes()).unwrap_or(0);
                fresh = fresh.min(limit.saturating_sub(held));
            }
            if new_block_bytes > fresh {
                return Err(AllocFailure::OverBudget {
                    requested_bytes: size_bytes,
                    available_bytes: fresh,
                    detail: format!(
                        "a new pool block of {new_block_bytes} bytes is needed and does not fit{}",
                        self.limit_note(backend, kind)
                    ),
                });
            }
            let held = self.pool(kind).map(|p| p.reserved_bytes()).unwrap_or(0);
            if self.pool_cap_bytes > 0 && held + new_block_bytes > self.pool_cap_bytes {
                let free_in_pool = self.pool(kind).map(|p| p.free_in_pool_bytes()).unwrap_or(0);
                return Err(AllocFailure::OverBudget {
                    requested_bytes: size_bytes,
                    available_bytes: free_in_pool,
                    detail: format!(
                        "the {kind} pool is capped at {} bytes (pool.max_pool_bytes) and holds {held}; no free range of it is large enough (defragmenting may help)",
                        self.pool_cap_bytes
                    ),
                });
            }
        }
        Ok(())
    }

    /// Names a kind's own limit (pinned: RLIMIT_MEMLOCK) in a refusal; empty for kinds without one.
    fn limit_note(&self, backend: &dyn Backend, kind: MemoryKind) -> String {
        let Some(limit) = backend.kind_limit_bytes(kind) else { return String::new() };
        let held = self.pool(kind).map(|p| p.reserved_bytes()).unwrap_or(0);
        format!("; {} allows {limit} bytes of {kind} memory, {held} of them held", backend.kind_limit_name(kind))
    }

    /// Takes budget for a reservation.
    pub fn reserve(&mut self, backend: &dyn Backend, size_bytes: u64) -> Result<(), AllocFailure> {
        self.admit(backend, MemoryKind::Reservation, size_bytes, 0)?;
        self.reservation_bytes += size_bytes;
        Ok(())
    }

    /// Allocates from the pool of `kind` after the budget check; nothing is changed on failure.
    /// With `may_block` false, a request that needs a new block (an OS or driver call that can
    /// take milliseconds) fails with `WouldBlock` instead. The request passed
    /// [`Device::check_request`]: the pool does not check it again.
    ///
    /// One pass: a hit in the cached blocks is admitted against the budget (and given back when
    /// it does not fit); otherwise the new block is admitted against a fresh reading, and only
    /// then does the pool grow by it.
    pub fn allocate(
        &mut self,
        backend: &dyn Backend,
        kind: MemoryKind,
        size_bytes: u64,
        align_bytes: u64,
        may_block: bool,
    ) -> Result<PoolAllocation, AllocFailure> {
        let unsupported = || BackendError::UnsupportedKind { device: backend.info().device_id, kind };
        let pool = self.pool_mut(kind).ok_or_else(unsupported)?;
        // Try the cached blocks first; a hit costs no new memory.
        if let Some(hit) = pool.try_allocate_cached(size_bytes, align_bytes) {
            if let Err(over) = self.admit(backend, kind, size_bytes, 0) {
                self.pool_mut(kind).ok_or_else(unsupported)?.free(&hit.placement)?;
                return Err(over);
            }
            return Ok(hit);
        }
        if !may_block {
            return Err(AllocFailure::WouldBlock);
        }
        let new_block = pool.new_block_bytes(size_bytes, align_bytes);
        self.admit(backend, kind, size_bytes, new_block)?;
        let allocation = self.pool_mut(kind).ok_or_else(unsupported)?.grow(size_bytes, align_bytes);
        self.invalidate_sample();
        Ok(allocation?)
    }

    pub fn free(
        &mut self,
        kind: MemoryKind,
        placement: Option<&Placement>,
        size_bytes: u64,
    ) -> Result<(), BackendError> {
        match (kind, placement) {
            (MemoryKind::Reservation, _) => {
                self.reservation_bytes -= size_bytes.min(self.reservation_bytes);
                Ok(())
            }
            (_, Some(p)) => {
                let pool = self
                    .pool_mut(kind)
                    .ok_or_else(|| BackendError::InvalidArgument(format!("no {kind} pool on this device")))?;
                let before = pool.reserved_bytes();
                pool.free(p)?;
                if pool.reserved_bytes() != before {
                    self.invalidate_sample();
                }
                Ok(())
            }
            (_, None) => Err(BackendError::InvalidArgument("allocation has no placement".into())),
        }
    }

    /// Returns every empty block of every pool to the OS or driver; the bytes released.
    pub fn clear(&mut self) -> Result<u64, BackendError> {
        let mut cleared = 0;
        for p in &mut self.pools {
            cleared += p.clear()?.1;
        }
        self.invalidate_sample();
        Ok(cleared)
    }
}
