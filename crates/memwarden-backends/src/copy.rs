//! Copies between any two blocks, whatever backends they came from, through the sys crate's one
//! copy (`memwarden_sys::cuda::copy`): host↔host with `memmove`, anything involving a GPU through
//! the CUDA driver on unified addresses (peer copies between GPUs). Bounds are checked before any
//! byte moves.

use crate::backend::{BackendError, BlockMemory, Location};
use crate::{cuda, host};
use memwarden_sys::cuda::{self as sys_cuda, Completion, CudaError, Region};

fn cuda_error(e: CudaError) -> BackendError {
    match e {
        CudaError::Driver { operation: "bounds check", error } => BackendError::InvalidArgument(error),
        CudaError::OutOfMemory { bytes, operation } => BackendError::OutOfMemory {
            requested_bytes: bytes,
            available_bytes: 0,
            detail: format!("{operation}: out of memory during a copy"),
        },
        CudaError::Unavailable(reason) => BackendError::Unavailable { reason },
        CudaError::Driver { operation, error } => BackendError::Failed { operation, message: error },
    }
}

/// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset` and waits until the
/// bytes have arrived.
pub fn copy_between(
    src: &dyn BlockMemory,
    src_offset: u64,
    dst: &dyn BlockMemory,
    dst_offset: u64,
    len: u64,
) -> Result<(), BackendError> {
    sys_cuda::copy(region(dst, dst_offset)?, region(src, src_offset)?, len, Completion::Wait).map_err(cuda_error)
}

/// The sys crate's view of a block at an offset, by where the block lives.
fn region(block: &dyn BlockMemory, offset: u64) -> Result<Region<'_>, BackendError> {
    Ok(match block.location() {
        Location::Host => Region::Host(host::mapping(block)?, offset),
        Location::Cuda(_) => Region::Device(cuda::buffer(block)?, offset),
    })
}
