//! Backends create and destroy blocks of real memory and copy between them; everything else
//! (which block, which offset, when to grow or shrink) is the one [`MemoryPool`] over the pure
//! `memwarden_core::Pool`. The host backend is always present; CUDA and Vulkan serve GPUs.
#![deny(clippy::unwrap_used)]

mod backend;
pub mod copy;
pub mod cuda;
mod discover;
pub mod host;
mod pool;
pub mod vulkan;

pub use backend::{
    Backend, BackendError, BlockExport, BlockMemory, DeviceInfo, GpuInfo, MemoryReading, ProcessMemory, SharedBlock,
};
pub use copy::copy_between;
pub use cuda::{CudaBackend, CudaSystem};
pub use discover::{discover, BackendHealth, Discover, DiscoverConfig, Discovered, Found, GPU_APIS};
pub use host::{HostBackend, HostStatusReader};
pub use pool::{MemoryPool, MemoryPoolInvariantError, PoolAllocation};
pub use vulkan::{NvidiaOwner, VulkanBackend, VulkanOptions};
