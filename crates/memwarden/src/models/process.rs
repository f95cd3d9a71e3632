//! What the OS and the driver say a model process holds: its resident set (`cpu`) and NVML's
//! per-process bytes (GPUs).

use crate::service::DeviceStatus;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Resident set of a process, from `<proc_root>/<pid>/statm` (the root is configurable so tests
/// can point it at a fixture tree; `memwarden_sys::status`, `None` where the platform has no
/// reader yet).
pub fn rss_bytes(proc_root: &Path, pid: u32) -> Option<u64> {
    memwarden_sys::status::process_rss_bytes(proc_root, pid)
}

/// Reads what processes hold: the procfs root (configurable so tests can point it at a fixture
/// tree) and the folder memwarden's shared memory lives in (`host.shared_memory_dir`), whose
/// files a process may map without them being its own.
#[derive(Debug, Clone)]
pub struct ProcessMeter {
    pub proc_root: PathBuf,
    /// Where memwarden's host memory files are (`<dir>/memwarden-<pid>-<n>`): held weights on
    /// `cpu` and exported host allocations. `None`: memwarden keeps no host memory in files.
    pub shared_dir: Option<PathBuf>,
}

impl ProcessMeter {
    pub fn new(proc_root: PathBuf, shared_dir: Option<PathBuf>) -> ProcessMeter {
        ProcessMeter { proc_root, shared_dir }
    }

    /// The host memory `pid` holds as its own: its resident set less the pages of memwarden's
    /// files it maps (held weights, exports; from `smaps`). Those bytes live in memwarden and
    /// are counted there, once; and a process's RSS has only the pages it touched of them, so
    /// charging it the whole model would make its other bytes negative. Other shared memory
    /// (Python's anonymous `mmap`, torch's shared tensors) stays the process's own.
    pub fn own_host_bytes(&self, pid: u32) -> Option<u64> {
        let rss = rss_bytes(&self.proc_root, pid)?;
        Some(rss.saturating_sub(self.mapped_memwarden_bytes(pid)))
    }

    /// Resident bytes of the mappings of memwarden's files in `pid` (0 without a shared dir or
    /// when `smaps` cannot be read).
    fn mapped_memwarden_bytes(&self, pid: u32) -> u64 {
        let Some(dir) = &self.shared_dir else { return 0 };
        let prefix = dir.join("memwarden-");
        memwarden_sys::status::mapped_file_bytes(&self.proc_root, pid, &prefix.to_string_lossy())
    }

    /// Measured bytes of `pid` per device, its own: for the host [`ProcessMeter::own_host_bytes`];
    /// for GPUs NVML's per-process figure, which charges a CUDA allocation to the process that
    /// created it, not to those that import and map it (a process mapping a held 256 MiB model
    /// shows its context only: docs/perf-logs/2026-12-01-h200-weights.txt).
    pub fn process_bytes(&self, pid: u32, statuses: &[DeviceStatus]) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for s in statuses {
            let dev = s.device.to_string();
            if !s.device.is_gpu() {
                if let Some(rss) = self.own_host_bytes(pid) {
                    out.insert(dev, rss);
                }
            } else if let Some(bytes) = s.processes.iter().find(|p| p.pid == pid).and_then(|p| p.used_bytes) {
                out.insert(dev, bytes);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memwarden_core::units::MIB;

    #[test]
    fn rss_is_read_from_the_proc_tree_in_bytes() {
        let dir = std::env::temp_dir().join(format!("mw-proc-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("4242")).expect("dir");
        std::fs::write(dir.join("4242/statm"), "250000 30000 4000 500 0 90000 0\n").expect("write");
        assert_eq!(rss_bytes(&dir, 4242), Some(30000 * memwarden_sys::page_size_bytes()));
        assert_eq!(rss_bytes(&dir, 4243), None, "no such process");
        assert!(rss_bytes(Path::new("/proc"), std::process::id()).is_some_and(|b| b > MIB));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Touched pages of a mapped memwarden file (what a process mapping held weights has) are
    /// in its RSS but not in its own bytes; other shared memory stays its own.
    #[test]
    fn own_bytes_leave_out_mapped_memwarden_files_only() {
        const LEN: u64 = 64 * MIB;
        let me = std::process::id();
        let shm = std::env::temp_dir().join(format!("mw-meter-{me}"));
        std::fs::create_dir_all(&shm).expect("dir");
        let meter = ProcessMeter::new("/proc".into(), Some(shm.clone()));
        let blind = ProcessMeter::new("/proc".into(), None);
        let mapping = memwarden_sys::HostMapping::new_shared(LEN, 4096, false, &shm).expect("shared mapping");
        mapping.fill(0, LEN, 7).expect("touch every page");
        assert!(mapping.shared_path().is_some_and(|p| p.starts_with(&shm)));
        let mapped = meter.mapped_memwarden_bytes(me);
        // Other tests run in this process meanwhile (park pools register and release hundreds
        // of MiB in the background): a pair of readings is taken again until none moved the
        // process's memory between them.
        let read = || (meter.own_host_bytes(me).expect("own"), blind.own_host_bytes(me).expect("rss"));
        let (mut own, mut rss) = read();
        for _ in 0..20 {
            if rss >= LEN && own + LEN / 2 <= rss {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            (own, rss) = read();
        }
        drop(mapping);
        let _ = std::fs::remove_dir_all(&shm);
        assert_eq!(mapped, LEN, "every touched page of the file is found in smaps");
        assert_eq!(blind.mapped_memwarden_bytes(me), 0, "no shared dir: nothing is memwarden's");
        // Other tests run in this process meanwhile: compare with the file's share, not exactly.
        assert!(rss >= LEN && own + LEN / 2 <= rss, "RSS {rss}, own {own}: the file's pages are not the process's");
    }
}
