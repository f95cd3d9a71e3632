//! Backends create and destroy blocks of real memory and copy between them; everything else
//! (which block, which offset, when to grow or shrink) is the one [`MemoryPool`] over the pure
//! `memwarden_core::Pool`. The host backend is always present; CUDA and Vulkan serve GPUs. Held
//! weights get their memory from a backend's [`DedicatedMemory`]; the host's pressure signals
//! are [`HostSignals`], apart from the device backends.
#![deny(clippy::unwrap_used)]

mod backend;
pub mod copy;
pub mod cuda;
pub mod d3d12;
pub mod dedicated;
mod discover;
pub mod host;
mod pool;
mod signals;
pub mod vulkan;

pub use backend::{
    Backend, BackendError, BlockExport, BlockMemory, DeviceInfo, ExportHandle, ExportedAllocation, GpuInfo,
    MemoryReading, ProcessMemory, SharedBlock,
};
pub use copy::copy_between;
pub use cuda::{CudaBackend, CudaSystem};
pub use dedicated::{
    serial_switch, ChunkPiece, ChunkWriter, DedicatedBlock, DedicatedError, DedicatedMemory, ExportedPiece,
    PinnedChunk, SwitchFailure, SwitchLeft, Switched,
};
pub use discover::{discover, BackendHealth, Discover, DiscoverConfig, Discovered, Found, GPU_APIS};
pub use host::{HostBackend, HostStatusReader};
pub use pool::{MemoryPool, MemoryPoolInvariantError, PoolAllocation};
pub use signals::{HostSignals, StallTrigger};
pub use vulkan::{NvidiaOwner, VulkanBackend, VulkanOptions};
