//! The only memwarden crate that may use `unsafe`: raw OS and driver (CUDA, Vulkan) calls wrapped in
//! owning types whose safe methods check every bound. Everything above this crate is safe Rust.
//!
//! # The platform seam
//! Everything that differs between operating systems sits here, one module per concern, each
//! with the same API on every platform: the code above names `memwarden_sys::local::LocalStream`
//! or [`SharedHandle`], never `std::os::unix`, a raw descriptor or `libc`.
//!
//! | concern | module | Unix (`src/unix/`) | Windows (`src/windows/`) |
//! |---|---|---|---|
//! | host memory: reserve, commit, lock, map | [`HostMapping`] | `mmap`, `MADV_POPULATE_WRITE`, `mlock` | `VirtualAlloc`, `SetProcessWorkingSetSize` + `VirtualLock` |
//! | shared-memory export | [`HostMapping::new_shared`], [`SharedHandle`] | a 0600 file in a tmpfs, an `OwnedFd` | unsupported; `OwnedHandle` |
//! | local socket with handle passing | [`local`] | Unix socket, `SCM_RIGHTS` | unsupported (named pipes later) |
//! | process watch | [`process`] | pidfd, `/proc/<pid>/stat` | a process handle (`OpenProcess` with `SYNCHRONIZE`) |
//! | memory status | [`status`] | PSI triggers, `RLIMIT_MEMLOCK`, `/proc` | host memory from `GlobalMemoryStatusEx` ([`status::os_memory`]); the rest unsupported / unknown |
//! | file modes and positioned reads | [`fs`] | `chmod`, `chown`, `pread` | positioned reads; modes unsupported |
//!
//! The Unix side goes through `rustix`'s safe wrappers; the few raw `libc` calls left each say
//! why. The Windows side compiles (CI runs `cargo check --target x86_64-pc-windows-gnu`, and
//! this crate's tests under Wine: `scripts/test-windows`); what it does not do yet answers
//! [`SysError::Unsupported`] or `io::ErrorKind::Unsupported` until the Windows port.
//!
//! Host memory: [`HostMapping`] is an anonymous private mapping whose pages are committed when
//! it is created (so the memory is really there, and an overcommitted machine fails now rather
//! than at first touch), optionally locked with `mlock` (pinned memory), and unmapped on drop.

pub mod cuda;
pub mod d3d12;
mod host;
pub mod vulkan;

#[cfg(unix)]
mod unix;
#[cfg(unix)]
use unix as os;
#[cfg(windows)]
mod windows;
#[cfg(windows)]
use windows as os;

pub use host::HostMapping;
pub use os::mem::{coarse_unix_nanos, page_size_bytes, release_free_heap, tune_heap};
pub use os::shm::{BorrowedHandle, SharedHandle};
pub use os::{fs, local, process, status};
pub use status::{memlock_limit_bytes, PsiTrigger};
// Unix only: these take raw Unix descriptors (for Rust peers of the socket and tests that use a
// plain `std` socket); the portable way is `local::LocalWriteHalf::send_with_handles`.
#[cfg(unix)]
pub use unix::local::{recv_with_fds, send_with_fds};

use std::path::PathBuf;

/// Host memory as the OS reports it where there is no `/proc/meminfo` to read
/// ([`status::os_memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OsMemory {
    pub total_bytes: u64,
    pub available_bytes: u64,
    /// What the figures come from (`GlobalMemoryStatusEx`).
    pub source: &'static str,
}

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
    /// This platform has no implementation of the operation yet (Windows, until its port).
    #[error("{0} is not supported on this platform")]
    Unsupported(&'static str),
}

impl SysError {
    /// The OS had no memory for the request (as opposed to a bad argument or a refused lock).
    /// A PSI failure never is: no memory was requested.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, SysError::Map { errno, .. } | SysError::Commit { errno, .. } if *errno == os::mem::ENOMEM)
    }
}

fn limit_text(limit: Option<u64>) -> String {
    match limit {
        None => "unlimited".into(),
        Some(b) => format!("{b} bytes"),
    }
}

/// An `io::Error` of kind `Unsupported` naming what this platform lacks.
#[cfg_attr(unix, allow(dead_code))]
pub(crate) fn unsupported_io(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Unsupported, format!("{what} is not supported on this platform"))
}
