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

/// The host memory a process holds as its own: its resident set less its shared-memory pages
/// (`RssAnon + RssFile` of `<proc_root>/<pid>/status`). Shared memory (tmpfs and memfd files:
/// the weights memwarden holds and its exports, mapped zero-copy) lives in the file, not in the
/// process: it is counted once, where it is held, and only the pages a process touched would
/// show in its RSS anyway. Falls back to the whole RSS on a kernel without those fields.
pub fn own_rss_bytes(proc_root: &Path, pid: u32) -> Option<u64> {
    let process = procfs::process::Process::new_with_root(proc_root.join(pid.to_string())).ok()?;
    let status = process.status().ok()?;
    match (status.rssanon, status.rssfile) {
        (Some(anon), Some(file)) => Some((anon + file) * 1024),
        _ => rss_bytes(proc_root, pid),
    }
}

/// Measured bytes of `pid` per device, its own: its resident set less shared memory for the
/// host ([`own_rss_bytes`]), NVML's per-process figure for GPUs (which charges a CUDA allocation
/// to the process that created it, not to those that import and map it: a process mapping a
/// held 256 MiB model shows its context only; docs/perf-logs/2026-12-01-h200-weights.txt).
pub fn process_bytes(proc_root: &Path, pid: u32, statuses: &[DeviceStatus]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in statuses {
        let dev = s.device.to_string();
        if !s.device.is_gpu() {
            if let Some(rss) = own_rss_bytes(proc_root, pid) {
                out.insert(dev, rss);
            }
        } else if let Some(bytes) = s.processes.iter().find(|p| p.pid == pid).and_then(|p| p.used_bytes) {
            out.insert(dev, bytes);
        }
    }
    out
}

/// Summed own resident sets ([`own_rss_bytes`]) of the processes holding models that take
/// calls now (the optimizer's measure on `cpu`, with memwarden's own host memory, where the
/// machine's available memory moves with everything else running).
pub fn holders_rss_bytes(supervisor: &Supervisor) -> u64 {
    supervisor
        .slots()
        .iter()
        .filter_map(|s| s.conn().map(|c| c.pid))
        .filter_map(|pid| own_rss_bytes(supervisor.proc_root(), pid))
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

    /// Touched pages of a mapped shared-memory file (what a process mapping held weights has)
    /// are in its RSS but not in its own bytes.
    #[test]
    fn own_bytes_leave_out_mapped_shared_memory() {
        const LEN: u64 = 64 << 20;
        let (proc_root, me) = (Path::new("/proc"), std::process::id());
        let shm = Path::new("/dev/shm");
        assert!(shm.is_dir(), "this test needs /dev/shm");
        let own_before = own_rss_bytes(proc_root, me).expect("own");
        let rss_before = rss_bytes(proc_root, me).expect("rss");
        let mapping = memwarden_sys::HostMapping::new_shared(LEN, 4096, false, shm).expect("shared mapping");
        mapping.fill(0, LEN, 7).expect("touch every page");
        let own_after = own_rss_bytes(proc_root, me).expect("own");
        let rss_after = rss_bytes(proc_root, me).expect("rss");
        drop(mapping);
        // Other tests run in this process meanwhile: compare what RSS has beyond the own bytes.
        let (shared_before, shared_after) =
            (rss_before.saturating_sub(own_before), rss_after.saturating_sub(own_after));
        assert!(
            shared_after >= shared_before + LEN / 2,
            "the touched shared pages are in the RSS, not in the own bytes: RSS {rss_before} -> {rss_after}, \
             own {own_before} -> {own_after}"
        );
    }
}
