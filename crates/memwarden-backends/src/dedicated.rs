//! Dedicated memory: one block per user (a held model's weights), allocated on its own rather
//! than from a pool, that other processes map through a descriptor of their own, that the
//! daemon fills in chunks from several threads at once, and whose bytes can wait in pinned
//! host chunks (parked) while the device memory goes back. A backend offers it through
//! [`crate::Backend::dedicated`]; the weights store uses nothing else of the device, so it
//! holds weights on any backend that offers it (CUDA VMM on a GPU, tmpfs files on the host).

use memwarden_core::{DeviceId, HandleKind};
use memwarden_sys::HostMapping;
use memwarden_sys::SharedHandle;

/// Why dedicated memory could not be had or used. Messages are the user's (they reach the
/// API as they are).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DedicatedError {
    /// This backend offers no dedicated memory (or not here): why.
    #[error("{device} offers no dedicated memory: {reason}")]
    Unsupported { device: DeviceId, reason: String },
    /// `bytes` do not fit on `device` (`cpu` for host memory, `gpu` for a GPU's).
    #[error("{message}")]
    OutOfMemory { device: &'static str, bytes: u64, message: String },
    /// Anything else, with what was being done.
    #[error("{0}")]
    Failed(String),
    /// The caller's `fill` of a [`ChunkWriter::put`] returned this: its own error stands.
    #[error("the chunk's filler stopped")]
    Stopped,
}

impl DedicatedError {
    /// An OS error of host memory made while doing `what` with `bytes`.
    pub fn from_sys(what: &str, bytes: u64, e: memwarden_sys::SysError) -> DedicatedError {
        if e.is_out_of_memory() {
            DedicatedError::OutOfMemory {
                device: "cpu",
                bytes,
                message: format!("{what}: {bytes} bytes do not fit: {e}"),
            }
        } else {
            DedicatedError::Failed(format!("{what}: {e}"))
        }
    }
}

/// Host memory the copy engines reach at full speed: page-locked (huge pages where the OS has
/// them), registered with the GPU driver where one is in use. A parked block's bytes wait in
/// a run of these.
#[derive(Debug)]
pub struct PinnedChunk(pub(crate) HostMapping);

impl PinnedChunk {
    pub fn len_bytes(&self) -> u64 {
        self.0.len_bytes()
    }
}

/// One piece of a copy between a dedicated block and pinned chunks: `(offset in the block,
/// chunk, offset in the chunk, len)`.
pub type ChunkPiece<'a> = (u64, &'a PinnedChunk, u64, u64);

/// Writes one loader thread's chunks into a block. Owns that thread's staging (a GPU's pinned
/// ring and its stream, or a host buffer) until [`ChunkWriter::finish`].
pub trait ChunkWriter {
    /// Lets `fill` write up to a chunk (it returns how many bytes) and puts them at `offset`.
    /// A `fill` that fails returns [`DedicatedError::Stopped`] and keeps its own error.
    fn put(
        &mut self,
        offset: u64,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<usize, DedicatedError>,
    ) -> Result<(), DedicatedError>;
    /// Waits until everything put has arrived.
    fn finish(&mut self) -> Result<(), DedicatedError>;
}

/// One descriptor of a block's memory and where it lies in the block: a holder maps it at its
/// own base address plus `offset`.
#[derive(Debug)]
pub struct ExportedPiece {
    pub offset: u64,
    pub size_bytes: u64,
    pub handle: SharedHandle,
}

/// Where the outgoing block is after a failed [`DedicatedBlock::switch`].
pub enum SwitchLeft {
    /// Untouched and still resident.
    Resident(Box<dyn DedicatedBlock>),
    /// Every byte of it is in the save chunks; its device memory is gone.
    Saved,
    /// Neither (a broken device context): only the model's file can bring it back.
    Lost,
}

/// A failed switch: the error and where the outgoing block is. The incoming bytes are
/// untouched in their chunks either way.
pub struct SwitchFailure {
    pub error: DedicatedError,
    pub left: SwitchLeft,
}

impl std::fmt::Debug for SwitchFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let left = match self.left {
            SwitchLeft::Resident(_) => "resident",
            SwitchLeft::Saved => "saved",
            SwitchLeft::Lost => "lost",
        };
        write!(f, "SwitchFailure({:?}, {left})", self.error)
    }
}

/// A done switch: the incoming block, where the time went (ms, in order), and whether the two
/// copies overlapped.
pub struct Switched {
    pub block: Box<dyn DedicatedBlock>,
    pub phases: Vec<(&'static str, f64)>,
    pub overlapped: bool,
}

/// The switch of a device whose copies cannot overlap: save, free, allocate, restore, one after
/// the other (every [`DedicatedBlock::switch`] that has nothing better).
pub fn serial_switch(
    out: Box<dyn DedicatedBlock>,
    memory: &dyn DedicatedMemory,
    save: &[ChunkPiece<'_>],
    in_bytes: u64,
    restore: &[ChunkPiece<'_>],
) -> Result<Switched, SwitchFailure> {
    let t = std::time::Instant::now();
    let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
    if let Err(error) = out.save(save) {
        return Err(SwitchFailure { error, left: SwitchLeft::Resident(out) });
    }
    let out_ms = ms(t);
    drop(out);
    let block = memory
        .alloc(in_bytes)
        .and_then(|b| b.restore(restore).map(|_| b))
        .map_err(|error| SwitchFailure { error, left: SwitchLeft::Saved })?;
    Ok(Switched { block, phases: vec![("copyOut", out_ms), ("copyIn", ms(t) - out_ms)], overlapped: false })
}

/// One block of dedicated memory. Owns the memory and this process's mapping of it: dropping it
/// frees the memory (once no other process maps it).
pub trait DedicatedBlock: Send + Sync {
    fn size_bytes(&self) -> u64;
    /// New descriptors for another process to map (as [`DedicatedMemory::handle_kind`] says),
    /// one per piece of the block, in address order (one piece covering it all where the
    /// memory is one piece).
    fn export(&self) -> Result<Vec<ExportedPiece>, DedicatedError>;
    /// A writer for one loader thread, with chunks of `chunk_bytes` at most.
    fn writer(&self, chunk_bytes: u64) -> Result<Box<dyn ChunkWriter + '_>, DedicatedError>;
    /// Copies every piece block → chunk and returns once they have arrived.
    fn save(&self, pieces: &[ChunkPiece<'_>]) -> Result<(), DedicatedError>;
    /// Copies every piece chunk → block and returns once they have arrived.
    fn restore(&self, pieces: &[ChunkPiece<'_>]) -> Result<(), DedicatedError>;
    /// Saves this block into `save` and makes a block of `in_bytes` from `restore`, on a
    /// device too full to hold both: on a GPU, the two copies overlap and the incoming block
    /// reuses this one's memory piece by piece; elsewhere, [`serial_switch`]. `memory` is the
    /// block's own device memory.
    fn switch(
        self: Box<Self>,
        memory: &dyn DedicatedMemory,
        save: &[ChunkPiece<'_>],
        in_bytes: u64,
        restore: &[ChunkPiece<'_>],
    ) -> Result<Switched, SwitchFailure>;
}

/// Where one device's dedicated blocks and the pinned chunks they park into come from. Owns the
/// reusable state their copies need (a GPU's staging rings and park stream), which blocks share;
/// not the blocks themselves.
pub trait DedicatedMemory: Send + Sync {
    fn device(&self) -> DeviceId;
    /// How another process maps an exported block.
    fn handle_kind(&self) -> HandleKind;
    /// Whether a block's bytes can be parked in host memory to give the device memory back (a
    /// GPU), or the memory is host memory already (then a block is resident or dropped).
    fn can_park(&self) -> bool;
    /// A block of at least `bytes` (rounded up to the device's granularity).
    fn alloc(&self, bytes: u64) -> Result<Box<dyn DedicatedBlock>, DedicatedError>;
    /// A pinned host chunk of `bytes` that this device's blocks save into and restore from at
    /// full speed (registering it can cost about a millisecond per 8 MiB).
    fn pinned_chunk(&self, bytes: u64) -> Result<PinnedChunk, DedicatedError>;
}
