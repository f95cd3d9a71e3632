//! The only memwarden crate that may use `unsafe`: raw OS and driver (CUDA, Vulkan) calls wrapped in
//! owning types whose safe methods check every bound. Everything above this crate is safe Rust.
//!
//! Host memory: [`HostMapping`] is an anonymous private mapping whose pages are committed when
//! it is created (so the memory is really there, and an overcommitted machine fails now rather
//! than at first touch), optionally locked with `mlock` (pinned memory), and unmapped on drop.

pub mod cuda;
mod fds;
pub mod vulkan;
pub use fds::{recv_with_fds, send_with_fds};

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SysError {
    #[error("mmap of {len_bytes} bytes failed: {message}")]
    Map { len_bytes: u64, errno: i32, message: String },
    #[error("committing {len_bytes} bytes failed: {message}")]
    Commit { len_bytes: u64, errno: i32, message: String },
    #[error(
        "mlock of {len_bytes} bytes refused ({message}); RLIMIT_MEMLOCK is {}; raise it with `ulimit -l`, \
         LimitMEMLOCK= in the systemd unit, or grant CAP_IPC_LOCK",
        limit_text(*.limit_bytes)
    )]
    Lock { len_bytes: u64, errno: i32, message: String, limit_bytes: Option<u64> },
    #[error("range {offset_bytes}+{len_bytes} is outside a mapping of {mapping_bytes} bytes")]
    OutOfBounds { offset_bytes: u64, len_bytes: u64, mapping_bytes: u64 },
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// A PSI trigger (`/proc/pressure/memory`) could not be opened, registered or waited on.
    #[error("PSI trigger on {}: {message}", path.display())]
    Psi { path: PathBuf, errno: i32, message: String },
}

impl SysError {
    /// The OS had no memory for the request (as opposed to a bad argument or a refused lock).
    /// A PSI failure never is: no memory was requested.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, SysError::Map { errno, .. } | SysError::Commit { errno, .. } if *errno == libc::ENOMEM)
    }
}

fn limit_text(limit: Option<u64>) -> String {
    match limit {
        None => "unlimited".into(),
        Some(b) => format!("{b} bytes"),
    }
}

fn last_errno() -> (i32, String) {
    let e = std::io::Error::last_os_error();
    (e.raw_os_error().unwrap_or(0), e.to_string())
}

/// The soft `RLIMIT_MEMLOCK` of this process in bytes; `None` when unlimited.
pub fn memlock_limit_bytes() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed struct.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        None
    } else {
        Some(lim.rlim_cur)
    }
}

/// Wall-clock time in Unix nanoseconds from `CLOCK_REALTIME_COARSE`: a few nanoseconds to read
/// (no syscall, no conversion), at the kernel tick's resolution (1–4 ms). For timestamps on hot
/// paths where a millisecond is precise enough; 0 if the clock cannot be read.
pub fn coarse_unix_nanos() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed struct.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec.saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec)
}

/// The system page size in bytes.
/// Fixes glibc's mmap threshold at 32 MiB (its largest) for this process. By default it rises
/// with the largest block freed, and the trim threshold with it (to twice that): after 4 MiB data
/// writes each thread's arena then kept up to 8 MiB of free memory at its top, which nothing
/// returns (`malloc_trim` trims only the main arena's top) — measured with `scripts/load`, the
/// daemon's RSS stayed 100–240 MiB up after a burst, and back within 5 MiB with this. A fixed
/// threshold also keeps the default 128 KiB trim threshold, so arenas shrink as they empty.
/// Request and answer buffers up to 32 MiB still come from the heap (no page faults per request).
pub fn tune_heap() {
    #[cfg(target_env = "gnu")]
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
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub fn page_size_bytes() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// `MADV_POPULATE_WRITE` (Linux 5.14): fault in writable pages, failing with ENOMEM instead of
/// waking the OOM killer later. Not in every libc crate version, hence the literal.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// An anonymous private mapping with committed pages, unmapped on drop.
#[derive(Debug)]
pub struct HostMapping {
    ptr: NonNull<u8>,
    len: usize,
    locked: bool,
    shm: Option<ShmFile>,
    registration: Option<cuda::HostRegistration>,
    /// Vulkan devices' imports of the whole (locked) mapping, made on its first copy to or from
    /// each device and kept while it lives: released before it is unmapped.
    vulkan_imports: std::sync::Mutex<Vec<vulkan::MappingImport>>,
}

/// A file in a tmpfs backing a shared mapping; closed and unlinked on drop.
#[derive(Debug)]
struct ShmFile {
    fd: libc::c_int,
    path: PathBuf,
}

static SHM_COUNTER: AtomicU64 = AtomicU64::new(0);

impl ShmFile {
    fn create(dir: &Path, len: u64) -> Result<Self, SysError> {
        let n = SHM_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("memwarden-{}-{n}", std::process::id()));
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| SysError::InvalidArgument("shared memory path contains NUL"))?;
        // SAFETY: c_path is a valid NUL-terminated string; O_EXCL never opens an existing file.
        let fd = unsafe {
            libc::open(
                c_path.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            let (errno, message) = last_errno();
            return Err(SysError::Map {
                len_bytes: len,
                errno,
                message: format!("creating {}: {message}", path.display()),
            });
        }
        let file = ShmFile { fd, path };
        // SAFETY: fd is the file just created; fallocate allocates its pages (ENOSPC when the
        // tmpfs is full).
        let rc = unsafe { libc::fallocate(fd, 0, 0, len as libc::off_t) };
        if rc != 0 {
            let (errno, message) = last_errno();
            let errno = if errno == libc::ENOSPC { libc::ENOMEM } else { errno };
            return Err(SysError::Commit {
                len_bytes: len,
                errno,
                message: format!("allocating {}: {message}", file.path.display()),
            });
        }
        Ok(file)
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        if let Ok(c_path) = CString::new(self.path.as_os_str().as_bytes()) {
            // SAFETY: unlinking our own file by its NUL-terminated path; closing our own fd.
            unsafe {
                libc::unlink(c_path.as_ptr());
            }
        }
        // SAFETY: fd is owned by this value and closed once.
        unsafe { libc::close(self.fd) };
    }
}

// SAFETY: the mapping is plain memory owned by this value; nothing in it is tied to a thread.
// Concurrent writers are the owner's business: the pool hands out disjoint ranges.
unsafe impl Send for HostMapping {}
// SAFETY: as above; shared references only read the pointer and length, and the copy methods
// touch only the bounds-checked ranges their callers own.
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Maps `len_bytes` (rounded up to whole pages) of anonymous memory at an address aligned
    /// to `align_bytes` (a power of two; at least the page size), commits every page and, with
    /// `lock`, locks them in RAM (`mlock`).
    pub fn new(len_bytes: u64, align_bytes: u64, lock: bool) -> Result<Self, SysError> {
        Self::create(len_bytes, align_bytes, lock, None)
    }

    /// Like [`HostMapping::new`], but backed by a new file in `dir` (a tmpfs such as `/dev/shm`)
    /// with mode 0600, so another process of the same user can map the same memory by path.
    /// The file's pages are allocated up front (`fallocate`: a full tmpfs fails here, not at
    /// first touch) and the file is unlinked when the mapping is dropped.
    pub fn new_shared(len_bytes: u64, align_bytes: u64, lock: bool, dir: &Path) -> Result<Self, SysError> {
        Self::create(len_bytes, align_bytes, lock, Some(dir))
    }

    /// Like [`HostMapping::new`], backed by transparent huge pages where the kernel has them
    /// (aligned to 2 MiB, `MADV_HUGEPAGE` before the pages are committed): for large buffers a
    /// GPU copies from and to, where fewer, larger pages mean fewer IOMMU translations per byte.
    pub fn new_huge(len_bytes: u64, lock: bool) -> Result<Self, SysError> {
        Self::create_with(len_bytes, 2 << 20, lock, None, true)
    }

    fn create(len_bytes: u64, align_bytes: u64, lock: bool, dir: Option<&Path>) -> Result<Self, SysError> {
        Self::create_with(len_bytes, align_bytes, lock, dir, false)
    }

    fn create_with(
        len_bytes: u64,
        align_bytes: u64,
        lock: bool,
        dir: Option<&Path>,
        huge: bool,
    ) -> Result<Self, SysError> {
        let page = page_size_bytes();
        if len_bytes == 0 {
            return Err(SysError::InvalidArgument("mapping length must be greater than zero"));
        }
        if !align_bytes.is_power_of_two() {
            return Err(SysError::InvalidArgument("mapping alignment must be a power of two"));
        }
        let align = align_bytes.max(page);
        let len = len_bytes
            .checked_next_multiple_of(page)
            .filter(|l| l.checked_add(align).is_some_and(|t| t <= isize::MAX as u64))
            .ok_or(SysError::InvalidArgument("mapping length too large"))?;
        let shm = match dir {
            Some(d) => Some(ShmFile::create(d, len)?),
            None => None,
        };
        let total = (len + align - page) as usize;
        // Reserve an address range large enough to align within, then trim it.
        // SAFETY: an anonymous mapping at an address the kernel picks; no existing memory is
        // affected. The result is checked against MAP_FAILED.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            let (errno, message) = last_errno();
            return Err(SysError::Map { len_bytes: len, errno, message });
        }
        let start = raw as usize;
        let aligned = (start as u64).next_multiple_of(align) as usize;
        let head = aligned - start;
        let tail = total - head - len as usize;
        // SAFETY: both trimmed ranges lie inside the mapping made above and are page-aligned
        // (start, aligned and len are page multiples); nothing refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len as usize) as *mut libc::c_void, tail);
            }
        }
        if let Some(f) = &shm {
            // SAFETY: MAP_FIXED over [aligned, aligned+len), which is exactly the anonymous
            // reservation made above and owned by nobody else; the file is len bytes long.
            let mapped = unsafe {
                libc::mmap(
                    aligned as *mut libc::c_void,
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    f.fd,
                    0,
                )
            };
            if mapped == libc::MAP_FAILED {
                let (errno, message) = last_errno();
                // SAFETY: the reservation is ours and unused.
                unsafe { libc::munmap(aligned as *mut libc::c_void, len as usize) };
                return Err(SysError::Map { len_bytes: len, errno, message });
            }
        }
        let mapping = HostMapping {
            // SAFETY: mmap never returns null on success for a non-fixed mapping.
            ptr: unsafe { NonNull::new_unchecked(aligned as *mut u8) },
            len: len as usize,
            locked: false,
            shm,
            registration: None,
            vulkan_imports: std::sync::Mutex::new(Vec::new()),
        };
        if huge {
            // SAFETY: the range is exactly this live anonymous mapping; advice changes no
            // contents. A kernel without THP refuses it, which only costs the speed-up.
            unsafe { libc::madvise(aligned as *mut libc::c_void, len as usize, libc::MADV_HUGEPAGE) };
        }
        if lock {
            mapping.lock()
        } else {
            mapping.commit()
        }
    }

    /// Page-locks the mapping and registers it with CUDA (portable) so GPU copies run at pinned
    /// speed; unregistered before the mapping goes.
    pub fn register_cuda(&mut self, ctx: &cuda::CudaContext) -> Result<(), cuda::CudaError> {
        if self.registration.is_none() {
            // SAFETY: the range is this live mapping, and the registration is stored in self
            // and dropped in Drop before the munmap.
            self.registration = Some(unsafe { cuda::HostRegistration::new(ctx, self.address(), self.len as u64)? });
        }
        Ok(())
    }

    pub fn is_cuda_registered(&self) -> bool {
        self.registration.is_some()
    }

    /// The whole mapping as a slice. Exclusive: `&mut self` means no other method of this
    /// mapping can run meanwhile.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is live, `len` bytes long and writable, and `&mut self` excludes
        // every other access through this value for the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// A new descriptor of the file behind a shared mapping, for another process to map.
    pub fn share_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::BorrowedFd;
        let Some(f) = &self.shm else {
            return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "the mapping is not shared"));
        };
        // SAFETY: the descriptor is owned by `f` and open for as long as self lives.
        unsafe { BorrowedFd::borrow_raw(f.fd) }.try_clone_to_owned()
    }

    /// The file that backs a shared mapping.
    pub fn shared_path(&self) -> Option<&Path> {
        self.shm.as_ref().map(|f| f.path.as_path())
    }

    fn lock(mut self) -> Result<Self, SysError> {
        // SAFETY: the range is exactly this live mapping. mlock also faults every page in.
        let rc = unsafe { libc::mlock(self.ptr.as_ptr() as *const libc::c_void, self.len) };
        if rc != 0 {
            let (errno, message) = last_errno();
            return Err(SysError::Lock {
                len_bytes: self.len as u64,
                errno,
                message,
                limit_bytes: memlock_limit_bytes(),
            });
        }
        self.locked = true;
        Ok(self)
    }

    fn commit(self) -> Result<Self, SysError> {
        // SAFETY: the range is exactly this live mapping; madvise does not invalidate it.
        let rc = unsafe { libc::madvise(self.ptr.as_ptr() as *mut libc::c_void, self.len, MADV_POPULATE_WRITE) };
        if rc == 0 {
            return Ok(self);
        }
        let (errno, message) = last_errno();
        if errno != libc::EINVAL {
            // ENOMEM/EFAULT: the memory is not there. Dropping self unmaps what was faulted in.
            return Err(SysError::Commit { len_bytes: self.len as u64, errno, message });
        }
        // Kernel older than 5.14: touch one byte per page instead.
        let page = page_size_bytes() as usize;
        for off in (0..self.len).step_by(page) {
            // SAFETY: off < len, inside the mapping, which is writable and owned by self.
            unsafe { self.ptr.as_ptr().add(off).write_volatile(0) };
        }
        Ok(self)
    }

    pub fn address(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn len_bytes(&self) -> u64 {
        self.len as u64
    }

    pub fn is_locked(&self) -> bool {
        self.locked
    }

    pub(crate) fn check(&self, offset: u64, len: u64) -> Result<usize, SysError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len as u64 => Ok(offset as usize),
            _ => Err(SysError::OutOfBounds { offset_bytes: offset, len_bytes: len, mapping_bytes: self.len as u64 }),
        }
    }

    /// Copies `len` bytes between two mappings (or within one; overlapping ranges are handled
    /// like `memmove`). Both ranges are bounds-checked first.
    pub fn copy(
        src: &HostMapping,
        src_offset: u64,
        dst: &HostMapping,
        dst_offset: u64,
        len: u64,
    ) -> Result<(), SysError> {
        let s = src.check(src_offset, len)?;
        let d = dst.check(dst_offset, len)?;
        // SAFETY: both ranges were checked to lie inside live mappings; ptr::copy allows overlap.
        // Callers own the destination range (the pool hands out disjoint ranges).
        unsafe { std::ptr::copy(src.ptr.as_ptr().add(s), dst.ptr.as_ptr().add(d), len as usize) };
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), SysError> {
        let o = self.check(offset, data.len() as u64)?;
        // SAFETY: the range was bounds-checked. `data` cannot overlap it: no method of this type
        // hands out a slice into the mapping, so safe code cannot hold one.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(o), data.len()) };
        Ok(())
    }

    /// Reads `out.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), SysError> {
        let o = self.check(offset, out.len() as u64)?;
        // SAFETY: the range was bounds-checked; `out` is a distinct exclusive borrow.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(o), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Sets `len` bytes at `offset` to `byte`.
    pub fn fill(&self, offset: u64, len: u64, byte: u8) -> Result<(), SysError> {
        let o = self.check(offset, len)?;
        // SAFETY: the range was bounds-checked.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(o), byte, len as usize) };
        Ok(())
    }
}

/// A PSI trigger (`/proc/pressure/memory`): the kernel wakes `wait` when tasks stalled on
/// memory for `stall` within `window`. Needs Linux 5.2+; windows must be multiples of 2 s
/// without CAP_SYS_RESOURCE. Closed on drop.
#[derive(Debug)]
pub struct PsiTrigger {
    fd: libc::c_int,
    path: PathBuf,
}

impl PsiTrigger {
    /// Registers `spec` (e.g. `some 150000 2000000`: 150 ms of stall in a 2 s window) on `path`.
    pub fn new(path: &Path, spec: &str) -> Result<Self, SysError> {
        let c_path =
            CString::new(path.as_os_str().as_bytes()).map_err(|_| SysError::InvalidArgument("path contains NUL"))?;
        let c_spec = CString::new(spec).map_err(|_| SysError::InvalidArgument("trigger contains NUL"))?;
        // SAFETY: c_path is a valid NUL-terminated path.
        let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if fd < 0 {
            let (errno, message) = last_errno();
            return Err(SysError::Psi { path: path.into(), errno, message: format!("opening: {message}") });
        }
        let trigger = PsiTrigger { fd, path: path.into() };
        let bytes = c_spec.as_bytes_with_nul();
        // SAFETY: writes exactly the spec's bytes (with its NUL, as the kernel expects) to our fd.
        let n = unsafe { libc::write(fd, bytes.as_ptr() as *const libc::c_void, bytes.len()) };
        if n < 0 {
            let (errno, message) = last_errno();
            return Err(trigger.error(errno, format!("registering trigger '{spec}': {message}")));
        }
        Ok(trigger)
    }

    /// Waits up to `timeout_ms` for the trigger; true when it fired.
    pub fn wait(&self, timeout_ms: i32) -> Result<bool, SysError> {
        let mut pfd = libc::pollfd { fd: self.fd, events: libc::POLLPRI, revents: 0 };
        // SAFETY: one valid pollfd for our open fd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let (errno, message) = last_errno();
            if errno == libc::EINTR {
                return Ok(false);
            }
            return Err(self.error(errno, format!("polling: {message}")));
        }
        if pfd.revents & libc::POLLERR != 0 {
            return Err(self.error(0, "the trigger was removed (POLLERR)".into()));
        }
        Ok(pfd.revents & libc::POLLPRI != 0)
    }

    fn error(&self, errno: i32, message: String) -> SysError {
        SysError::Psi { path: self.path.clone(), errno, message }
    }
}

impl Drop for PsiTrigger {
    fn drop(&mut self) {
        // SAFETY: fd is owned by this value and closed once.
        unsafe { libc::close(self.fd) };
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        drop(self.registration.take());
        // The imported memory must not outlive the pages it names (Vulkan's rule).
        self.vulkan_imports.get_mut().unwrap_or_else(|e| e.into_inner()).clear();
        // SAFETY: ptr/len are exactly the live mapping this value owns; no reference into it
        // outlives self (no method hands one out). munmap also drops any mlock.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_is_the_wall_clock_within_a_tick() {
        let fine = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let coarse = coarse_unix_nanos();
        assert!((fine - coarse).abs() < 50_000_000, "coarse {coarse} vs {fine}");
    }

    fn rss_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
        line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).expect("kB") * 1024
    }

    #[test]
    fn mapping_is_aligned_committed_and_released() {
        let before = rss_bytes();
        let m = HostMapping::new(64 << 20, 2 << 20, false).expect("map");
        assert_eq!(m.address() % (2 << 20), 0);
        assert_eq!(m.len_bytes(), 64 << 20);
        let during = rss_bytes();
        assert!(during >= before + (60 << 20), "pages committed: rss {before} -> {during}");
        drop(m);
        let after = rss_bytes();
        assert!(after + (60 << 20) <= during, "pages released: rss {during} -> {after}");
    }

    #[test]
    fn copy_read_write_fill_are_bounds_checked() {
        let a = HostMapping::new(8192, 4096, false).expect("map");
        let b = HostMapping::new(8192, 4096, false).expect("map");
        a.write(100, b"memwarden").expect("write");
        HostMapping::copy(&a, 100, &b, 8000, 9).expect("copy");
        let mut out = [0u8; 9];
        b.read(8000, &mut out).expect("read");
        assert_eq!(&out, b"memwarden");
        b.fill(8000, 4, b'x').expect("fill");
        b.read(8000, &mut out).expect("read");
        assert_eq!(&out, b"xxxxarden");
        assert!(matches!(HostMapping::copy(&a, 8190, &b, 0, 9), Err(SysError::OutOfBounds { .. })));
        assert!(matches!(b.write(u64::MAX, b"x"), Err(SysError::OutOfBounds { .. })));
        assert!(matches!(b.read(8192, &mut out), Err(SysError::OutOfBounds { .. })));
    }

    #[test]
    fn locked_mapping_or_clear_lock_error() {
        match HostMapping::new(1 << 20, 4096, true) {
            Ok(m) => assert!(m.is_locked()),
            Err(e @ SysError::Lock { .. }) => assert!(e.to_string().contains("RLIMIT_MEMLOCK")),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn lock_error_names_the_limit() {
        let e = SysError::Lock {
            len_bytes: 1 << 20,
            errno: 12,
            message: "Cannot allocate memory".into(),
            limit_bytes: Some(8 << 20),
        };
        let text = e.to_string();
        assert!(text.contains("RLIMIT_MEMLOCK is 8388608 bytes"), "{text}");
        assert!(text.contains("ulimit -l"), "{text}");
    }

    #[test]
    fn shared_mapping_is_visible_by_path_and_removed_on_drop() {
        let dir = std::env::temp_dir();
        let m = HostMapping::new_shared(1 << 20, 2 << 20, false, &dir).expect("shared map");
        assert_eq!(m.address() % (2 << 20), 0);
        let path = m.shared_path().expect("path").to_path_buf();
        m.write(4096, b"through the file").expect("write");
        let bytes = std::fs::read(&path).expect("read the file");
        assert_eq!(bytes.len(), 1 << 20);
        assert_eq!(&bytes[4096..4096 + 16], b"through the file");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
        drop(m);
        assert!(!path.exists(), "file unlinked on drop");
        assert!(HostMapping::new_shared(4096, 4096, false, Path::new("/nonexistent/dir")).is_err());
    }

    #[test]
    fn psi_triggers_register_or_fail_clearly() {
        let path = Path::new("/proc/pressure/memory");
        if !path.exists() {
            assert!(PsiTrigger::new(path, "some 150000 2000000").is_err());
            return;
        }
        match PsiTrigger::new(path, "some 150000 2000000") {
            Ok(t) => assert!(t.wait(10).is_ok(), "waiting on a registered trigger works"),
            Err(e) => assert!(e.to_string().contains("trigger"), "{e}"),
        }
        assert!(PsiTrigger::new(path, "nonsense").is_err(), "the kernel refuses a malformed trigger");
        match PsiTrigger::new(Path::new("/nonexistent/pressure"), "some 1 2") {
            Err(e @ SysError::Psi { errno: libc::ENOENT, .. }) => {
                assert!(!e.is_out_of_memory());
                assert!(e.to_string().contains("/nonexistent/pressure: opening"), "{e}");
            }
            other => panic!("expected a PSI error, got {other:?}"),
        }
    }

    #[test]
    fn psi_errors_are_never_out_of_memory() {
        let psi = SysError::Psi { path: "/proc/pressure/memory".into(), errno: libc::ENOMEM, message: "x".into() };
        assert!(!psi.is_out_of_memory());
        let map = SysError::Map { len_bytes: 1, errno: libc::ENOMEM, message: "x".into() };
        assert!(map.is_out_of_memory());
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(matches!(HostMapping::new(0, 4096, false), Err(SysError::InvalidArgument(_))));
        assert!(matches!(HostMapping::new(4096, 3, false), Err(SysError::InvalidArgument(_))));
        assert!(matches!(HostMapping::new(u64::MAX, 4096, false), Err(SysError::InvalidArgument(_))));
    }
}
