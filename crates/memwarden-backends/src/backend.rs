use crate::dedicated::{DedicatedError, DedicatedMemory};
use memwarden_core::{DeviceId, MemoryKind};
use memwarden_sys::SharedHandle;
use std::any::Any;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;

/// A device's identity, fixed for the daemon's lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device_id: DeviceId,
    /// `CPU`, `GPU`.
    pub device_type: &'static str,
    pub name: String,
    /// `RAM`, `VRAM`.
    pub memory_type: &'static str,
    /// GPU details (None for the host).
    pub gpu: Option<GpuInfo>,
    /// The extension point for a backend's own fields beyond the common ones (e.g. another
    /// GPU API's vendor and driver), shown in the device status under these names.
    pub extra: std::collections::BTreeMap<String, String>,
}

/// What is fixed about a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// `GPU-xxxxxxxx-…`, as nvidia-smi prints it.
    pub uuid: String,
    pub pci_bus_id: String,
    /// `9.0` for Hopper.
    pub compute_capability: String,
    /// Peak memory bandwidth from NVML: bus width × memory clock × 2 (DDR), bytes/s.
    pub memory_bandwidth_bytes_per_s: Option<u64>,
}

/// GPU memory one process holds, from NVML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessMemory {
    pub pid: u32,
    pub name: String,
    /// None when the driver does not report it.
    pub used_bytes: Option<u64>,
}

/// The handle of an exported block: what the importing process opens.
#[derive(Debug)]
pub enum ExportHandle {
    /// A file (mode 0600) that holds the block from offset 0, opened by path.
    Path(PathBuf),
    /// Bytes the importer passes to its driver (e.g. a 64-byte CUDA IPC handle).
    Bytes(Vec<u8>),
    /// A new descriptor: only a channel that passes descriptors (a Unix socket) carries it.
    Fd(SharedHandle),
}

/// What another process needs to map a block, whatever backend made it: the handle, and what
/// the importer must pass back as given to recreate the allocation.
#[derive(Debug)]
pub struct BlockExport {
    /// The export's kind as the API names it (`shm`, `cudaIpc`, `vulkanOpaqueFd`).
    pub kind: &'static str,
    pub handle: ExportHandle,
    /// The UUID of the device that holds the memory, when the importer must find that device.
    pub device_uuid: Option<String>,
    /// How the handle's allocation was made, where the importer must repeat it.
    pub allocation: Option<ExportedAllocation>,
}

/// How an exported allocation was made, for an importer that must make its import the same way
/// (a Vulkan opaque fd: `allocationSize`, `memoryTypeIndex`, a dedicated allocation over a
/// buffer of `bufferBytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportedAllocation {
    /// The allocation's size (the importer must pass exactly this).
    pub allocation_bytes: u64,
    pub memory_type_index: u32,
    /// The importer must make a dedicated allocation over a buffer of exactly `buffer_bytes`.
    pub dedicated: bool,
    /// The size of the exporter's buffer over the allocation.
    pub buffer_bytes: u64,
}

/// Memory of a device as the OS or driver reports it right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryReading {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    /// Where the numbers came from, e.g. `meminfo`, `cgroup-v1:/docker/abc`, `cgroup-v2:/x.slice`.
    pub source: String,
    /// Memory the driver reserves for itself (NVML), when known.
    pub reserved_bytes: Option<u64>,
    /// Per-process memory on a GPU (NVML); empty for the host.
    pub processes: Vec<ProcessMemory>,
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
    /// The device whose memory holds it: copies pick their path by it.
    fn location(&self) -> DeviceId;
    fn as_any(&self) -> &dyn Any;

    /// Reads bytes at `offset` into host memory, bounds-checked. Every block can: copies
    /// between blocks with no fast path between them are staged through host memory.
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendError>;

    /// Writes host bytes at `offset`, bounds-checked.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError>;

    /// What another process needs to map this block; an error says why it cannot be shared.
    fn export(&self) -> Result<BlockExport, BackendError> {
        Err(BackendError::InvalidArgument(format!("{} blocks of this backend cannot be shared", self.kind())))
    }
}

/// A block shared between its pool and any copy in flight: the memory is released when the
/// last holder lets go.
pub type SharedBlock = Arc<dyn BlockMemory>;

/// A memory backend: one device. Owns the device's memory status (read, sampled, refreshed), its
/// blocks (create, destroy, copy, read, write, export) and what it can offer beyond them
/// (dedicated memory, how its exports travel). Pooling lives in [`crate::MemoryPool`]; the
/// host's pressure signals in [`crate::HostSignals`]. Nothing outside a backend asks which GPU
/// API it speaks: a difference between APIs is a method here.
pub trait Backend: Send + Sync {
    fn info(&self) -> &DeviceInfo;

    /// The last driver error if the device is unhealthy (other devices keep working).
    fn fault(&self) -> Option<String> {
        None
    }

    /// Memory kinds this backend can create blocks of (never `reservation`: that is budget only).
    fn kinds(&self) -> &[MemoryKind];

    /// Reads memory status from the OS or driver now.
    fn read_status(&self) -> Result<MemoryReading, BackendError>;

    /// (total, available) bytes, as cheaply as the source allows: the pressure sampler calls
    /// it every few milliseconds. The default reads the full status.
    fn sample(&self) -> Result<(u64, u64), BackendError> {
        self.read_status().map(|r| (r.total_bytes, r.available_bytes))
    }

    /// Forgets any cached part of the status (the host's per-CPU free-list total), so the next
    /// read is entirely fresh: after this daemon changed memory and must see the change.
    fn refresh(&self) {}

    /// Dedicated memory on this device: blocks of their own that other processes map through a
    /// descriptor and whose bytes can be parked (the weights store holds models in it).
    /// [`DedicatedError::Unsupported`] with the reason where this backend offers none.
    fn dedicated(&self) -> Result<Arc<dyn DedicatedMemory>, DedicatedError> {
        Err(DedicatedError::Unsupported {
            device: self.info().device_id,
            reason: "this backend has no exportable dedicated memory".into(),
        })
    }

    /// Whether [`BlockMemory::export`] of this backend's blocks hands out a descriptor
    /// ([`ExportHandle::Fd`]), which only a channel that passes descriptors (the Unix socket)
    /// carries to another process: an HTTP answer cannot.
    fn exports_need_descriptor_passing(&self) -> bool {
        false
    }

    /// Every block base is aligned to this; the largest alignment an allocation may ask for.
    fn max_alignment_bytes(&self) -> u64;

    /// Extra limit on new blocks of `kind` beyond the device's available memory (e.g. the
    /// `RLIMIT_MEMLOCK` left for pinned memory). `None`: no extra limit.
    fn kind_limit_bytes(&self, kind: MemoryKind) -> Option<u64> {
        let _ = kind;
        None
    }

    /// The name of [`Backend::kind_limit_bytes`]'s limit, for the message of a refusal.
    fn kind_limit_name(&self, kind: MemoryKind) -> &'static str {
        let _ = kind;
        "the backend's limit"
    }

    /// Creates a block of at least `size_bytes` of real, committed memory.
    fn create_block(&self, kind: MemoryKind, size_bytes: u64) -> Result<Box<dyn BlockMemory>, BackendError>;

    /// Releases a block. The default drops it, which releases the memory once no copy in
    /// flight holds it.
    fn destroy_block(&self, block: SharedBlock) -> Result<(), BackendError> {
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

    /// Like [`Backend::copy`], but may return before the bytes have arrived: copies queued this
    /// way run in order, and [`Backend::synchronize`] waits for all of them. The default copies
    /// synchronously.
    fn copy_queued(
        &self,
        src: &dyn BlockMemory,
        src_offset: u64,
        dst: &dyn BlockMemory,
        dst_offset: u64,
        len_bytes: u64,
    ) -> Result<(), BackendError> {
        self.copy(src, src_offset, dst, dst_offset, len_bytes)
    }

    /// Waits for every copy queued with [`Backend::copy_queued`].
    fn synchronize(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Writes `data` into a block (tests, and later uploads). Bounds-checked.
    fn write(&self, block: &dyn BlockMemory, offset: u64, data: &[u8]) -> Result<(), BackendError>;

    /// Reads from a block into `out`. Bounds-checked.
    fn read(&self, block: &dyn BlockMemory, offset: u64, out: &mut [u8]) -> Result<(), BackendError>;
}
