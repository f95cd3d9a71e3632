//! Memory status on Windows: not yet (`GlobalMemoryStatusEx`, `GetProcessMemoryInfo` and
//! `QueryMemoryResourceNotification` in the port). No PSI, no memlock limit, no `/proc`.

use crate::SysError;
use std::path::Path;

/// Where `/proc` would be: `HostStatusReader` finds nothing there, and says so.
pub const PROC_ROOT: &str = "/proc";
/// Where the cgroup filesystem would be.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

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
