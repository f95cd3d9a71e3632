//! Pure memwarden logic: identifiers and units, the TLSF sub-allocator that works on offsets
//! inside a block, and the block pool built on it. Nothing here touches the OS or a driver, so
//! all of it is testable without hardware; backends only create and destroy blocks.
#![deny(unsafe_code, clippy::unwrap_used)]

pub mod advice;
pub mod defrag;
pub mod eviction;
pub mod history;
pub mod ids;
pub mod placement;
pub mod pool;
pub mod pressure;
pub mod tlsf;
pub mod units;

pub use ids::{DeviceId, DeviceIdError, GpuApi, HandleKind, MemoryKind};
pub use pool::{BlockId, BlockRequest, Placement, Pool, PoolConfig, PoolError, PoolInvariantError, PoolStats};
pub use tlsf::{Tlsf, TlsfError, TlsfHandle, TlsfInvariantError, GRANULARITY_BYTES};
pub use units::{GIB, KIB, MIB, TIB};
