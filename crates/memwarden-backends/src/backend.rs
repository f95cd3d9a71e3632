use memwarden_core::{DeviceId, MemoryKind};
use std::any::Any;
use std::fmt::Debug;

/// A device's identity, fixed for the daemon's lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device_id: DeviceId,
    /// `CPU`, `GPU`.
    pub device_type: &'static str,
    pub name: String,
    /// `RAM`, `VRAM`.
    pub memory_type: &'static str,
}

/// Memory of a device as the OS or driver reports it right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryReading {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    /// Where the numbers came from, e.g. `meminfo`, `cgroup-v1:/docker/abc`, `cgroup-v2:/x.slice`.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("insufficient memory: requested {requested_bytes} bytes, available {available_bytes} bytes ({detail})")]
    OutOfMemory { requested_bytes: u64, available_bytes: u64, detail: String },
    #[error("backend unavailable: {reason}")]
    Unavailable { reason: String },
    #[error("{device} does not provide {kind} memory")]
    UnsupportedKind { device: DeviceId, kind: MemoryKind },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An OS or driver call failed for a reason that is not lack of memory.
    #[error("{operation} failed: {message}")]
    Failed { operation: &'static str, message: String },
}

/// One block of real memory. Dropping it returns the memory to the OS or driver.
pub trait BlockMemory: Send + Sync + Debug {
    /// The address of the first byte in the address space that owns it (this process for host
    /// memory, the device's for GPU memory).
    fn address(&self) -> u64;
    fn size_bytes(&self) -> u64;
    fn kind(&self) -> MemoryKind;
    fn as_any(&self) -> &dyn Any;
}

/// A memory backend: one device. Implementations only read status and create, destroy and copy
/// blocks; pooling lives in [`crate::MemoryPool`].
pub trait Backend: Send + Sync {
    fn info(&self) -> &DeviceInfo;

    /// Memory kinds this backend can create blocks of (never `reservation`: that is budget only).
    fn kinds(&self) -> &[MemoryKind];

    /// Reads memory status from the OS or driver now.
    fn read_status(&self) -> Result<MemoryReading, BackendError>;

    /// Every block base is aligned to this; the largest alignment an allocation may ask for.
    fn max_alignment_bytes(&self) -> u64;

    /// Extra limit on new blocks of `kind` beyond the device's available memory (e.g. the
    /// `RLIMIT_MEMLOCK` left for pinned memory). `None`: no extra limit.
    fn kind_limit_bytes(&self, kind: MemoryKind) -> Option<u64> {
        let _ = kind;
        None
    }

    /// Creates a block of at least `size_bytes` of real, committed memory.
    fn create_block(&self, kind: MemoryKind, size_bytes: u64) -> Result<Box<dyn BlockMemory>, BackendError>;

    /// Releases a block. The default drops it, which releases the memory.
    fn destroy_block(&self, block: Box<dyn BlockMemory>) -> Result<(), BackendError> {
        drop(block);
        Ok(())
    }

    /// Copies `len_bytes` from `src` at `src_offset` to `dst` at `dst_offset`; bounds-checked.
    fn copy(
        &self,
        src: &dyn BlockMemory,
        src_offset: u64,
        dst: &dyn BlockMemory,
        dst_offset: u64,
        len_bytes: u64,
    ) -> Result<(), BackendError>;

    /// Writes `data` into a block (tests, and later uploads). Bounds-checked.
    fn write(&self, block: &dyn BlockMemory, offset: u64, data: &[u8]) -> Result<(), BackendError>;

    /// Reads from a block into `out`. Bounds-checked.
    fn read(&self, block: &dyn BlockMemory, offset: u64, out: &mut [u8]) -> Result<(), BackendError>;
}
