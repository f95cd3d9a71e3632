//! A GPU's dedicated memory: CUDA VMM allocations (`cuMemCreate`, exported as a POSIX fd that
//! holders import with `cuMemImportFromShareableHandle` and map at addresses they reserve), with
//! reusable staging rings for loads and one stream for parks.

use crate::dedicated::{ChunkPiece, ChunkWriter, DedicatedBlock, DedicatedError, DedicatedMemory, PinnedChunk};
use memwarden_core::{DeviceId, HandleKind};
use memwarden_sys::cuda::{CudaContext, CudaError, CudaStream, Staging, UploadPipeline, VmmAllocation};
use memwarden_sys::HostMapping;
use memwarden_sys::SharedHandle;
use std::sync::{Arc, Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A driver error met while doing `what`.
fn from_cuda(what: &str, e: CudaError) -> DedicatedError {
    match e {
        CudaError::OutOfMemory { bytes, .. } => {
            DedicatedError::OutOfMemory { device: "gpu", bytes, message: format!("{what}: {e}") }
        }
        other => DedicatedError::Failed(format!("{what}: {other}")),
    }
}

impl From<CudaError> for DedicatedError {
    fn from(e: CudaError) -> Self {
        from_cuda("copying weights", e)
    }
}

/// VMM allocations on one GPU, with reusable staging rings for loads and one stream for parks.
pub struct CudaDedicated {
    device: DeviceId,
    copies: Arc<Copies>,
}

/// What the blocks of one GPU share for their copies.
struct Copies {
    ctx: Arc<CudaContext>,
    staging: Mutex<Vec<Staging>>,
    park_stream: Mutex<Option<CudaStream>>,
}

impl CudaDedicated {
    pub fn new(device: DeviceId, ctx: Arc<CudaContext>) -> CudaDedicated {
        let copies = Copies { ctx, staging: Mutex::new(Vec::new()), park_stream: Mutex::new(None) };
        CudaDedicated { device, copies: Arc::new(copies) }
    }
}

/// A VMM allocation that keeps its GPU's copy state (for staging and the park stream).
struct CudaDedicatedBlock {
    copies: Arc<Copies>,
    alloc: VmmAllocation,
}

impl DedicatedMemory for CudaDedicated {
    fn device(&self) -> DeviceId {
        self.device
    }

    fn handle_kind(&self) -> HandleKind {
        HandleKind::CudaVmm
    }

    fn can_park(&self) -> bool {
        true
    }

    fn alloc(&self, bytes: u64) -> Result<Box<dyn DedicatedBlock>, DedicatedError> {
        let alloc = VmmAllocation::new(&self.copies.ctx, bytes).map_err(|e| from_cuda("weights on the GPU", e))?;
        Ok(Box::new(CudaDedicatedBlock { copies: self.copies.clone(), alloc }))
    }

    /// Huge pages registered with this GPU's context (portable: every context copies at pinned
    /// speed from them), not `mlock`ed.
    fn pinned_chunk(&self, bytes: u64) -> Result<PinnedChunk, DedicatedError> {
        let mut m =
            HostMapping::new_huge(bytes, false).map_err(|e| DedicatedError::from_sys("park chunk", bytes, e))?;
        m.register_cuda(&self.copies.ctx).map_err(|e| from_cuda("registering a park chunk", e))?;
        Ok(PinnedChunk(m))
    }
}

/// One loader thread's upload pipeline; its staging goes back to the GPU's copy state when it
/// finishes.
struct CudaWriter<'a> {
    copies: &'a Copies,
    pipeline: Option<UploadPipeline<'a>>,
}

impl ChunkWriter for CudaWriter<'_> {
    fn put(
        &mut self,
        offset: u64,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<usize, DedicatedError>,
    ) -> Result<(), DedicatedError> {
        match self.pipeline.as_mut() {
            Some(p) => p.push(offset, fill),
            None => Err(DedicatedError::Failed("upload after finish".into())),
        }
    }

    fn finish(&mut self) -> Result<(), DedicatedError> {
        if let Some(p) = self.pipeline.take() {
            let staging = p.finish().map_err(|e| from_cuda("loading weights", e))?;
            lock(&self.copies.staging).push(staging);
        }
        Ok(())
    }
}

impl CudaDedicatedBlock {
    fn with_park_stream<R>(&self, f: impl FnOnce(&CudaStream) -> Result<R, CudaError>) -> Result<R, DedicatedError> {
        let mut s = lock(&self.copies.park_stream);
        if s.is_none() {
            *s = Some(CudaStream::new(&self.copies.ctx)?);
        }
        match s.as_ref() {
            Some(stream) => Ok(f(stream)?),
            None => Err(DedicatedError::Failed("no park stream".into())),
        }
    }
}

/// The sys crate's view of the pieces.
fn host_pieces<'a>(pieces: &[ChunkPiece<'a>]) -> Vec<(u64, &'a HostMapping, u64, u64)> {
    pieces.iter().map(|&(off, chunk, c_off, n)| (off, &chunk.0, c_off, n)).collect()
}

impl DedicatedBlock for CudaDedicatedBlock {
    fn size_bytes(&self) -> u64 {
        self.alloc.size_bytes()
    }

    fn export(&self) -> Result<SharedHandle, DedicatedError> {
        self.alloc.export_fd().map_err(|e| from_cuda("exporting the weights", e))
    }

    fn writer(&self, chunk_bytes: u64) -> Result<Box<dyn ChunkWriter + '_>, DedicatedError> {
        let reused = lock(&self.copies.staging).pop().filter(|s| s.chunk_bytes() >= chunk_bytes);
        let staging = match reused {
            Some(s) => s,
            None => Staging::new(&self.copies.ctx, chunk_bytes, 3)?,
        };
        let pipeline = UploadPipeline::new(&self.alloc, staging).map_err(|(e, _)| e)?;
        Ok(Box::new(CudaWriter { copies: &self.copies, pipeline: Some(pipeline) }))
    }

    fn save(&self, pieces: &[ChunkPiece<'_>]) -> Result<(), DedicatedError> {
        self.with_park_stream(|s| self.alloc.copy_to_host(s, &host_pieces(pieces)))
    }

    fn restore(&self, pieces: &[ChunkPiece<'_>]) -> Result<(), DedicatedError> {
        self.with_park_stream(|s| self.alloc.copy_from_host(s, &host_pieces(pieces)))
    }
}
