//! Memory status on Windows: host memory from `GlobalMemoryStatusEx`; not yet
//! `GetProcessMemoryInfo` and `QueryMemoryResourceNotification`. No PSI, no memlock limit, no
//! `/proc`.

use crate::SysError;
use std::path::Path;

/// Where `/proc` would be: `HostStatusReader` finds nothing there, and says so.
pub const PROC_ROOT: &str = "/proc";
/// Where the cgroup filesystem would be.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Physical memory and what is available now (`GlobalMemoryStatusEx`: `ullTotalPhys`,
/// `ullAvailPhys`); `None` if the call fails.
pub fn os_memory() -> Option<crate::OsMemory> {
    use windows_sys::Win32::System::SystemInformation::{GlobalMemoryStatusEx, MEMORYSTATUSEX};
    // SAFETY: MEMORYSTATUSEX is plain data; dwLength is set as the call requires.
    let status = unsafe {
        let mut s: MEMORYSTATUSEX = std::mem::zeroed();
        s.dwLength = std::mem::size_of::<MEMORYSTATUSEX>() as u32;
        (GlobalMemoryStatusEx(&mut s) != 0).then_some(s)
    }?;
    Some(crate::OsMemory {
        total_bytes: status.ullTotalPhys,
        available_bytes: status.ullAvailPhys.min(status.ullTotalPhys),
        source: "GlobalMemoryStatusEx",
    })
}

/// No limit known on this platform.
pub fn memlock_limit_bytes() -> Option<u64> {
    None
}

pub fn has_cap_ipc_lock() -> bool {
    false
}

pub fn cpu_model() -> Option<String> {
    None
}

pub fn process_rss_bytes(_proc_root: &Path, _pid: u32) -> Option<u64> {
    None
}

pub fn mapped_file_bytes(_proc_root: &Path, _pid: u32, _prefix: &str) -> u64 {
    0
}

/// A stall trigger; none can be registered on this platform yet.
#[derive(Debug)]
pub struct PsiTrigger(std::convert::Infallible);

impl PsiTrigger {
    pub fn new(_path: &Path, _spec: &str) -> Result<Self, SysError> {
        Err(SysError::Unsupported("a PSI trigger (memory stall notification)"))
    }

    pub fn wait(&self, _timeout_ms: i32) -> Result<bool, SysError> {
        match self.0 {}
    }
}
