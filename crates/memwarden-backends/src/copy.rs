//! Copies between any two blocks, whatever backends they came from: host↔host with `memcpy`,
//! anything involving a GPU through the CUDA driver on unified addresses (peer copies between
//! GPUs). Bounds are checked before any byte moves.

use crate::backend::{BackendError, BlockMemory, Location};
use crate::{cuda, host};
use memwarden_sys::cuda::{self as sys_cuda, CudaError};
use memwarden_sys::HostMapping;

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
    match (src.location(), dst.location()) {
        (Location::Host, Location::Host) => {
            HostMapping::copy(host::mapping(src)?, src_offset, host::mapping(dst)?, dst_offset, len)
                .map_err(|e| BackendError::InvalidArgument(e.to_string()))
        }
        (Location::Host, Location::Cuda(_)) => {
            sys_cuda::copy_host_to_device(cuda::buffer(dst)?, dst_offset, host::mapping(src)?, src_offset, len)
                .map_err(cuda_error)
        }
        (Location::Cuda(_), Location::Host) => {
            sys_cuda::copy_device_to_host(host::mapping(dst)?, dst_offset, cuda::buffer(src)?, src_offset, len)
                .map_err(cuda_error)
        }
        (Location::Cuda(_), Location::Cuda(_)) => {
            sys_cuda::copy_device_to_device(cuda::buffer(dst)?, dst_offset, cuda::buffer(src)?, src_offset, len)
                .map_err(cuda_error)
        }
    }
}
