//! The memory model weights live in: one block per model on its device (a CUDA VMM allocation
//! on a GPU, a tmpfs file on cpu), exported to holders as a file descriptor, and the pinned
//! host chunks a parked model's bytes wait in.

use super::WeightsError;
use memwarden_core::DeviceId;
use memwarden_protocol::HandleKind;
use memwarden_sys::cuda::{CudaContext, CudaStream, Staging, UploadPipeline, VmmAllocation};
use memwarden_sys::HostMapping;
use memwarden_sys::SharedHandle;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::util::lock;
use memwarden_core::units::MIB;

/// Writes one loader thread's chunks into a block.
pub trait ChunkWriter {
    /// Lets `fill` write up to a chunk (it returns how many bytes) and puts them at `offset`.
    fn put(
        &mut self,
        offset: u64,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<usize, WeightsError>,
    ) -> Result<(), WeightsError>;
    /// Waits until everything put has arrived.
    fn finish(&mut self) -> Result<(), WeightsError>;
}

/// One model's memory on its device.
pub trait Block: Send + Sync {
    fn size_bytes(&self) -> u64;
    /// A new descriptor for a holder to map.
    fn export(&self) -> Result<SharedHandle, WeightsError>;
    /// A writer for one loader thread, with chunks of `chunk_bytes` at most.
    fn writer(&self, chunk_bytes: u64) -> Result<Box<dyn ChunkWriter + '_>, WeightsError>;
    /// Copies the first `len` bytes into the park chunks (in order).
    fn save(&self, park: &ParkBuffer, len: u64) -> Result<(), WeightsError>;
    /// Copies the first `len` bytes back from the park chunks.
    fn restore(&self, park: &ParkBuffer, len: u64) -> Result<(), WeightsError>;
}

/// Where blocks of one device come from.
pub trait Arena: Send + Sync {
    fn device(&self) -> DeviceId;
    fn handle(&self) -> HandleKind;
    /// Whether a model here can be parked (a GPU) or only be resident or dropped (cpu).
    fn can_park(&self) -> bool;
    fn alloc(&self, bytes: u64) -> Result<Box<dyn Block>, WeightsError>;
}

/// A run of park chunks holding one model's bytes; they go back to the pool when it is dropped.
pub struct ParkBuffer {
    chunks: Vec<HostMapping>,
    chunk_bytes: u64,
    pool: Arc<ParkPool>,
}

impl ParkBuffer {
    pub fn bytes(&self) -> u64 {
        self.chunks.len() as u64 * self.chunk_bytes
    }

    /// `(offset in the model, chunk, offset in the chunk, len)` for the first `len` bytes.
    fn pieces(&self, len: u64) -> Vec<(u64, &HostMapping, u64, u64)> {
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

/// Pinned host chunks for parking, registered with CUDA ahead of time up to `target_bytes`
/// (registering costs about a millisecond per 8 MiB, which a park must not pay). Parks take
/// chunks and give them back; a park beyond the target registers the rest on its path (logged),
/// and chunks beyond the target are released on a background thread once given back, so
/// neither a park nor a resume waits for page-locking or unlocking.
pub struct ParkPool {
    chunk_bytes: u64,
    target_bytes: u64,
    cuda: Option<Arc<CudaContext>>,
    free: Mutex<Vec<HostMapping>>,
    /// Chunks alive (free or parked).
    chunks: std::sync::atomic::AtomicU64,
    refilling: std::sync::atomic::AtomicBool,
}

impl ParkPool {
    pub const CHUNK_BYTES: u64 = 256 * MIB;

    pub fn new(target_bytes: u64, cuda: Option<Arc<CudaContext>>) -> Arc<ParkPool> {
        Arc::new(ParkPool {
            chunk_bytes: Self::CHUNK_BYTES,
            target_bytes,
            cuda,
            free: Mutex::new(Vec::new()),
            chunks: 0.into(),
            refilling: false.into(),
        })
    }

    fn new_chunk(&self) -> Result<HostMapping, WeightsError> {
        use std::sync::atomic::Ordering;
        let mut m = HostMapping::new_huge(self.chunk_bytes, self.cuda.is_none())
            .map_err(|e| WeightsError::from_sys("park chunk", self.chunk_bytes, e))?;
        if let Some(ctx) = &self.cuda {
            m.register_cuda(ctx).map_err(|e| WeightsError::from_cuda("registering a park chunk", e))?;
        }
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
    fn give_back(self: &Arc<Self>, chunks: Vec<HostMapping>) {
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
        if self.registered_bytes() >= self.target_bytes || self.refilling.swap(true, Ordering::AcqRel) {
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

// ---- cpu (and the simulated GPU of the tests): a tmpfs file ----

/// Blocks in a tmpfs (`/dev/shm`), mapped shared so holders map the same pages.
pub struct HostArena {
    pub device: DeviceId,
    pub dir: PathBuf,
    /// Tests only: a "GPU" made of host memory, to run the park/resume state machine in CI.
    pub parkable: bool,
}

struct HostBlock(HostMapping);

impl Arena for HostArena {
    fn device(&self) -> DeviceId {
        self.device
    }

    fn handle(&self) -> HandleKind {
        HandleKind::Shm
    }

    fn can_park(&self) -> bool {
        self.parkable
    }

    fn alloc(&self, bytes: u64) -> Result<Box<dyn Block>, WeightsError> {
        let m = HostMapping::new_shared(bytes.max(1), memwarden_sys::page_size_bytes(), false, &self.dir)
            .map_err(|e| WeightsError::from_sys("weights on cpu", bytes, e))?;
        Ok(Box::new(HostBlock(m)))
    }
}

struct HostWriter<'a> {
    block: &'a HostMapping,
    buf: Vec<u8>,
}

impl ChunkWriter for HostWriter<'_> {
    fn put(
        &mut self,
        offset: u64,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<usize, WeightsError>,
    ) -> Result<(), WeightsError> {
        let n = fill(&mut self.buf)?;
        self.block.write(offset, &self.buf[..n]).map_err(|e| WeightsError::Internal(e.to_string()))
    }

    fn finish(&mut self) -> Result<(), WeightsError> {
        Ok(())
    }
}

impl Block for HostBlock {
    fn size_bytes(&self) -> u64 {
        self.0.len_bytes()
    }

    fn export(&self) -> Result<SharedHandle, WeightsError> {
        self.0.share_fd().map_err(|e| WeightsError::Internal(format!("exporting the weights file: {e}")))
    }

    fn writer(&self, chunk_bytes: u64) -> Result<Box<dyn ChunkWriter + '_>, WeightsError> {
        Ok(Box::new(HostWriter { block: &self.0, buf: vec![0; chunk_bytes as usize] }))
    }

    fn save(&self, park: &ParkBuffer, len: u64) -> Result<(), WeightsError> {
        for (off, chunk, c_off, n) in park.pieces(len) {
            HostMapping::copy(&self.0, off, chunk, c_off, n).map_err(|e| WeightsError::Internal(e.to_string()))?;
        }
        Ok(())
    }

    fn restore(&self, park: &ParkBuffer, len: u64) -> Result<(), WeightsError> {
        for (off, chunk, c_off, n) in park.pieces(len) {
            HostMapping::copy(chunk, c_off, &self.0, off, n).map_err(|e| WeightsError::Internal(e.to_string()))?;
        }
        Ok(())
    }
}

// ---- a GPU: CUDA VMM ----

/// VMM allocations on one GPU, with reusable staging rings for loads and one stream for parks.
pub struct CudaArena {
    device: DeviceId,
    ctx: Arc<CudaContext>,
    staging: Mutex<Vec<Staging>>,
    park_stream: Mutex<Option<CudaStream>>,
}

impl CudaArena {
    pub fn new(device: DeviceId, ctx: Arc<CudaContext>) -> CudaArena {
        CudaArena { device, ctx, staging: Mutex::new(Vec::new()), park_stream: Mutex::new(None) }
    }
}

/// A VMM allocation that keeps its arena (for staging and the park stream).
struct CudaBlock {
    arena: Arc<CudaArena>,
    alloc: VmmAllocation,
}

impl Arena for Arc<CudaArena> {
    fn device(&self) -> DeviceId {
        self.device
    }

    fn handle(&self) -> HandleKind {
        HandleKind::CudaVmm
    }

    fn can_park(&self) -> bool {
        true
    }

    fn alloc(&self, bytes: u64) -> Result<Box<dyn Block>, WeightsError> {
        let alloc =
            VmmAllocation::new(&self.ctx, bytes).map_err(|e| WeightsError::from_cuda("weights on the GPU", e))?;
        Ok(Box::new(CudaBlock { arena: self.clone(), alloc }))
    }
}

/// One loader thread's upload pipeline; its staging goes back to the arena when it finishes.
struct CudaWriter<'a> {
    arena: &'a CudaArena,
    pipeline: Option<UploadPipeline<'a>>,
}

impl ChunkWriter for CudaWriter<'_> {
    fn put(
        &mut self,
        offset: u64,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<usize, WeightsError>,
    ) -> Result<(), WeightsError> {
        match self.pipeline.as_mut() {
            Some(p) => p.push(offset, fill),
            None => Err(WeightsError::Internal("upload after finish".into())),
        }
    }

    fn finish(&mut self) -> Result<(), WeightsError> {
        if let Some(p) = self.pipeline.take() {
            let staging = p.finish().map_err(|e| WeightsError::from_cuda("loading weights", e))?;
            lock(&self.arena.staging).push(staging);
        }
        Ok(())
    }
}

impl From<memwarden_sys::cuda::CudaError> for WeightsError {
    fn from(e: memwarden_sys::cuda::CudaError) -> Self {
        WeightsError::from_cuda("copying weights", e)
    }
}

impl CudaBlock {
    fn with_park_stream<R>(
        &self,
        f: impl FnOnce(&CudaStream) -> Result<R, memwarden_sys::cuda::CudaError>,
    ) -> Result<R, WeightsError> {
        let mut s = lock(&self.arena.park_stream);
        if s.is_none() {
            *s = Some(CudaStream::new(&self.arena.ctx)?);
        }
        match s.as_ref() {
            Some(stream) => Ok(f(stream)?),
            None => Err(WeightsError::Internal("no park stream".into())),
        }
    }
}

impl Block for CudaBlock {
    fn size_bytes(&self) -> u64 {
        self.alloc.size_bytes()
    }

    fn export(&self) -> Result<SharedHandle, WeightsError> {
        self.alloc.export_fd().map_err(|e| WeightsError::from_cuda("exporting the weights", e))
    }

    fn writer(&self, chunk_bytes: u64) -> Result<Box<dyn ChunkWriter + '_>, WeightsError> {
        let reused = lock(&self.arena.staging).pop().filter(|s| s.chunk_bytes() >= chunk_bytes);
        let staging = match reused {
            Some(s) => s,
            None => Staging::new(&self.arena.ctx, chunk_bytes, 3)?,
        };
        let pipeline = UploadPipeline::new(&self.alloc, staging).map_err(|(e, _)| e)?;
        Ok(Box::new(CudaWriter { arena: &self.arena, pipeline: Some(pipeline) }))
    }

    fn save(&self, park: &ParkBuffer, len: u64) -> Result<(), WeightsError> {
        self.with_park_stream(|s| self.alloc.copy_to_host(s, &park.pieces(len)))
    }

    fn restore(&self, park: &ParkBuffer, len: u64) -> Result<(), WeightsError> {
        self.with_park_stream(|s| self.alloc.copy_from_host(s, &park.pieces(len)))
    }
}
