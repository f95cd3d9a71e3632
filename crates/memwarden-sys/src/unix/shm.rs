//! Shared-memory export on Unix: a file in a tmpfs (`host.shared_memory_dir`, e.g. `/dev/shm`)
//! that backs a shared mapping, handed to other processes by path or as a descriptor.

use super::errno_text;
use crate::SysError;
use rustix::fs::{FallocateFlags, Mode, OFlags};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A handle another process can map memory through: a file descriptor on Unix.
pub type SharedHandle = OwnedFd;
/// A borrowed [`SharedHandle`].
pub type BorrowedHandle<'a> = BorrowedFd<'a>;

/// A file in a tmpfs backing a shared mapping; closed and unlinked on drop.
#[derive(Debug)]
pub(crate) struct ShmFile {
    fd: OwnedFd,
    path: PathBuf,
}

static SHM_COUNTER: AtomicU64 = AtomicU64::new(0);

impl ShmFile {
    /// Creates `dir/memwarden-<pid>-<n>` (mode 0600, never an existing file) with `len` bytes
    /// allocated (a full tmpfs fails here with ENOMEM, not at first touch).
    pub(crate) fn create(dir: &Path, len: u64) -> Result<Self, SysError> {
        let n = SHM_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("memwarden-{}-{n}", std::process::id()));
        if path.as_os_str().as_encoded_bytes().contains(&0) {
            return Err(SysError::InvalidArgument("shared memory path contains NUL"));
        }
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC;
        let fd = rustix::fs::open(&path, flags, Mode::from_raw_mode(0o600)).map_err(|e| {
            let (errno, message) = errno_text(e);
            SysError::Map { len_bytes: len, errno, message: format!("creating {}: {message}", path.display()) }
        })?;
        let file = ShmFile { fd, path };
        if let Err(e) = rustix::fs::fallocate(&file.fd, FallocateFlags::empty(), 0, len) {
            let (errno, message) = errno_text(e);
            let errno = if e == rustix::io::Errno::NOSPC { rustix::io::Errno::NOMEM.raw_os_error() } else { errno };
            return Err(SysError::Commit {
                len_bytes: len,
                errno,
                message: format!("allocating {}: {message}", file.path.display()),
            });
        }
        Ok(file)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A new descriptor of the file, for another process to map.
    pub(crate) fn share(&self) -> std::io::Result<SharedHandle> {
        self.fd.try_clone()
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        // The descriptor closes when `fd` drops.
        let _ = rustix::fs::unlink(&self.path);
    }
}
