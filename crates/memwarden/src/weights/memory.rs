//! The pinned host chunks a parked model's bytes wait in. A model's own memory is a block of
//! its device's dedicated memory (`memwarden_backends::DedicatedMemory`: a CUDA VMM allocation
//! on a GPU, a tmpfs file on cpu), exported to holders as a file descriptor.
//!
//! The pool follows what is held (docs/CONFIG.md, `weights.park_pool_bytes`): it keeps enough
//! free registered chunks for the next park, the size of the largest unpinned model resident
//! (or being loaded) on a device that parks, and at least `park_pool_bytes`; it grows and
//! shrinks on a background thread of its own, never on a request's path, within a share of
//! host memory.

use super::WeightsError;
use memwarden_backends::{ChunkPiece, DedicatedMemory, PinnedChunk};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::sync::lock;
use memwarden_core::units::MIB;

/// A run of park chunks holding one model's bytes; they go back to the pool when it is dropped.
pub struct ParkBuffer {
    chunks: Vec<PinnedChunk>,
    chunk_bytes: u64,
    pool: Arc<ParkPool>,
}

impl ParkBuffer {
    pub fn bytes(&self) -> u64 {
        self.chunks.len() as u64 * self.chunk_bytes
    }

    /// `(offset in the model, chunk, offset in the chunk, len)` for the first `len` bytes.
    pub fn pieces(&self, len: u64) -> Vec<ChunkPiece<'_>> {
        let mut out = Vec::with_capacity(self.chunks.len());
        let mut off = 0;
        for c in &self.chunks {
            if off >= len {
                break;
            }
            let n = self.chunk_bytes.min(len - off);
            out.push((off, c, 0, n));
            off += n;
        }
        out
    }
}

impl Drop for ParkBuffer {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.chunks));
    }
}

/// Threads that register chunks at once when the pool grows: page-locking is mostly the
/// kernel committing and pinning pages, which runs in parallel on separate mappings.
const GROW_THREADS: u64 = 4;
/// Chunks registered per batch before the pool looks at its target again.
const GROW_BATCH_CHUNKS: u64 = 16;

/// How big the pool may and must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// Bytes of one chunk (what a park takes at a time).
    pub chunk_bytes: u64,
    /// Free bytes kept ready whatever is held (`weights.park_pool_bytes`); 0: only what the
    /// models held ask for.
    pub floor_bytes: u64,
    /// Most bytes the pool registers in the background, free and parked together (a share of
    /// host memory, `weights.park_pool_max_percent`); a floor above it wins. A park beyond
    /// what is free still registers the rest on its own path.
    pub max_bytes: u64,
}

impl PoolLimits {
    /// Chunks of [`ParkPool::CHUNK_BYTES`], at least `floor_bytes` free, at most
    /// `max_percent` % of `host_bytes` registered in the background.
    pub fn new(floor_bytes: u64, max_percent: f64, host_bytes: u64) -> PoolLimits {
        let share = (max_percent.clamp(0.0, 100.0) / 100.0 * host_bytes as f64) as u64;
        PoolLimits { chunk_bytes: ParkPool::CHUNK_BYTES, floor_bytes, max_bytes: share }
    }
}

/// The pool's figures now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Registered bytes, free and parked.
    pub registered_bytes: u64,
    /// Registered bytes no park holds.
    pub free_bytes: u64,
    /// Free bytes the pool grows to: the largest demand, at least the floor, rounded up to
    /// whole chunks (before the cap).
    pub target_free_bytes: u64,
    /// The most the background registers (free and parked).
    pub max_bytes: u64,
    /// Chunks a park had to register on its own path since the start (the pool was short).
    pub chunks_on_park_path: u64,
}

/// Pinned host chunks for parking, registered ahead of time by the first device that parks
/// (for a GPU: with its driver, which costs about a millisecond per 8 MiB, which a park must
/// not pay). Parks take free chunks and give them back when resumed or dropped; a background
/// thread registers and releases chunks so that the free ones match the demand: the largest
/// single model that may be parked next ([`ParkPool::set_demand`]), at least the floor.
pub struct ParkPool {
    limits: PoolLimits,
    /// Where chunks come from; `None`: no device parks, so no chunk is ever needed.
    source: Option<Arc<dyn DedicatedMemory>>,
    free: Mutex<Vec<PinnedChunk>>,
    /// Bytes that may be parked next, by model (or load in progress).
    demand: Mutex<BTreeMap<String, u64>>,
    /// Chunks alive (free or parked).
    chunks: AtomicU64,
    on_park_path: AtomicU64,
    /// A background thread is adjusting the pool.
    running: AtomicBool,
    /// Something changed since the background thread last looked.
    dirty: AtomicBool,
    /// Closed: the background registers nothing more.
    closed: AtomicBool,
}

impl ParkPool {
    pub const CHUNK_BYTES: u64 = 256 * MIB;

    /// A pool of `limits`; it registers nothing until something is held (or the floor asks).
    pub fn new(limits: PoolLimits, source: Option<Arc<dyn DedicatedMemory>>) -> Arc<ParkPool> {
        Arc::new(ParkPool {
            limits: PoolLimits { chunk_bytes: limits.chunk_bytes.max(1), ..limits },
            source,
            free: Mutex::new(Vec::new()),
            demand: Mutex::new(BTreeMap::new()),
            chunks: 0.into(),
            on_park_path: 0.into(),
            running: false.into(),
            dirty: false.into(),
            closed: false.into(),
        })
    }

    pub fn limits(&self) -> PoolLimits {
        self.limits
    }

    /// A background thread is registering or releasing chunks now.
    pub fn busy(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Whether any device parks into this pool.
    pub fn has_source(&self) -> bool {
        self.source.is_some()
    }

    fn new_chunk(&self) -> Result<PinnedChunk, WeightsError> {
        let Some(source) = &self.source else {
            return Err(WeightsError::Internal("no device parks here: no park chunk can be made".into()));
        };
        let m = source.pinned_chunk(self.limits.chunk_bytes)?;
        self.chunks.fetch_add(1, Ordering::AcqRel);
        Ok(m)
    }

    /// Pinned bytes the pool holds (free and parked).
    pub fn registered_bytes(&self) -> u64 {
        self.chunks.load(Ordering::Acquire) * self.limits.chunk_bytes
    }

    /// Free bytes the background grows the pool to: the largest demand or the floor, in
    /// whole chunks.
    fn target_free_bytes(&self) -> u64 {
        let largest = lock(&self.demand).values().copied().max().unwrap_or(0);
        largest.max(self.limits.floor_bytes).div_ceil(self.limits.chunk_bytes) * self.limits.chunk_bytes
    }

    /// The most the background registers: the share of host memory, or the floor (in whole
    /// chunks) when that is more.
    fn cap_bytes(&self) -> u64 {
        let floor = self.limits.floor_bytes.div_ceil(self.limits.chunk_bytes) * self.limits.chunk_bytes;
        self.limits.max_bytes.max(floor)
    }

    /// The pool's figures now.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            registered_bytes: self.registered_bytes(),
            free_bytes: lock(&self.free).len() as u64 * self.limits.chunk_bytes,
            target_free_bytes: self.target_free_bytes(),
            max_bytes: self.cap_bytes(),
            chunks_on_park_path: self.on_park_path.load(Ordering::Acquire),
        }
    }

    /// `key` (a model, or a load in progress) may be parked next with `bytes`; `None`: it may
    /// not (parked, dropped, pinned, unloaded, on a device that does not park). The pool
    /// adjusts in the background. Cheap and non-blocking: callable under other locks.
    pub fn set_demand(self: &Arc<Self>, key: &str, bytes: Option<u64>) {
        if self.source.is_none() {
            return;
        }
        let changed = {
            let mut demand = lock(&self.demand);
            match bytes {
                Some(b) => demand.insert(key.to_string(), b) != Some(b),
                None => demand.remove(key).is_some(),
            }
        };
        if changed {
            self.adjust_in_background();
        }
    }

    /// Chunks for `bytes`: free ones first, new ones for the rest (logged and counted: the pool
    /// was short). Once the model is parked, the background makes up what the pool lacks for
    /// the next park.
    pub fn take(self: &Arc<Self>, bytes: u64) -> Result<ParkBuffer, WeightsError> {
        let chunk_bytes = self.limits.chunk_bytes;
        let n = bytes.div_ceil(chunk_bytes).max(1) as usize;
        let chunks = {
            let mut free = lock(&self.free);
            let k = free.len().saturating_sub(n);
            free.split_off(k)
        };
        let mut buffer = ParkBuffer { chunks, chunk_bytes, pool: self.clone() };
        if buffer.chunks.len() < n {
            let short = (n - buffer.chunks.len()) as u64;
            tracing::info!(
                short_bytes = short * chunk_bytes,
                "park pool short: registering pinned memory on the park path (it grows in the background \
                 to the largest parkable model; weights.park_pool_bytes sets a floor)"
            );
        }
        while buffer.chunks.len() < n {
            // What the background made meanwhile first, then a batch registered here.
            let need = n - buffer.chunks.len();
            let ready = {
                let mut free = lock(&self.free);
                let k = free.len().saturating_sub(need);
                free.split_off(k)
            };
            buffer.chunks.extend(ready);
            let need = (n - buffer.chunks.len()) as u64;
            if need > 0 {
                let made = self.make_chunks(need.min(GROW_THREADS))?;
                self.on_park_path.fetch_add(made.len() as u64, Ordering::AcqRel);
                buffer.chunks.extend(made);
            }
        }
        // No refill here: the model being parked still counts in the demand until it is
        // parked, and a second copy of its size is not what the next park needs. Its state
        // change (or a failed park giving the chunks back) sets the pool going.
        Ok(buffer)
    }

    /// Takes chunks back as free ones; the background releases what is beyond the target.
    fn give_back(self: &Arc<Self>, chunks: Vec<PinnedChunk>) {
        if chunks.is_empty() {
            return;
        }
        if self.closed.load(Ordering::Acquire) {
            self.chunks.fetch_sub(chunks.len() as u64, Ordering::AcqRel);
            let _ = std::thread::Builder::new().name("park-pool".into()).spawn(move || drop(chunks));
            return;
        }
        lock(&self.free).extend(chunks);
        self.adjust_in_background();
    }

    /// Registers or releases chunks on a background thread (one at a time) until the free
    /// chunks match the target. Never blocks: a thread already at work looks again.
    pub fn adjust_in_background(self: &Arc<Self>) {
        self.dirty.store(true, Ordering::Release);
        if self.closed.load(Ordering::Acquire) || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.clone();
        let spawned = std::thread::Builder::new().name("park-pool".into()).spawn(move || loop {
            pool.dirty.store(false, Ordering::Release);
            pool.adjust();
            pool.running.store(false, Ordering::Release);
            // A change that came while this thread was at work saw it running: look again.
            if !pool.dirty.load(Ordering::Acquire) || pool.running.swap(true, Ordering::AcqRel) {
                break;
            }
        });
        if let Err(e) = spawned {
            self.running.store(false, Ordering::Release);
            tracing::warn!("park pool: no background thread: {e}");
        }
    }

    /// One pass: registers a chunk at a time while the free ones are short of the target (and
    /// the cap allows), releases free chunks beyond it.
    fn adjust(&self) {
        let chunk = self.limits.chunk_bytes;
        let cap = self.cap_bytes();
        loop {
            if self.closed.load(Ordering::Acquire) {
                // Closed: let every free chunk go.
                let all = std::mem::take(&mut *lock(&self.free));
                self.chunks.fetch_sub(all.len() as u64, Ordering::AcqRel);
                drop(all);
                return;
            }
            let target = self.target_free_bytes();
            let free = lock(&self.free).len() as u64 * chunk;
            let room = cap.saturating_sub(self.registered_bytes()) / chunk;
            if free < target && self.source.is_some() && room > 0 {
                // A batch at a time, so a change of the target is seen between batches.
                let n = ((target - free) / chunk).min(room).min(GROW_BATCH_CHUNKS);
                if let Err(e) = self.grow(n) {
                    tracing::warn!("park pool: growing stopped: {e}");
                    return;
                }
            } else if free >= target + chunk {
                let excess = {
                    let mut f = lock(&self.free);
                    let keep = (target / chunk) as usize;
                    let k = keep.min(f.len());
                    f.split_off(k)
                };
                self.chunks.fetch_sub(excess.len() as u64, Ordering::AcqRel);
                // Unregistering and unmapping happen here, off every request's path.
                drop(excess);
            } else {
                return;
            }
        }
    }

    /// `n` new chunks, registered on up to [`GROW_THREADS`] threads; on a failure, those made
    /// go back as free ones.
    fn make_chunks(self: &Arc<Self>, n: u64) -> Result<Vec<PinnedChunk>, WeightsError> {
        let made = Mutex::new(Vec::with_capacity(n as usize));
        let next = AtomicU64::new(0);
        let failed: Mutex<Option<WeightsError>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..n.min(GROW_THREADS) {
                scope.spawn(|| {
                    while next.fetch_add(1, Ordering::AcqRel) < n && lock(&failed).is_none() {
                        match self.new_chunk() {
                            Ok(c) => lock(&made).push(c),
                            Err(e) => {
                                lock(&failed).get_or_insert(e);
                            }
                        }
                    }
                });
            }
        });
        let made = made.into_inner().unwrap_or_else(|p| p.into_inner());
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => {
                self.give_back(made);
                Err(e)
            }
            None => Ok(made),
        }
    }

    /// Registers `n` chunks on up to [`GROW_THREADS`] threads, each one free as soon as it is
    /// made (a park may take it at once). The first failure stops the batch.
    fn grow(&self, n: u64) -> Result<(), WeightsError> {
        let next = AtomicU64::new(0);
        let failed: Mutex<Option<WeightsError>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..n.min(GROW_THREADS) {
                scope.spawn(|| {
                    while next.fetch_add(1, Ordering::AcqRel) < n
                        && lock(&failed).is_none()
                        && !self.closed.load(Ordering::Acquire)
                    {
                        match self.new_chunk() {
                            Ok(c) => lock(&self.free).push(c),
                            Err(e) => {
                                lock(&failed).get_or_insert(e);
                            }
                        }
                    }
                });
            }
        });
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stops the background growth and releases the free chunks (on a background thread);
    /// chunks parked models hold go when those models do.
    pub fn close(self: &Arc<Self>) {
        self.closed.store(true, Ordering::Release);
        let free = std::mem::take(&mut *lock(&self.free));
        if !free.is_empty() {
            self.chunks.fetch_sub(free.len() as u64, Ordering::AcqRel);
            let _ = std::thread::Builder::new().name("park-pool".into()).spawn(move || drop(free));
        }
    }
}
