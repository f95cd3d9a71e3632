//! A GPU's dedicated memory: CUDA VMM allocations (a few `cuMemCreate` pieces behind one address
//! range, each exported as a POSIX fd that holders import with `cuMemImportFromShareableHandle`
//! and map at addresses they reserve), with reusable staging rings for loads, one stream for
//! parks and a second one for the incoming side of a switch.

use crate::dedicated::{
    ChunkPiece, ChunkWriter, DedicatedBlock, DedicatedError, DedicatedMemory, ExportedPiece, PinnedChunk,
    SwitchFailure, SwitchLeft, Switched,
};
use memwarden_core::{DeviceId, HandleKind};
use memwarden_sys::cuda::{CudaContext, CudaError, CudaStream, Staging, UploadPipeline, VmmAllocation};
use memwarden_sys::HostMapping;
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
    /// The incoming side of a switch (always taken after `park_stream`).
    switch_stream: Mutex<Option<CudaStream>>,
}

impl CudaDedicated {
    pub fn new(device: DeviceId, ctx: Arc<CudaContext>) -> CudaDedicated {
        let copies = Copies {
            ctx,
            staging: Mutex::new(Vec::new()),
            park_stream: Mutex::new(None),
            switch_stream: Mutex::new(None),
        };
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

    fn export(&self) -> Result<Vec<ExportedPiece>, DedicatedError> {
        let fds = self.alloc.export_fds().map_err(|e| from_cuda("exporting the weights", e))?;
        Ok(self
            .alloc
            .pieces()
            .into_iter()
            .zip(fds)
            .map(|((offset, size_bytes), handle)| ExportedPiece { offset, size_bytes, handle })
            .collect())
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

    /// Both copies at once, the incoming block made of this one's pieces
    /// (`memwarden_sys::cuda::switch`): D2H on the park stream, H2D on the switch stream.
    fn switch(
        self: Box<Self>,
        _memory: &dyn DedicatedMemory,
        save: &[ChunkPiece<'_>],
        in_bytes: u64,
        restore: &[ChunkPiece<'_>],
    ) -> Result<Switched, SwitchFailure> {
        let CudaDedicatedBlock { copies, alloc } = *self;
        let shared = copies.clone();
        let streams = (|| {
            let mut out = lock(&shared.park_stream);
            if out.is_none() {
                *out = Some(CudaStream::new(&shared.ctx)?);
            }
            let mut inc = lock(&shared.switch_stream);
            if inc.is_none() {
                *inc = Some(CudaStream::new(&shared.ctx)?);
            }
            Ok::<_, CudaError>((out, inc))
        })();
        let (out_stream, in_stream) = match streams {
            Ok((o, i)) => (o, i),
            Err(e) => {
                let left = SwitchLeft::Resident(Box::new(CudaDedicatedBlock { copies: copies.clone(), alloc }));
                return Err(SwitchFailure { error: from_cuda("a switch's streams", e), left });
            }
        };
        let (Some(o), Some(i)) = (out_stream.as_ref(), in_stream.as_ref()) else {
            let left = SwitchLeft::Resident(Box::new(CudaDedicatedBlock { copies: copies.clone(), alloc }));
            return Err(SwitchFailure { error: DedicatedError::Failed("no switch streams".into()), left });
        };
        let result = memwarden_sys::cuda::switch(alloc, o, i, &host_pieces(save), in_bytes, &host_pieces(restore));
        drop(in_stream);
        drop(out_stream);
        match result {
            Ok((alloc, t)) => {
                let phases = vec![
                    ("mapPieces", t.map_ms),
                    ("copyOut", t.out_ms - t.map_ms),
                    ("copyInTail", t.total_ms - t.out_ms),
                ];
                let block: Box<dyn DedicatedBlock> = Box::new(CudaDedicatedBlock { copies, alloc });
                Ok(Switched { block, phases, overlapped: t.reused_pieces > 0 })
            }
            Err(f) => {
                let left = match f.left {
                    memwarden_sys::cuda::SwitchLeft::Resident(alloc) => {
                        SwitchLeft::Resident(Box::new(CudaDedicatedBlock { copies, alloc }))
                    }
                    memwarden_sys::cuda::SwitchLeft::Saved => SwitchLeft::Saved,
                    memwarden_sys::cuda::SwitchLeft::Lost => SwitchLeft::Lost,
                };
                Err(SwitchFailure { error: from_cuda("switching weights", f.error), left })
            }
        }
    }
}
