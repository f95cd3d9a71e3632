//! The pinned host chunks a parked model's bytes wait in. A model's own memory is a block of
//! its device's dedicated memory (`memwarden_backends::DedicatedMemory`: a CUDA VMM allocation
//! on a GPU, a tmpfs file on cpu), exported to holders as a file descriptor.

use super::WeightsError;
use memwarden_backends::{ChunkPiece, DedicatedMemory, PinnedChunk};
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

/// Pinned host chunks for parking, made ahead of time up to `target_bytes` by the first device
/// that parks (for a GPU: registered with its driver, which costs about a millisecond per 8 MiB,
/// which a park must not pay). Parks take
/// chunks and give them back; a park beyond the target registers the rest on its path (logged),
/// and chunks beyond the target are released on a background thread once given back, so
/// neither a park nor a resume waits for page-locking or unlocking.
pub struct ParkPool {
    chunk_bytes: u64,
    target_bytes: u64,
    /// Where chunks come from; `None`: no device parks, so no chunk is ever needed.
    source: Option<Arc<dyn DedicatedMemory>>,
    free: Mutex<Vec<PinnedChunk>>,
    /// Chunks alive (free or parked).
    chunks: std::sync::atomic::AtomicU64,
    refilling: std::sync::atomic::AtomicBool,
}

impl ParkPool {
    pub const CHUNK_BYTES: u64 = 256 * MIB;

    pub fn new(target_bytes: u64, source: Option<Arc<dyn DedicatedMemory>>) -> Arc<ParkPool> {
        Arc::new(ParkPool {
            chunk_bytes: Self::CHUNK_BYTES,
            target_bytes,
            source,
            free: Mutex::new(Vec::new()),
            chunks: 0.into(),
            refilling: false.into(),
        })
    }

    fn new_chunk(&self) -> Result<PinnedChunk, WeightsError> {
        use std::sync::atomic::Ordering;
        let Some(source) = &self.source else {
            return Err(WeightsError::Internal("no device parks here: no park chunk can be made".into()));
        };
        let m = source.pinned_chunk(self.chunk_bytes)?;
        self.chunks.fetch_add(1, Ordering::AcqRel);
        Ok(m)
    }

    /// Pinned bytes the pool holds (free and parked).
    pub fn registered_bytes(&self) -> u64 {
        self.chunks.load(std::sync::atomic::Ordering::Acquire) * self.chunk_bytes
    }

    /// Chunks for `bytes`: ready ones first, new ones for the rest (logged: the pool was short).
    pub fn take(self: &Arc<Self>, bytes: u64) -> Result<ParkBuffer, WeightsError> {
        let n = bytes.div_ceil(self.chunk_bytes).max(1) as usize;
        let chunks = {
            let mut free = lock(&self.free);
            let k = free.len().saturating_sub(n);
            free.split_off(k)
        };
        let mut buffer = ParkBuffer { chunks, chunk_bytes: self.chunk_bytes, pool: self.clone() };
        if buffer.chunks.len() < n {
            tracing::info!(
                short_bytes = (n - buffer.chunks.len()) as u64 * self.chunk_bytes,
                "park pool short: registering pinned memory on the park path (raise weights.park_pool_bytes)"
            );
        }
        while buffer.chunks.len() < n {
            buffer.chunks.push(self.new_chunk()?);
        }
        Ok(buffer)
    }

    /// Takes chunks back; those beyond the target go back to the OS on a background thread.
    fn give_back(self: &Arc<Self>, chunks: Vec<PinnedChunk>) {
        use std::sync::atomic::Ordering;
        let excess = {
            let mut free = lock(&self.free);
            free.extend(chunks);
            let over = self.registered_bytes().saturating_sub(self.target_bytes) / self.chunk_bytes;
            let k = free.len().saturating_sub(over as usize);
            free.split_off(k)
        };
        if !excess.is_empty() {
            self.chunks.fetch_sub(excess.len() as u64, Ordering::AcqRel);
            std::thread::spawn(move || drop(excess));
        }
    }

    /// Registers chunks up to the target on a background thread (one refill at a time).
    pub fn refill_in_background(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.source.is_none()
            || self.registered_bytes() >= self.target_bytes
            || self.refilling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let pool = self.clone();
        std::thread::spawn(move || {
            while pool.registered_bytes() < pool.target_bytes {
                match pool.new_chunk() {
                    Ok(c) => lock(&pool.free).push(c),
                    Err(e) => {
                        tracing::warn!("park pool refill stopped: {e}");
                        break;
                    }
                }
            }
            pool.refilling.store(false, Ordering::Release);
        });
    }
}
