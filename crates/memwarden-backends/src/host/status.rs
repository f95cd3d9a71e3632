//! Host memory status from `/proc/meminfo`, bounded by the cgroup memory limit when one applies
//! (v2 `memory.max`/`memory.current`, v1 `memory.limit_in_bytes`/`memory.usage_in_bytes`).
//! Both roots are injectable so tests read fixture trees copied from real machines.

use crate::backend::MemoryReading;
use crate::signals::{HostSignals, StallTrigger};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

/// Limits at or above this are "no limit" (v1 reports 2^63 rounded down to a page).
const UNLIMITED_BYTES: u64 = 1 << 62;

/// The `/proc/meminfo` fields memwarden uses, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meminfo {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub available_bytes: u64,
    pub buffers_bytes: u64,
    pub cached_bytes: u64,
}

/// Parses `/proc/meminfo` text. `MemTotal` is required; a kernel without `MemAvailable`
/// (before 3.14) gets free + buffers + cached instead. Written here rather than taken from
/// procfs: its parser requires 17 fields (`SwapCached`, `Slab`, `Committed_AS`, `Vmalloc*`, …)
/// that synthetic /proc trees (gVisor, some containers) leave out, which would take the host's
/// status, pressure and allocations down with it; and it measured 17 µs a host status read
/// against this one's 10 µs (`benches/host_status.rs`, docs/PERFORMANCE.md).
pub fn parse_meminfo(text: &str) -> io::Result<Meminfo> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else { continue };
        let mut parts = rest.split_whitespace();
        let Some(value) = parts.next().and_then(|v| v.parse::<u64>().ok()) else { continue };
        let scale = match parts.next() {
            Some("kB") => 1024,
            None => 1,
            Some(_) => continue,
        };
        fields.insert(key.trim(), value * scale);
    }
    let get = |k: &str| fields.get(k).copied();
    let total_bytes = get("MemTotal").ok_or_else(|| invalid("meminfo has no MemTotal"))?;
    let free_bytes = get("MemFree").unwrap_or(0);
    let buffers_bytes = get("Buffers").unwrap_or(0);
    let cached_bytes = get("Cached").unwrap_or(0);
    let available_bytes = get("MemAvailable").unwrap_or(free_bytes + buffers_bytes + cached_bytes).min(total_bytes);
    Ok(Meminfo { total_bytes, free_bytes, available_bytes, buffers_bytes, cached_bytes })
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The memory cgroup of this process, as named in `/proc/self/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupPath {
    V1(String),
    V2(String),
}

/// Parses `/proc/self/cgroup` (procfs's parser): a v1 line whose controllers include `memory`
/// wins (hybrid machines keep memory on v1); otherwise the v2 line `0::/path`.
pub fn parse_proc_cgroup(text: &str) -> Option<CgroupPath> {
    use procfs_core::FromBufRead;
    let groups = procfs_core::ProcessCGroups::from_buf_read(text.as_bytes()).ok()?;
    let mut v2 = None;
    for g in groups {
        if g.controllers.iter().any(|c| c == "memory") {
            return Some(CgroupPath::V1(g.pathname));
        }
        if g.hierarchy == 0 && g.controllers.is_empty() {
            v2 = Some(CgroupPath::V2(g.pathname));
        }
    }
    v2
}

/// A cgroup memory limit and the usage charged against it, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMemory {
    pub limit_bytes: u64,
    /// Usage minus inactive file cache (what the kernel can drop first): how `docker stats` and
    /// the kubelet count working-set memory.
    pub used_bytes: u64,
    /// `cgroup-v1:/path` or `cgroup-v2:/path`.
    pub source: String,
}

/// Memory-limit events of a cgroup, as counters since the cgroup was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CgroupEvents {
    pub limit_hits: u64,
    pub oom_kills: u64,
}

/// Reads host memory status from a `proc` root and a cgroup filesystem root.
#[derive(Debug, Clone)]
pub struct HostStatusReader {
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    /// Until when "no cgroup limit applies" may be assumed without looking again: the pressure
    /// sampler reads status every few tens of milliseconds, and finding out that there is no
    /// limit costs several file reads (memory.stat is long). Limits are rechecked every second.
    no_limit_until: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// The last per-CPU free-list total and when it was read (see [`parse_zoneinfo_pcp_pages`]).
    pcp: std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, u64)>>>,
}

/// How long "no cgroup limit" is trusted before the cgroup files are read again.
const NO_LIMIT_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the per-CPU free-list total is reused: /proc/zoneinfo costs about 50 µs to read
/// (more with more CPUs), too much for every 60 ms sample; the total is a correction term.
const PCP_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// Pages on the per-CPU free lists ("pagesets", `count:` lines of `/proc/zoneinfo`). They are
/// free memory, but MemAvailable leaves them out (NR_FREE_PAGES does not count them), and since
/// Linux 6.7 tunes those lists automatically they can hold a lot: 868–948 MiB on this project's
/// 2-CPU, 24 GiB dev VM after a few GiB were freed, which MemAvailable then reported as used
/// for many seconds.
pub fn parse_zoneinfo_pcp_pages(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("count:"))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

impl Default for HostStatusReader {
    fn default() -> Self {
        HostStatusReader::new(memwarden_sys::status::PROC_ROOT, memwarden_sys::status::CGROUP_ROOT)
    }
}

impl HostStatusReader {
    pub fn new(proc_root: impl Into<PathBuf>, cgroup_root: impl Into<PathBuf>) -> Self {
        HostStatusReader {
            proc_root: proc_root.into(),
            cgroup_root: cgroup_root.into(),
            no_limit_until: Default::default(),
            pcp: Default::default(),
        }
    }

    /// Drops the cached per-CPU free-list total: the next read takes it afresh.
    pub fn forget_per_cpu_free(&self) {
        *self.pcp.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Bytes on the per-CPU free lists (0 where `/proc/zoneinfo` cannot be read), at most
    /// [`PCP_MAX_AGE`] old.
    pub fn per_cpu_free_bytes(&self) -> u64 {
        let now = std::time::Instant::now();
        let mut cached = self.pcp.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, bytes)) = *cached {
            if now.duration_since(at) < PCP_MAX_AGE {
                return bytes;
            }
        }
        let pages =
            std::fs::read_to_string(self.proc_root.join("zoneinfo")).map(|t| parse_zoneinfo_pcp_pages(&t)).unwrap_or(0);
        let bytes = pages * memwarden_sys::page_size_bytes();
        *cached = Some((now, bytes));
        bytes
    }

    /// A reader over a fixture folder holding `proc/` and `sys/fs/cgroup/`.
    pub fn with_root(root: impl AsRef<Path>) -> Self {
        let root = root.as_ref();
        HostStatusReader::new(root.join("proc"), root.join("sys/fs/cgroup"))
    }

    /// `/proc/pressure/memory`, when the kernel has PSI.
    pub fn psi(&self) -> Option<memwarden_core::pressure::PsiReading> {
        memwarden_core::pressure::parse_psi(&std::fs::read_to_string(self.proc_root.join("pressure/memory")).ok()?)
    }

    /// A PSI trigger on this root's `pressure/memory`.
    pub fn psi_trigger(&self, spec: &str) -> Result<memwarden_sys::PsiTrigger, memwarden_sys::SysError> {
        memwarden_sys::PsiTrigger::new(&self.proc_root.join("pressure/memory"), spec)
    }

    pub fn meminfo(&self) -> io::Result<Meminfo> {
        parse_meminfo(&std::fs::read_to_string(self.proc_root.join("meminfo"))?)
    }

    /// The limit of this process's memory cgroup, if one applies and is below physical memory.
    /// Any file missing means "no cgroup limit here": not every machine has the controller.
    pub fn cgroup_memory(&self, physical_total_bytes: u64) -> Option<CgroupMemory> {
        let found = self.find_cgroup()?;
        (found.limit_bytes < physical_total_bytes && found.limit_bytes < UNLIMITED_BYTES).then_some(found)
    }

    /// How often this cgroup hit its memory limit and how many tasks the OOM killer ended in it
    /// (v2 `memory.events` `max` + `oom_kill`; v1 `memory.failcnt` + `memory.oom_control`
    /// `oom_kill`). `None` without a memory cgroup.
    pub fn cgroup_events(&self) -> Option<CgroupEvents> {
        let text = std::fs::read_to_string(self.proc_root.join("self/cgroup")).ok()?;
        match parse_proc_cgroup(&text)? {
            CgroupPath::V1(path) => {
                let mount = self.cgroup_root.join("memory");
                let dir = [mount.join(path.trim_start_matches('/')), mount].into_iter().find(|d| d.is_dir())?;
                let oom = read_kv(&dir.join("memory.oom_control")).unwrap_or_default();
                Some(CgroupEvents {
                    limit_hits: read_u64(&dir.join("memory.failcnt")).unwrap_or(0),
                    oom_kills: oom.get("oom_kill").copied().unwrap_or(0),
                })
            }
            CgroupPath::V2(path) => {
                let leaf = [self.cgroup_root.join(path.trim_start_matches('/')), self.cgroup_root.clone()]
                    .into_iter()
                    .find(|d| d.join("memory.events").is_file())?;
                let ev = read_kv(&leaf.join("memory.events"))?;
                Some(CgroupEvents {
                    limit_hits: ev.get("max").copied().unwrap_or(0),
                    oom_kills: ev.get("oom_kill").copied().unwrap_or(0),
                })
            }
        }
    }

    /// Whether the last `read` found a cgroup limit (then limit events matter).
    pub fn limited(&self) -> bool {
        self.no_limit_until.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    /// This process's memory cgroup, limited or not.
    pub fn find_cgroup(&self) -> Option<CgroupMemory> {
        let text = std::fs::read_to_string(self.proc_root.join("self/cgroup")).ok()?;
        match parse_proc_cgroup(&text)? {
            CgroupPath::V1(path) => self.cgroup_v1(&path),
            CgroupPath::V2(path) => self.cgroup_v2(&path),
        }
    }

    fn cgroup_v1(&self, path: &str) -> Option<CgroupMemory> {
        let mount = self.cgroup_root.join("memory");
        // Inside a cgroup namespace the path may not exist under the mount: the mount root is ours.
        let dir = [mount.join(path.trim_start_matches('/')), mount.clone()].into_iter().find(|d| d.is_dir())?;
        let stat = read_kv(&dir.join("memory.stat")).unwrap_or_default();
        let limit_bytes = match stat.get("hierarchical_memory_limit") {
            Some(&l) => l,
            None => read_u64(&dir.join("memory.limit_in_bytes"))?,
        };
        let usage = read_u64(&dir.join("memory.usage_in_bytes"))?;
        let inactive = stat.get("total_inactive_file").or(stat.get("inactive_file")).copied().unwrap_or(0);
        Some(CgroupMemory {
            limit_bytes,
            used_bytes: usage.saturating_sub(inactive),
            source: format!("cgroup-v1:{path}"),
        })
    }

    fn cgroup_v2(&self, path: &str) -> Option<CgroupMemory> {
        let leaf = [self.cgroup_root.join(path.trim_start_matches('/')), self.cgroup_root.clone()]
            .into_iter()
            .find(|d| d.join("memory.current").is_file())?;
        // Limits nest: the effective one is the smallest memory.max from the leaf up to the root.
        let mut limit_bytes = u64::MAX;
        let mut dir = leaf.as_path();
        loop {
            if let Ok(text) = std::fs::read_to_string(dir.join("memory.max")) {
                if let Ok(v) = text.trim().parse::<u64>() {
                    limit_bytes = limit_bytes.min(v);
                }
            }
            if dir == self.cgroup_root {
                break;
            }
            match dir.parent() {
                Some(p) if p.starts_with(&self.cgroup_root) => dir = p,
                _ => break,
            }
        }
        let usage = read_u64(&leaf.join("memory.current"))?;
        let stat = read_kv(&leaf.join("memory.stat")).unwrap_or_default();
        let inactive = stat.get("inactive_file").copied().unwrap_or(0);
        Some(CgroupMemory {
            limit_bytes,
            used_bytes: usage.saturating_sub(inactive),
            source: format!("cgroup-v2:{path}"),
        })
    }

    /// Host memory now: against the cgroup limit when one applies, else `/proc/meminfo`.
    /// Used is total − available, as `free` (procps 4) reports it.
    pub fn read(&self) -> io::Result<MemoryReading> {
        if let Some(os) = memwarden_sys::status::os_memory() {
            return Ok(MemoryReading {
                total_bytes: os.total_bytes,
                available_bytes: os.available_bytes,
                used_bytes: os.total_bytes - os.available_bytes,
                source: os.source.into(),
                reserved_bytes: None,
                processes: vec![],
            });
        }
        let mi = self.meminfo()?;
        let now = std::time::Instant::now();
        let mut skip = self.no_limit_until.lock().unwrap_or_else(|e| e.into_inner());
        let cgroup = if skip.is_some_and(|until| now < until) {
            None
        } else {
            let found = self.cgroup_memory(mi.total_bytes);
            *skip = found.is_none().then_some(now + NO_LIMIT_RECHECK);
            found
        };
        drop(skip);
        Ok(match cgroup {
            Some(cg) => {
                let available = cg.limit_bytes.saturating_sub(cg.used_bytes).min(mi.available_bytes);
                MemoryReading {
                    total_bytes: cg.limit_bytes,
                    available_bytes: available,
                    used_bytes: cg.limit_bytes - available,
                    source: cg.source,
                    reserved_bytes: None,
                    processes: vec![],
                }
            }
            None => {
                // MemAvailable plus the per-CPU free lists it leaves out.
                let available = (mi.available_bytes + self.per_cpu_free_bytes()).min(mi.total_bytes);
                MemoryReading {
                    total_bytes: mi.total_bytes,
                    available_bytes: available,
                    used_bytes: mi.total_bytes - available,
                    source: "meminfo".into(),
                    reserved_bytes: None,
                    processes: vec![],
                }
            }
        })
    }
}

/// The host's pressure signals read the same roots as its memory status, and share its state.
impl HostSignals for HostStatusReader {
    fn pressure_stall(&self) -> Option<memwarden_core::pressure::PsiReading> {
        self.psi()
    }

    /// Limit hits + OOM kills of this process's cgroup, when a limit applies.
    fn limit_events(&self) -> Option<u64> {
        if !self.limited() {
            return None;
        }
        self.cgroup_events().map(|e| e.limit_hits + e.oom_kills)
    }

    fn stall_trigger(&self, spec: &str) -> Result<Box<dyn StallTrigger>, String> {
        match self.psi_trigger(spec) {
            Ok(t) => Ok(Box::new(t)),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_kv(path: &Path) -> Option<HashMap<String, u64>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use memwarden_core::units::GIB;

    fn fixture(name: &str) -> HostStatusReader {
        HostStatusReader::with_root(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/host").join(name))
    }

    #[test]
    fn meminfo_parses_real_text() {
        let mi = fixture("no-cgroup").meminfo().expect("meminfo");
        assert_eq!(mi.total_bytes, 24_684_084 * 1024);
        assert!(mi.available_bytes > 0 && mi.available_bytes <= mi.total_bytes);
    }

    #[test]
    fn per_cpu_free_lists_are_summed_from_zoneinfo() {
        // /proc/zoneinfo of the dev VM (Linux 6.18, 2 CPUs) after a few GiB were freed.
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/host/pcp/zoneinfo"),
        )
        .expect("fixture");
        let pages = parse_zoneinfo_pcp_pages(&text);
        assert!(pages > 100_000, "{pages} pages: the fixture holds most of a GiB on one CPU's list");
        assert_eq!(parse_zoneinfo_pcp_pages("Node 0, zone Normal\n  pagesets\n    cpu: 0\n              count:    7\n              high:     9\n    cpu: 1\n              count: 5\n"), 12);
        assert_eq!(parse_zoneinfo_pcp_pages(""), 0);
    }

    #[test]
    fn meminfo_without_memavailable_falls_back() {
        let mi = parse_meminfo("MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 50 kB\n").expect("parse");
        assert_eq!(mi.available_bytes, 160 * 1024);
        assert!(parse_meminfo("MemFree: 1 kB\n").is_err(), "MemTotal is required");
    }

    #[test]
    fn no_cgroup_reports_meminfo() {
        let r = fixture("no-cgroup").read().expect("read");
        assert_eq!(r.source, "meminfo");
        assert_eq!(r.total_bytes, 24_684_084 * 1024);
        assert_eq!(r.used_bytes + r.available_bytes, r.total_bytes);
    }

    #[test]
    fn v1_without_limit_reports_meminfo() {
        let reader = fixture("cgroup-v1-unlimited");
        let cg = reader.find_cgroup().expect("the cgroup is found");
        assert_eq!(cg.source, "cgroup-v1:/process_api/5f76e0faa7d3b8e69e0288a4012f3678");
        assert!(cg.limit_bytes >= UNLIMITED_BYTES);
        assert!(reader.cgroup_memory(u64::MAX).is_none(), "an unlimited cgroup is no limit");
        let r = reader.read().expect("read");
        assert_eq!(r.source, "meminfo", "an unlimited cgroup does not bound the numbers");
    }

    #[test]
    fn v1_limit_bounds_the_numbers() {
        let r = fixture("cgroup-v1-limited").read().expect("read");
        assert_eq!(r.source, "cgroup-v1:/memwarden-fixture");
        assert_eq!(r.total_bytes, 2 * GIB);
        // usage_in_bytes 324591616 − total_inactive_file 159744
        assert_eq!(r.used_bytes, 324_591_616 - 159_744);
        assert_eq!(r.available_bytes, 2 * GIB - (324_591_616 - 159_744));
    }

    #[test]
    fn v2_limit_is_the_smallest_up_the_tree() {
        let r = fixture("cgroup-v2-limited").read().expect("read");
        assert_eq!(r.source, "cgroup-v2:/system.slice/inference.service");
        assert_eq!(r.total_bytes, 4 * GIB);
        assert_eq!(r.used_bytes, GIB - 104_857_600);
        assert_eq!(r.available_bytes, 4 * GIB - r.used_bytes);
    }

    #[test]
    fn proc_cgroup_lines() {
        assert_eq!(parse_proc_cgroup("0::/a/b\n"), Some(CgroupPath::V2("/a/b".into())));
        assert_eq!(
            parse_proc_cgroup("4:memory:/x\n0::/\n"),
            Some(CgroupPath::V1("/x".into())),
            "v1 memory wins on hybrid machines"
        );
        assert_eq!(parse_proc_cgroup("3:cpu,cpuacct,memory:/y\n"), Some(CgroupPath::V1("/y".into())));
        assert_eq!(parse_proc_cgroup("1:cpu:/\n"), None);
        assert_eq!(parse_proc_cgroup("garbage"), None);
    }

    #[test]
    fn psi_is_read_where_present() {
        let r = fixture("no-cgroup").psi().expect("psi fixture");
        assert_eq!((r.some_avg10, r.full_avg10), (12.5, 3.1));
        assert_eq!(fixture("cgroup-v1-unlimited").psi().map(|r| r.some_total_us), Some(0));
        assert!(fixture("cgroup-v1-limited").psi().is_none(), "no PSI file: none");
    }

    #[test]
    fn cgroup_limit_events_are_read() {
        assert_eq!(fixture("cgroup-v1-oom").cgroup_events(), Some(CgroupEvents { limit_hits: 66, oom_kills: 1 }));
        assert_eq!(fixture("cgroup-v2-limited").cgroup_events(), Some(CgroupEvents { limit_hits: 7, oom_kills: 1 }));
        assert_eq!(fixture("no-cgroup").cgroup_events(), None);
    }

    #[test]
    fn missing_root_is_an_error_not_a_panic() {
        assert!(HostStatusReader::with_root("/nonexistent/memwarden").read().is_err());
    }

    /// The live machine: numbers agree with `free -b` within 1% (when `free` is installed).
    #[test]
    fn live_status_agrees_with_free() {
        let r = HostStatusReader::default().read().expect("read /proc");
        assert!(r.total_bytes > 0 && r.available_bytes <= r.total_bytes);
        let Ok(out) = std::process::Command::new("free").arg("-b").output() else { return };
        let text = String::from_utf8_lossy(&out.stdout);
        let mem: Vec<u64> = text
            .lines()
            .find(|l| l.starts_with("Mem:"))
            .expect("Mem line")
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        if r.source != "meminfo" {
            return; // free reports the machine, we report the cgroup limit
        }
        let (total, available) = (mem[0], mem[5]);
        assert_eq!(r.total_bytes, total);
        // free shows MemAvailable; memwarden adds the per-CPU free lists to it.
        let pcp = HostStatusReader::default().per_cpu_free_bytes();
        let diff = r.available_bytes.abs_diff(available + pcp) as f64;
        assert!(
            diff / total as f64 <= 0.01,
            "available {} vs free {available} + per-CPU lists {pcp}",
            r.available_bytes
        );
    }
}
