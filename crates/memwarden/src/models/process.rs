//! What the OS and the driver say a model process holds: its resident set (`cpu`) and NVML's
//! per-process bytes (GPUs).

use crate::service::DeviceStatus;
use crate::supervisor::Supervisor;
use std::collections::BTreeMap;
use std::path::Path;

/// Resident set of a process, from `<proc_root>/<pid>/statm` through procfs (the root is
/// configurable so tests can point it at a fixture tree). `statm`'s resident pages are the
/// kernel's same counter as `status`'s VmRSS, in one short line instead of ~60 parsed fields:
/// the optimizer reads it every 20 ms while it verifies a release.
pub fn rss_bytes(proc_root: &Path, pid: u32) -> Option<u64> {
    let process = procfs::process::Process::new_with_root(proc_root.join(pid.to_string())).ok()?;
    Some(process.statm().ok()?.resident * procfs::page_size())
}

/// Measured bytes of `pid` per device: RSS for the host, NVML's per-process figure for GPUs.
pub fn process_bytes(proc_root: &Path, pid: u32, statuses: &[DeviceStatus]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in statuses {
        let dev = s.device.to_string();
        if !s.device.is_gpu() {
            if let Some(rss) = rss_bytes(proc_root, pid) {
                out.insert(dev, rss);
            }
        } else if let Some(bytes) = s.processes.iter().find(|p| p.pid == pid).and_then(|p| p.used_bytes) {
            out.insert(dev, bytes);
        }
    }
    out
}

/// Summed RSS of the processes holding models that take calls now (the optimizer's measure on
/// `cpu`, where the machine's available memory moves with everything else running).
pub fn holders_rss_bytes(supervisor: &Supervisor) -> u64 {
    supervisor
        .slots()
        .iter()
        .filter_map(|s| s.conn().map(|c| c.pid))
        .filter_map(|pid| rss_bytes(supervisor.proc_root(), pid))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_from_the_proc_tree_in_bytes() {
        let dir = std::env::temp_dir().join(format!("mw-proc-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("4242")).expect("dir");
        std::fs::write(dir.join("4242/statm"), "250000 30000 4000 500 0 90000 0\n").expect("write");
        assert_eq!(rss_bytes(&dir, 4242), Some(30000 * procfs::page_size()));
        assert_eq!(rss_bytes(&dir, 4243), None, "no such process");
        assert!(rss_bytes(Path::new("/proc"), std::process::id()).is_some_and(|b| b > 1 << 20));
        let _ = std::fs::remove_dir_all(dir);
    }
}
