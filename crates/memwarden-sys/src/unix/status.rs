//! Memory status on Unix (Linux): PSI triggers, the memlock limit and capability, and what a
//! process holds (`/proc/<pid>/statm`, `smaps`). The host's `/proc/meminfo` and cgroup files
//! are read and parsed by `memwarden-backends`' `HostStatusReader` from the roots named here.

use super::errno_text;
use crate::SysError;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::{Mode, OFlags};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// Where the kernel's process and memory files are (`/proc/meminfo`, `/proc/pressure/memory`).
pub const PROC_ROOT: &str = "/proc";
/// Where the cgroup filesystem is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// `None`: on Unix host memory is read from `/proc/meminfo` and the cgroup files.
pub fn os_memory() -> Option<crate::OsMemory> {
    None
}

/// The soft `RLIMIT_MEMLOCK` of this process in bytes; `None` when unlimited.
pub fn memlock_limit_bytes() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Memlock).current
}

/// True when this process holds CAP_IPC_LOCK (then RLIMIT_MEMLOCK does not apply).
pub fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find(|l| l.starts_with("CapEff:"))?.split_whitespace().nth(1)?.to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// The CPU model from `/proc/cpuinfo`, for the device name.
pub fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// Resident set of a process, from `<proc_root>/<pid>/statm` through procfs (the root is
/// configurable so tests can point it at a fixture tree). `statm`'s resident pages are the
/// kernel's same counter as `status`'s VmRSS, in one short line instead of ~60 parsed fields:
/// the optimizer reads it every 20 ms while it verifies a release.
pub fn process_rss_bytes(proc_root: &Path, pid: u32) -> Option<u64> {
    let process = procfs::process::Process::new_with_root(proc_root.join(pid.to_string())).ok()?;
    Some(process.statm().ok()?.resident * procfs::page_size())
}

/// Resident bytes of the mappings in `pid` of files whose path starts with `prefix` (from
/// `smaps`; 0 when it cannot be read).
pub fn mapped_file_bytes(proc_root: &Path, pid: u32, prefix: &str) -> u64 {
    use procfs::process::MMapPath;
    let Ok(process) = procfs::process::Process::new_with_root(proc_root.join(pid.to_string())) else {
        return 0;
    };
    let Ok(maps) = process.smaps() else { return 0 };
    maps.iter()
        .filter(|m| matches!(&m.pathname, MMapPath::Path(p) if p.to_string_lossy().starts_with(prefix)))
        .filter_map(|m| m.extension.map.get("Rss").copied())
        .sum()
}

/// A PSI trigger (`/proc/pressure/memory`): the kernel wakes `wait` when tasks stalled on
/// memory for `stall` within `window`. Needs Linux 5.2+; windows must be multiples of 2 s
/// without CAP_SYS_RESOURCE. Closed on drop.
#[derive(Debug)]
pub struct PsiTrigger {
    fd: OwnedFd,
    path: PathBuf,
}

impl PsiTrigger {
    /// Registers `spec` (e.g. `some 150000 2000000`: 150 ms of stall in a 2 s window) on `path`.
    pub fn new(path: &Path, spec: &str) -> Result<Self, SysError> {
        if path.as_os_str().as_encoded_bytes().contains(&0) {
            return Err(SysError::InvalidArgument("path contains NUL"));
        }
        let c_spec = std::ffi::CString::new(spec).map_err(|_| SysError::InvalidArgument("trigger contains NUL"))?;
        let fd =
            rustix::fs::open(path, OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty()).map_err(|e| {
                let (errno, message) = errno_text(e);
                SysError::Psi { path: path.into(), errno, message: format!("opening: {message}") }
            })?;
        let trigger = PsiTrigger { fd, path: path.into() };
        // The spec's bytes with its NUL, as the kernel expects.
        if let Err(e) = rustix::io::write(&trigger.fd, c_spec.as_bytes_with_nul()) {
            let (errno, message) = errno_text(e);
            return Err(trigger.error(errno, format!("registering trigger '{spec}': {message}")));
        }
        Ok(trigger)
    }

    /// Waits up to `timeout_ms` (negative: without end) for the trigger; true when it fired.
    pub fn wait(&self, timeout_ms: i32) -> Result<bool, SysError> {
        let mut fds = [PollFd::new(&self.fd, PollFlags::PRI)];
        let timeout = (timeout_ms >= 0).then(|| Timespec {
            tv_sec: (timeout_ms / 1000).into(),
            tv_nsec: ((timeout_ms % 1000) * 1_000_000).into(),
        });
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(false),
            Err(e) => {
                let (errno, message) = errno_text(e);
                return Err(self.error(errno, format!("polling: {message}")));
            }
        }
        let revents = fds[0].revents();
        if revents.contains(PollFlags::ERR) {
            return Err(self.error(0, "the trigger was removed (POLLERR)".into()));
        }
        Ok(revents.contains(PollFlags::PRI))
    }

    fn error(&self, errno: i32, message: String) -> SysError {
        SysError::Psi { path: self.path.clone(), errno, message }
    }
}
