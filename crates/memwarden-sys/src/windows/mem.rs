//! Host memory on Windows: not yet (`VirtualAlloc` with `MEM_RESERVE`/`MEM_COMMIT` and
//! `VirtualLock` in the port).

use super::shm::ShmFile;
use crate::SysError;
use std::ptr::NonNull;

/// `ERROR_NOT_ENOUGH_MEMORY`, the Windows counterpart of ENOMEM.
pub const ENOMEM: i32 = 8;

pub fn page_size_bytes() -> u64 {
    4096
}

/// Wall-clock time in Unix nanoseconds (the standard clock here: no coarse clock yet); 0 if
/// the clock is before 1970.
pub fn coarse_unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

/// glibc's heap knobs have no counterpart here: nothing to do.
pub fn tune_heap() {}

/// glibc's heap knobs have no counterpart here: nothing to do.
pub fn release_free_heap() {}

pub(crate) fn map_aligned(_len: usize, _align: usize, _shm: Option<&ShmFile>) -> Result<NonNull<u8>, SysError> {
    Err(SysError::Unsupported("host memory mapping"))
}

/// # Safety
/// Never reached: no mapping exists on this platform.
pub(crate) unsafe fn advise_huge(_ptr: NonNull<u8>, _len: usize) {}

/// # Safety
/// Never reached: no mapping exists on this platform.
pub(crate) unsafe fn lock(_ptr: NonNull<u8>, _len: usize) -> Result<(), (i32, String)> {
    Err((0, "locking host memory is not supported on this platform".into()))
}

/// # Safety
/// Never reached: no mapping exists on this platform.
pub(crate) unsafe fn populate(_ptr: NonNull<u8>, _len: usize) -> Result<bool, (i32, String)> {
    Ok(false)
}

/// # Safety
/// Never reached: no mapping exists on this platform.
pub(crate) unsafe fn unmap(_ptr: NonNull<u8>, _len: usize) {}
