//! Host memory on Windows: `VirtualAlloc` reserves and commits (the commit charge is taken at
//! once, so an overcommitted machine fails here, not at first touch), `VirtualLock` locks after
//! raising the process's minimum working set (Windows locks at most the working set), and
//! `VirtualFree` releases. Shared mappings (named file mappings) come with the port's exports.

use super::shm::ShmFile;
use crate::SysError;
use std::ptr::NonNull;
use windows_sys::Win32::System::Memory::{
    VirtualAlloc, VirtualFree, VirtualLock, MEM_COMMIT, MEM_RELEASE, MEM_RESERVE, PAGE_NOACCESS, PAGE_READWRITE,
};
use windows_sys::Win32::System::SystemInformation::{GetSystemInfo, SYSTEM_INFO};
use windows_sys::Win32::System::Threading::{GetCurrentProcess, GetProcessWorkingSetSize, SetProcessWorkingSetSize};

/// `ERROR_NOT_ENOUGH_MEMORY`, the Windows counterpart of ENOMEM.
pub const ENOMEM: i32 = 8;

fn system_info() -> SYSTEM_INFO {
    // SAFETY: SYSTEM_INFO is plain data; GetSystemInfo fills every field and cannot fail.
    unsafe {
        let mut info: SYSTEM_INFO = std::mem::zeroed();
        GetSystemInfo(&mut info);
        info
    }
}

pub fn page_size_bytes() -> u64 {
    u64::from(system_info().dwPageSize)
}

/// The last Win32 error: its code and its text.
fn last_error() -> (i32, String) {
    let e = std::io::Error::last_os_error();
    (e.raw_os_error().unwrap_or(0), e.to_string())
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

/// Reserves and commits `len` bytes at a multiple of `align`. `VirtualAlloc` places a region at
/// a multiple of the allocation granularity (64 KiB); a larger alignment reserves `len + align`
/// to find an aligned address, releases it and takes the aligned range (another thread may take
/// it in between: tried again).
pub(crate) fn map_aligned(len: usize, align: usize, shm: Option<&ShmFile>) -> Result<NonNull<u8>, SysError> {
    if shm.is_some() {
        return Err(SysError::Unsupported("shared host memory"));
    }
    let failed = |(errno, message): (i32, String)| SysError::Map { len_bytes: len as u64, errno, message };
    let granularity = system_info().dwAllocationGranularity as usize;
    for _ in 0..16 {
        let at = if align <= granularity {
            std::ptr::null()
        } else {
            let total = len.checked_add(align).ok_or(SysError::InvalidArgument("mapping length too large"))?;
            // SAFETY: a fresh reservation of no particular address; released at once below.
            let probe = unsafe { VirtualAlloc(std::ptr::null(), total, MEM_RESERVE, PAGE_NOACCESS) };
            if probe.is_null() {
                return Err(failed(last_error()));
            }
            // SAFETY: `probe` is the region just reserved, released whole (size 0, MEM_RELEASE).
            unsafe { VirtualFree(probe, 0, MEM_RELEASE) };
            (probe as usize).next_multiple_of(align) as *const core::ffi::c_void
        };
        // SAFETY: either any address, or one inside a range that was free a moment ago;
        // VirtualAlloc fails rather than overlap a region that is taken meanwhile.
        let p = unsafe { VirtualAlloc(at, len, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE) };
        if let Some(p) = NonNull::new(p.cast::<u8>()) {
            return Ok(p);
        }
        if at.is_null() {
            return Err(failed(last_error()));
        }
    }
    Err(failed(last_error()))
}

/// # Safety
/// Transparent huge pages have no counterpart here (large pages need a privilege): nothing.
pub(crate) unsafe fn advise_huge(_ptr: NonNull<u8>, _len: usize) {}

/// Raises the process's minimum (and maximum) working set by `len` bytes, then locks the range.
///
/// # Safety
/// `ptr`/`len` must be a live, committed region of this process.
pub(crate) unsafe fn lock(ptr: NonNull<u8>, len: usize) -> Result<(), (i32, String)> {
    let (mut min, mut max) = (0usize, 0usize);
    // SAFETY: the current process's pseudo handle; out-pointers to locals.
    unsafe {
        let process = GetCurrentProcess();
        if GetProcessWorkingSetSize(process, &mut min, &mut max) == 0 {
            return Err(last_error());
        }
        let (min, max) = (min.saturating_add(len), max.saturating_add(len).max(min.saturating_add(len)));
        if SetProcessWorkingSetSize(process, min, max) == 0 {
            return Err(last_error());
        }
        // SAFETY: the caller's live region.
        if VirtualLock(ptr.as_ptr().cast(), len) == 0 {
            return Err(last_error());
        }
    }
    Ok(())
}

/// # Safety
/// `ptr`/`len` must be a live region. `MEM_COMMIT` took the commit charge; the pages are
/// made on first touch, which [`crate::HostMapping`] does when this answers `false`.
pub(crate) unsafe fn populate(_ptr: NonNull<u8>, _len: usize) -> Result<bool, (i32, String)> {
    Ok(false)
}

/// # Safety
/// `ptr` must be the start of a live region from [`map_aligned`], released whole.
pub(crate) unsafe fn unmap(ptr: NonNull<u8>, _len: usize) {
    // SAFETY: the caller's region, released whole (size 0 with MEM_RELEASE); it also unlocks.
    unsafe { VirtualFree(ptr.as_ptr().cast(), 0, MEM_RELEASE) };
}
