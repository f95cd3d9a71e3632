//! Host memory on Unix: reserve an aligned range (`mmap`), map a shared file over it
//! (`MAP_FIXED`), commit (`MADV_POPULATE_WRITE`), lock (`mlock`), unmap; and the process-wide
//! knobs (page size, the coarse clock, glibc's heap).

use super::errno_text;
use super::shm::ShmFile;
use crate::SysError;
use rustix::mm::{self, Advice, MapFlags, ProtFlags};
use std::ffi::c_void;
use std::ptr::NonNull;

/// The errno of "no memory".
pub const ENOMEM: i32 = rustix::io::Errno::NOMEM.raw_os_error();

/// The system page size in bytes.
pub fn page_size_bytes() -> u64 {
    rustix::param::page_size() as u64
}

/// Wall-clock time in Unix nanoseconds from `CLOCK_REALTIME_COARSE`: a few nanoseconds to read
/// (no syscall, no conversion), at the kernel tick's resolution (1–4 ms). For timestamps on hot
/// paths where a millisecond is precise enough.
pub fn coarse_unix_nanos() -> i64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    ts.tv_sec.saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec)
}

/// Fixes glibc's mmap threshold at 32 MiB (its largest) for this process. By default it rises
/// with the largest block freed, and the trim threshold with it (to twice that): after 4 MiB data
/// writes each thread's arena then kept up to 8 MiB of free memory at its top, which nothing
/// returns (`malloc_trim` trims only the main arena's top) — measured with `scripts/load`, the
/// daemon's RSS stayed 100–240 MiB up after a burst, and back within 5 MiB with this. A fixed
/// threshold also keeps the default 128 KiB trim threshold, so arenas shrink as they empty.
/// Request and answer buffers up to 32 MiB still come from the heap (no page faults per request).
pub fn tune_heap() {
    #[cfg(target_env = "gnu")]
    // libc: mallopt is glibc's allocator, not a system call; rustix has no wrapper.
    // SAFETY: mallopt sets an allocator parameter; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

/// Hands the C heap's free memory back to the OS (glibc `malloc_trim(0)`: the top of every
/// arena, and whole free pages inside them). Large request and answer buffers (a 4 MiB data
/// write, its base64 read) land in the heap below the mmap threshold, and glibc keeps what was
/// freed: after a burst the daemon's RSS stayed hundreds of MiB up. `clear` calls this.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // libc: malloc_trim is glibc's allocator, not a system call; rustix has no wrapper.
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Maps `len` bytes (a page multiple) readable and writable at an address aligned to `align`
/// (a power of two, at least a page): anonymous private memory, or `shm`'s file shared.
pub(crate) fn map_aligned(len: usize, align: usize, shm: Option<&ShmFile>) -> Result<NonNull<u8>, SysError> {
    let page = page_size_bytes() as usize;
    let total = len + align - page;
    let rw = ProtFlags::READ | ProtFlags::WRITE;
    // Reserve an address range large enough to align within, then trim it.
    // SAFETY: an anonymous mapping at an address the kernel picks; no existing memory is affected.
    let raw = unsafe { mm::mmap_anonymous(std::ptr::null_mut(), total, rw, MapFlags::PRIVATE) }.map_err(|e| {
        let (errno, message) = errno_text(e);
        SysError::Map { len_bytes: len as u64, errno, message }
    })?;
    let start = raw as usize;
    let aligned = start.next_multiple_of(align);
    let head = aligned - start;
    let tail = total - head - len;
    // SAFETY: both trimmed ranges lie inside the mapping made above and are page-aligned
    // (start, aligned and len are page multiples); nothing refers to them.
    unsafe {
        if head > 0 {
            let _ = mm::munmap(raw, head);
        }
        if tail > 0 {
            let _ = mm::munmap((aligned + len) as *mut c_void, tail);
        }
    }
    if let Some(f) = shm {
        // SAFETY: MAP_FIXED over [aligned, aligned+len), which is exactly the anonymous
        // reservation made above and owned by nobody else; the file is len bytes long.
        let mapped =
            unsafe { mm::mmap(aligned as *mut c_void, len, rw, MapFlags::SHARED | MapFlags::FIXED, f.fd(), 0) };
        if let Err(e) = mapped {
            let (errno, message) = errno_text(e);
            // SAFETY: the reservation is ours and unused.
            let _ = unsafe { mm::munmap(aligned as *mut c_void, len) };
            return Err(SysError::Map { len_bytes: len as u64, errno, message });
        }
    }
    // A successful non-fixed mapping is never at address 0.
    NonNull::new(aligned as *mut u8).ok_or(SysError::InvalidArgument("the kernel mapped address 0"))
}

/// Asks for transparent huge pages (`MADV_HUGEPAGE`); a refusal only costs the speed-up.
///
/// # Safety
/// `ptr`/`len` must be a live mapping of this process.
pub(crate) unsafe fn advise_huge(ptr: NonNull<u8>, len: usize) {
    // SAFETY: the caller's range is a live mapping; advice changes no contents.
    let _ = unsafe { mm::madvise(ptr.as_ptr().cast(), len, Advice::LinuxHugepage) };
}

/// Locks the range in RAM (`mlock`, which also faults every page in): errno and text if refused.
///
/// # Safety
/// `ptr`/`len` must be a live mapping of this process.
pub(crate) unsafe fn lock(ptr: NonNull<u8>, len: usize) -> Result<(), (i32, String)> {
    // SAFETY: the caller's range is a live mapping.
    unsafe { mm::mlock(ptr.as_ptr().cast(), len) }.map_err(errno_text)
}

/// Commits the range's pages (`MADV_POPULATE_WRITE`, Linux 5.14: fault in writable pages,
/// failing with ENOMEM instead of waking the OOM killer later). `Ok(false)`: this kernel cannot
/// (EINVAL), the caller touches the pages itself.
///
/// # Safety
/// `ptr`/`len` must be a live, writable mapping of this process.
pub(crate) unsafe fn populate(ptr: NonNull<u8>, len: usize) -> Result<bool, (i32, String)> {
    // SAFETY: the caller's range is a live mapping; populating does not invalidate it.
    match unsafe { mm::madvise(ptr.as_ptr().cast(), len, Advice::LinuxPopulateWrite) } {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::INVAL) => Ok(false),
        Err(e) => Err(errno_text(e)),
    }
}

/// Unmaps the range (which also drops any lock on it).
///
/// # Safety
/// `ptr`/`len` must be exactly a live mapping made by [`map_aligned`] that nothing refers to.
pub(crate) unsafe fn unmap(ptr: NonNull<u8>, len: usize) {
    // SAFETY: the caller's range is ours and unreferenced.
    let _ = unsafe { mm::munmap(ptr.as_ptr().cast(), len) };
}
