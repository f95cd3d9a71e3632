//! Host memory: [`HostMapping`], the same type on every platform. What differs (reserving an
//! aligned range, committing, locking, mapping a shared file, unmapping) is `os::mem` and
//! `os::shm`; the bounds checks and copies here are plain Rust over the mapping's pointer.

use crate::os::{mem, shm::ShmFile};
use crate::{cuda, vulkan, SharedHandle, SysError};
use std::path::Path;
use std::ptr::NonNull;

/// An anonymous private mapping with committed pages, unmapped on drop.
#[derive(Debug)]
pub struct HostMapping {
    pub(crate) ptr: NonNull<u8>,
    len: usize,
    locked: bool,
    shm: Option<ShmFile>,
    registration: Option<cuda::HostRegistration>,
    /// Vulkan devices' imports of the whole (locked) mapping, made on its first copy to or from
    /// each device and kept while it lives: released before it is unmapped.
    pub(crate) vulkan_imports: std::sync::Mutex<Vec<vulkan::MappingImport>>,
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
        let page = mem::page_size_bytes();
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
        let ptr = mem::map_aligned(len as usize, align as usize, shm.as_ref())?;
        let mapping = HostMapping {
            ptr,
            len: len as usize,
            locked: false,
            shm,
            registration: None,
            vulkan_imports: std::sync::Mutex::new(Vec::new()),
        };
        if huge {
            // A kernel without THP refuses the advice, which only costs the speed-up.
            // SAFETY: the range is exactly this live mapping; advice changes no contents.
            unsafe { mem::advise_huge(mapping.ptr, mapping.len) };
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

    /// A new handle of the file behind a shared mapping (a descriptor on Unix), for another
    /// process to map.
    pub fn share_fd(&self) -> std::io::Result<SharedHandle> {
        let Some(f) = &self.shm else {
            return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "the mapping is not shared"));
        };
        f.share()
    }

    /// The file that backs a shared mapping.
    pub fn shared_path(&self) -> Option<&Path> {
        self.shm.as_ref().map(|f| f.path())
    }

    fn lock(mut self) -> Result<Self, SysError> {
        // SAFETY: the range is exactly this live mapping. mlock also faults every page in.
        if let Err((errno, message)) = unsafe { mem::lock(self.ptr, self.len) } {
            return Err(SysError::Lock {
                len_bytes: self.len as u64,
                errno,
                message,
                limit_bytes: crate::status::memlock_limit_bytes(),
            });
        }
        self.locked = true;
        Ok(self)
    }

    fn commit(self) -> Result<Self, SysError> {
        // SAFETY: the range is exactly this live mapping; committing does not invalidate it.
        match unsafe { mem::populate(self.ptr, self.len) } {
            Ok(true) => return Ok(self),
            // ENOMEM/EFAULT: the memory is not there. Dropping self unmaps what was faulted in.
            Err((errno, message)) => return Err(SysError::Commit { len_bytes: self.len as u64, errno, message }),
            Ok(false) => {}
        }
        // The OS cannot commit a range at once (Linux older than 5.14): touch one byte per page.
        let page = mem::page_size_bytes() as usize;
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

impl Drop for HostMapping {
    fn drop(&mut self) {
        drop(self.registration.take());
        // The imported memory must not outlive the pages it names (Vulkan's rule).
        self.vulkan_imports.get_mut().unwrap_or_else(|e| e.into_inner()).clear();
        // SAFETY: ptr/len are exactly the live mapping this value owns; no reference into it
        // outlives self (no method hands one out). Unmapping also drops any lock.
        unsafe { mem::unmap(self.ptr, self.len) };
    }
}

/// Linux behaviour of the seam's host memory and status (the Windows side answers unsupported).
#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::{coarse_unix_nanos, PsiTrigger};

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
