//! Faults survived (issue 15, item 6). Each case ends in a clear error, a ledger that agrees with
//! the pools and with the OS (or the driver), and no shared-memory file, descriptor or thread
//! left behind.
//!
//! Signals, resource limits, a full tmpfs and misbehaving workers run the real daemon
//! (`memwarden serve`) in a scratch directory of its own; a copy failing mid-transfer and block
//! creation failing use a device that fails on demand (the testkit's `SimulatedBackend`), at the
//! service level.

use crate::common::write_model;
use memwarden::service::{Limits, Service, ServiceError, TransferRequest, TransferStatus, TransferTarget};
use memwarden_backends::{HostBackend, HostStatusReader};
use memwarden_core::{DeviceId, GpuApi, MemoryKind, PoolConfig};
use memwarden_testkit::{Controls, SimulatedBackend, INJECTED, INJECTED_WRITE_OPERATION};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// No model workers and no client socket: most cases are about memory alone.
const NO_WORKERS: &str = "[workers]\nenabled = false\nsocket = \"none\"\n";

// ---------------------------------------------------------------------------------------------
// A daemon in a scratch directory, and what it, its pools and the OS say.

/// `/dev/shm/mw-faults-<tag>-<pid>`: `shm/` (the daemon's `host.shared_memory_dir`), `run/` (its
/// `XDG_RUNTIME_DIR`: socket and embedded Python package), the config and the daemon's log.
struct Scratch {
    root: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let root = PathBuf::from(format!("/dev/shm/mw-faults-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["shm", "run"] {
            std::fs::create_dir_all(root.join(d)).expect("scratch dir");
        }
        Scratch { root }
    }

    fn shm(&self) -> PathBuf {
        self.root.join("shm")
    }

    fn run(&self) -> PathBuf {
        self.root.join("run")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

struct Daemon {
    child: Child,
    pid: u32,
    url: String,
    shm: PathBuf,
    log: PathBuf,
    agent: ureq::Agent,
    /// Kept open: the daemon's stdout stays a live pipe.
    _stdout: BufReader<ChildStdout>,
}

impl Daemon {
    /// `memwarden serve` with `listen = "127.0.0.1:0"`, the scratch's shm dir, and `sections`
    /// (TOML; no `[host]`), run under `wrapper` (e.g. `prlimit …`) when given.
    fn start(s: &Scratch, sections: &str, wrapper: &[&str]) -> Daemon {
        let config = s.root.join("config.toml");
        let toml =
            format!("listen = \"127.0.0.1:0\"\n[host]\nshared_memory_dir = \"{}\"\n{sections}", s.shm().display());
        std::fs::write(&config, toml).expect("config");
        let bin = env!("CARGO_BIN_EXE_memwarden");
        let (program, args): (&str, Vec<&str>) = match wrapper.split_first() {
            Some((first, rest)) => (first, rest.iter().copied().chain([bin]).collect()),
            None => (bin, vec![]),
        };
        static STARTED: AtomicU64 = AtomicU64::new(0);
        let log = s.root.join(format!("daemon-{}.log", STARTED.fetch_add(1, Ordering::Relaxed)));
        let mut child = Command::new(program)
            .args(args)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("XDG_RUNTIME_DIR", s.run())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn memwarden serve");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("announce line");
        let Some(url) = line.trim().strip_prefix("memwarden listening on ").map(str::to_string) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon did not start: {line:?}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        };
        // Under a wrapper (prlimit, setpriv) the wrapper execs the daemon: same pid.
        let pid = child.id();
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        Daemon { child, pid, url, shm: s.shm(), log, agent, _stdout: stdout }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        call_with(&self.agent, &self.url, method, path, body)
    }

    fn alloc(&self, kind: &str, size_bytes: u64) -> (u16, Value) {
        let body = json!({"sizeBytes": size_bytes, "memoryType": kind});
        self.call("POST", "/api/memory/allocations/allocate/cpu", Some(body))
    }

    fn alloc_ok(&self, kind: &str, size_bytes: u64) -> String {
        let (code, v) = self.alloc(kind, size_bytes);
        assert_eq!(code, 201, "{v}");
        v["data"]["allocationId"].as_str().expect("id").to_string()
    }

    /// Its log, without the colours' escape sequences.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut out = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|&c| c == 'm');
            } else {
                out.push(c);
            }
        }
        out
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill").args([signal, &self.pid.to_string()]).status().expect("kill").success();
        assert!(ok, "kill {signal} {}", self.pid);
    }

    /// Waits for the process to exit (at most `limit`).
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the daemon did not exit within {limit:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// This daemon's `memwarden-<pid>-<n>` files and their sizes.
    fn shm_files(&self) -> BTreeMap<String, u64> {
        files_of(&self.shm, self.pid)
    }

    fn fds(&self) -> Vec<String> {
        let dir = format!("/proc/{}/fd", self.pid);
        let entries = std::fs::read_dir(&dir).expect("fd dir");
        entries
            .flatten()
            .map(|e| std::fs::read_link(e.path()).map(|p| p.display().to_string()).unwrap_or_else(|_| "?".into()))
            .collect()
    }

    fn threads(&self) -> Vec<String> {
        let entries = std::fs::read_dir(format!("/proc/{}/task", self.pid)).expect("task dir");
        entries
            .flatten()
            .map(|e| std::fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim().to_string())
            .collect()
    }

    /// Its descriptors and threads now, once idle: what it must come back to.
    fn baseline(&self) -> Baseline {
        assert_eq!(self.call("GET", "/health", None).0, 200);
        std::thread::sleep(Duration::from_millis(300));
        Baseline { fds: self.fds().len(), threads: self.threads().len() }
    }

    /// Ledger = pools = OS for `cpu`: the allocations listed add up to the pools' allocated
    /// bytes (in `pools/cpu` and in the status); the reservations to the status'
    /// `reservationBytes`; the pools' `reservedBytes` and blocks are this daemon's files in its
    /// shm dir (host and pinned blocks both live there), each held open by one descriptor.
    fn assert_consistent(&self) -> Figures {
        let (code, list) = self.call("GET", "/api/memory/allocations", None);
        assert_eq!(code, 200, "{list}");
        let mut ledger: BTreeMap<String, u64> = BTreeMap::new();
        let mut reservations = Vec::new();
        for a in list["data"]["allocations"].as_array().expect("allocations") {
            assert_eq!(a["deviceId"], "cpu", "{a}");
            let kind = a["memoryType"].as_str().expect("memoryType").to_string();
            let bytes = a["allocatedSize"].as_u64().expect("allocatedSize");
            if kind == "reservation" {
                reservations.push(a.clone());
            }
            *ledger.entry(kind).or_default() += bytes;
        }
        let (code, pools) = self.call("GET", "/api/memory/pools/cpu", None);
        assert_eq!(code, 200, "{pools}");
        let (code, status) = self.call("GET", "/api/memory/status/cpu", None);
        assert_eq!(code, 200, "{status}");
        let (mut reserved, mut blocks) = (0, 0);
        for pool in pools["data"]["pools"].as_array().expect("pools") {
            let kind = pool["memoryType"].as_str().expect("memoryType");
            let allocated = pool["allocatedBytes"].as_u64().expect("allocatedBytes");
            assert_eq!(allocated, ledger.get(kind).copied().unwrap_or(0), "{kind}: pool vs ledger {list}");
            let in_status = status["data"]["pools"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["memoryType"] == kind))
                .unwrap_or_else(|| panic!("{kind} pool missing from the status: {status}"));
            assert_eq!(in_status["allocatedBytes"], pool["allocatedBytes"], "{kind}: status vs pools");
            assert_eq!(in_status["reservedBytes"], pool["reservedBytes"], "{kind}: status vs pools");
            reserved += pool["reservedBytes"].as_u64().expect("reservedBytes");
            blocks += pool["blockCount"].as_u64().expect("blockCount");
        }
        let reservation_bytes = ledger.get("reservation").copied().unwrap_or(0);
        assert_eq!(status["data"]["reservationBytes"].as_u64(), Some(reservation_bytes), "{status}");
        assert_eq!(status["data"]["reservedBytes"].as_u64(), Some(reserved), "{status}");
        let files = self.shm_files();
        assert_eq!(files.values().sum::<u64>(), reserved, "files {files:?} vs the pools' reservedBytes {pools}");
        assert_eq!(files.len() as u64, blocks, "one file per block: {files:?}");
        let shm = self.shm.display().to_string();
        let open = self.fds().iter().filter(|f| f.starts_with(&shm)).count();
        assert_eq!(open, files.len(), "one descriptor per block file: {:?}", self.fds());
        Figures { ledger, reservations, reserved_bytes: reserved }
    }

    /// Frees nothing; waits (tokio's idle blocking threads linger 10 s) until no file of this
    /// daemon is left, its descriptors are back to `base` and its threads did not grow.
    fn assert_back_to(&self, base: &Baseline) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (fds, threads, files) = (self.fds(), self.threads(), self.shm_files());
            if fds.len() <= base.fds && threads.len() <= base.threads && files.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not back to the baseline {base:?}: files {files:?}, {} fds {fds:?}, {} threads {threads:?}",
                fds.len(),
                threads.len()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `POST …/clear` on cpu, then [`Daemon::assert_back_to`].
    fn clear_and_assert_back_to(&self, base: &Baseline) {
        let (code, v) = self.call("POST", "/api/memory/operations/clear", Some(json!({})));
        assert_eq!(code, 200, "{v}");
        let f = self.assert_consistent();
        assert_eq!(f.reserved_bytes, 0, "clear released every empty block");
        self.assert_back_to(base);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Baseline {
    fds: usize,
    threads: usize,
}

#[derive(Debug)]
struct Figures {
    /// Allocated bytes per memory type, as the allocation listing says.
    ledger: BTreeMap<String, u64>,
    /// Reservations still listed.
    reservations: Vec<Value>,
    /// The host and pinned pools' `reservedBytes` (= the files' sizes).
    reserved_bytes: u64,
}

fn call_with(agent: &ureq::Agent, base: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("{base}{path}");
    let result = match (method, body) {
        ("GET", _) => agent.get(&url).call(),
        ("DELETE", _) => agent.delete(&url).call(),
        ("POST", Some(b)) => agent.post(&url).header("content-type", "application/json").send(b.to_string()),
        ("POST", None) => agent.post(&url).send_empty(),
        (m, _) => panic!("method {m}"),
    };
    let mut resp = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().expect("body");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}")))
}

/// The `memwarden-<pid>-<n>` files of daemon `pid` in `dir`, with their sizes.
fn files_of(dir: &Path, pid: u32) -> BTreeMap<String, u64> {
    let prefix = format!("memwarden-{pid}-");
    let Ok(entries) = std::fs::read_dir(dir) else { return BTreeMap::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix).then(|| (name, e.metadata().map(|m| m.len()).unwrap_or(0)))
        })
        .collect()
}

fn python_dirs_of(run: &Path, pid: u32) -> Vec<String> {
    let prefix = format!("memwarden-python-{pid}-");
    let Ok(entries) = std::fs::read_dir(run) else { return Vec::new() };
    entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&prefix)).collect()
}

/// Asserts an error envelope: status, code, and a message containing each of `needles`.
fn assert_error(resp: &(u16, Value), status: u16, code: &str, needles: &[&str]) {
    crate::common::assert_error(resp, status, code, needles.first().copied().unwrap_or(""));
    let message = resp.1["error"]["message"].as_str().unwrap_or_default();
    for n in needles {
        assert!(message.contains(n), "message {message:?} lacks {n:?}");
    }
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// 1. SIGTERM during a transfer.

/// A 512 MiB host→host transfer runs in the background (`transfer.sync_max_bytes` is 1 MiB);
/// SIGTERM while it runs: the daemon exits 0 within seconds and removes its files (the pages go
/// with the process; the transfer thread does not outlive it).
#[test]
fn sigterm_during_a_transfer_exits_cleanly_and_leaves_no_shm_file() {
    let s = Scratch::new("sigterm");
    let config = format!("[transfer]\nsync_max_bytes = {MIB}\n{NO_WORKERS}");
    let mut d = Daemon::start(&s, &config, &[]);
    let source = d.alloc_ok("host", 512 * MIB);
    let figures = d.assert_consistent();
    assert_eq!(figures.ledger.get("host"), Some(&(512 * MIB)));
    // A transfer takes ~0.1 s here: try again in the unlikely case one finished before the
    // signal could be sent.
    let mut running = None;
    for _ in 0..3 {
        let (code, v) = d.call(
            "POST",
            "/api/memory/transfer",
            Some(json!({"sourceAllocationId": source, "targetDeviceId": "cpu"})),
        );
        assert_eq!(code, 202, "{v}");
        let id = v["data"]["transferId"].as_str().expect("transferId").to_string();
        let (_, t) = d.call("GET", &format!("/api/memory/transfer/{id}"), None);
        if t["data"]["status"] == "running" {
            d.signal("-TERM");
            running = Some(t);
            break;
        }
        let destination = t["data"]["destinationAllocationId"].as_str().expect("destination").to_string();
        assert_eq!(d.call("DELETE", &format!("/api/memory/allocations/{destination}"), None).0, 200);
    }
    let running = running.expect("a transfer still running when the signal was sent");
    let t0 = Instant::now();
    let status = d.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit {status:?}:\n{}", d.log());
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    assert!(running["data"]["bytesDone"].as_u64() < Some(512 * MIB), "{running}");
    assert_eq!(d.shm_files(), BTreeMap::new(), "no memwarden-{}-* file left", d.pid);
    let log = d.log();
    assert!(log.contains("shared memory files removed removed=2"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// 2. SIGKILL, then restart.

/// A daemon with a worker (so its embedded Python package is on disk) and host and pinned
/// blocks is killed: its files stay (nobody removed them), its worker exits on its own. The next
/// daemon on the same directories removes them at start (files and package), keeps its own, and
/// removes its own at a SIGTERM.
#[test]
fn after_sigkill_the_next_daemon_sweeps_the_dead_ones_files_and_python_package() {
    let s = Scratch::new("sigkill");
    let config = "[workers]\nhealth_interval_ms = 0\n";
    let mut a = Daemon::start(&s, config, &[]);
    a.alloc_ok("host", MIB);
    a.alloc_ok("pinned", MIB);
    a.assert_consistent();
    let worker_pid = wait_worker_ready(&a, "worker-0");
    let dead_files = a.shm_files();
    assert_eq!(dead_files.len(), 2, "a host block and a pinned block: {dead_files:?}");
    let dead_python = python_dirs_of(&s.run(), a.pid);
    assert_eq!(dead_python.len(), 1, "the embedded package: {dead_python:?}");
    a.signal("-KILL");
    let status = a.wait_exit(Duration::from_secs(5));
    assert!(!status.success());
    assert_eq!(a.shm_files(), dead_files, "a killed daemon removes nothing");
    // Its worker reads EOF on its stdin and exits (a zombie until someone reaps it).
    wait_until("the dead daemon's worker to exit", Duration::from_secs(10), || {
        !memwarden_backends::host::process_alive(worker_pid)
    });

    let mut b = Daemon::start(&s, config, &[]);
    assert_eq!(files_of(&s.shm(), a.pid), BTreeMap::new(), "the start-up sweep removed the dead daemon's files");
    assert!(b.log().contains("removed shared blocks left by daemons that died"), "{}", b.log());
    wait_worker_ready(&b, "worker-0");
    assert_eq!(python_dirs_of(&s.run(), a.pid), Vec::<String>::new(), "the dead daemon's package is removed");
    assert_eq!(python_dirs_of(&s.run(), b.pid).len(), 1, "the new daemon's own package");
    b.alloc_ok("pinned", MIB);
    b.assert_consistent();
    b.signal("-TERM");
    let status = b.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit {status:?}:\n{}", b.log());
    assert_eq!(b.shm_files(), BTreeMap::new());
    assert_eq!(python_dirs_of(&s.run(), b.pid), Vec::<String>::new(), "removed at exit");
    assert!(!s.run().join("memwarden.sock").exists(), "the socket is removed at exit");
}

/// Waits until `/health` shows worker `id` ready; its pid.
fn wait_worker_ready(d: &Daemon, id: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, h) = d.call("GET", "/health", None);
        let w = h["data"]["workers"]["workers"].as_array().and_then(|ws| ws.iter().find(|w| w["workerId"] == id));
        if let Some(w) = w.filter(|w| w["state"] == "ready") {
            return w["pid"].as_u64().expect("pid") as u32;
        }
        assert!(Instant::now() < deadline, "worker {id} never became ready: {h}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// 3. A low RLIMIT_MEMLOCK.

/// A wrapper that runs the daemon with a 1 MiB RLIMIT_MEMLOCK and without CAP_IPC_LOCK (root
/// has it, and it lifts the limit); `None` when prlimit or setpriv is missing.
fn low_memlock_wrapper() -> Option<Vec<&'static str>> {
    let have = |tool: &str| Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    (have("prlimit") && have("setpriv")).then(|| {
        vec!["prlimit", "--memlock=1048576:1048576", "setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"]
    })
}

fn has_cap_ipc_lock(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).expect("CapEff").trim();
    u64::from_str_radix(hex, 16).expect("hex") & (1 << 14) != 0
}

/// Under a 1 MiB RLIMIT_MEMLOCK a 64 MiB pinned allocation gets 507 naming the limit, nothing
/// is left allocated or mapped, and host memory is unaffected.
#[test]
fn a_low_memlock_limit_refuses_large_pinned_allocations_by_name() {
    let Some(wrapper) = low_memlock_wrapper() else {
        eprintln!("skipped: prlimit and setpriv (util-linux) are needed");
        return;
    };
    let s = Scratch::new("memlock");
    let d = Daemon::start(&s, NO_WORKERS, &wrapper);
    assert!(!has_cap_ipc_lock(d.pid), "the daemon must run without CAP_IPC_LOCK");
    let base = d.baseline();
    let refused = d.alloc("pinned", 64 * MIB);
    assert_error(&refused, 507, "INSUFFICIENT_MEMORY", &["RLIMIT_MEMLOCK", "allows 1048576 bytes"]);
    let f = d.assert_consistent();
    assert!(f.ledger.is_empty() && f.reserved_bytes == 0, "nothing allocated: {f:?}");
    // KNOWN: a pinned allocation below the limit still needs a whole pool block
    // (pool.block_size_bytes, 64 MiB by default), which the limit refuses: 512 KiB gets 507
    // too. The message says so; pool blocks do not shrink to what a kind's limit leaves.
    let small = d.alloc("pinned", 512 * 1024);
    assert_error(&small, 507, "INSUFFICIENT_MEMORY", &["a new pool block of 67108864 bytes", "RLIMIT_MEMLOCK"]);
    let id = d.alloc_ok("host", 512 * 1024);
    d.assert_consistent();
    assert_eq!(d.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
    d.clear_and_assert_back_to(&base);
}

/// With pool blocks that fit the limit (`pool.block_size_bytes` = 1 MiB), a 512 KiB pinned
/// allocation works under the same 1 MiB limit, and a second block does not.
#[test]
fn under_a_low_memlock_limit_small_pinned_allocations_fit_blocks_within_it() {
    let Some(wrapper) = low_memlock_wrapper() else {
        eprintln!("skipped: prlimit and setpriv (util-linux) are needed");
        return;
    };
    let s = Scratch::new("memlock-small");
    let config = format!("[pool]\nblock_size_bytes = {MIB}\ndedicated_threshold_bytes = {MIB}\n{NO_WORKERS}");
    let d = Daemon::start(&s, &config, &wrapper);
    assert!(!has_cap_ipc_lock(d.pid));
    let base = d.baseline();
    let id = d.alloc_ok("pinned", 512 * 1024);
    let f = d.assert_consistent();
    assert_eq!((f.ledger.get("pinned"), f.reserved_bytes), (Some(&(512 * 1024)), MIB));
    let data = crate::common::random_bytes(4096, 15);
    let mut resp = d
        .agent
        .put(&format!("{}/api/memory/allocations/{id}/data?offset=0", d.url))
        .header("content-type", "application/octet-stream")
        .send(&data[..])
        .expect("put");
    // Read to the end, so the connection is reused (an unread one is not, and stays open).
    let body = resp.body_mut().read_to_string().expect("body");
    assert_eq!(resp.status().as_u16(), 200, "{body}");
    // The 1 MiB block holds the limit: a second one is refused by name.
    assert_error(&d.alloc("pinned", MIB), 507, "INSUFFICIENT_MEMORY", &["RLIMIT_MEMLOCK"]);
    d.assert_consistent();
    assert_eq!(d.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
    d.clear_and_assert_back_to(&base);
}

// ---------------------------------------------------------------------------------------------
// 4. A full tmpfs.

/// An 8 MiB tmpfs mounted on a directory, unmounted on drop.
struct TinyTmpfs(PathBuf);

impl TinyTmpfs {
    fn mount(dir: &Path) -> Result<TinyTmpfs, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(TinyTmpfs(dir.to_path_buf()))
    }
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// `host.shared_memory_dir` on an 8 MiB tmpfs: a 64 MiB host or pinned allocation gets 507
/// INSUFFICIENT_MEMORY with the OS's reason, its partial file is removed, the ledger is
/// consistent, and what fits still works.
#[test]
fn a_full_shm_tmpfs_is_insufficient_memory_and_leaves_no_partial_file() {
    let s = Scratch::new("tmpfs");
    let tmpfs = match TinyTmpfs::mount(&s.shm()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipped: cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {e}");
            return;
        }
    };
    let config =
        format!("[pool]\nblock_size_bytes = {}\ndedicated_threshold_bytes = {}\n{NO_WORKERS}", 4 * MIB, 4 * MIB);
    let d = Daemon::start(&s, &config, &[]);
    let base = d.baseline();
    for kind in ["host", "pinned"] {
        let refused = d.alloc(kind, 64 * MIB);
        assert_error(
            &refused,
            507,
            "INSUFFICIENT_MEMORY",
            &["No space left on device", &s.shm().display().to_string()],
        );
        // KNOWN: `available … bytes` in the message is the host's available RAM, not the
        // tmpfs's free space; the OS's reason and the file name follow it.
        let f = d.assert_consistent();
        assert!(f.ledger.is_empty() && f.reserved_bytes == 0, "{kind}: nothing allocated: {f:?}");
        let left: Vec<_> = std::fs::read_dir(s.shm()).expect("shm").flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{kind}: the partial file is removed: {left:?}");
    }
    // What fits still works: one 4 MiB block, then the tmpfs's last 4 MiB are too few for a
    // second block and a dedicated 6 MiB one.
    let a = d.alloc_ok("host", MIB);
    let b = d.alloc_ok("host", 3 * MIB);
    assert_error(&d.alloc("host", 6 * MIB), 507, "INSUFFICIENT_MEMORY", &["No space left on device"]);
    let f = d.assert_consistent();
    assert_eq!((f.ledger.get("host"), f.reserved_bytes), (Some(&(4 * MIB)), 4 * MIB));
    for id in [a, b] {
        assert_eq!(d.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
    }
    d.clear_and_assert_back_to(&base);
    drop(d);
    drop(tmpfs);
}

// ---------------------------------------------------------------------------------------------
// 5. Workers that reply garbage or die mid-load.

/// The real worker, except that `loadModel` of a model named `garbage-reply` answers a reply
/// that is no model, `garbage-line` answers a line that is not JSON, and `die` exits mid-load.
const FAULTY_WORKER: &str = r#"
import os, sys, time
import memwarden.worker as W

state = {"garble": False}
handle, write = W.Worker.handle, W.StdinSocketTransport.write

def faulty_handle(self, action, data, fds):
    if action == "loadModel":
        name = data.get("name")
        if name == "die":
            time.sleep(0.3)
            os._exit(7)
        if name == "garbage-reply":
            return {"what": "no model here", "sizeBytes": "lots"}
        if name == "garbage-line":
            state["garble"] = True
            return {}
    return handle(self, action, data, fds)

def faulty_write(self, data, fds=()):
    if state["garble"]:
        state["garble"] = False
        data = b"\x00\xff}}} not a reply {{{\n"
    write(self, data, fds)

W.Worker.handle, W.StdinSocketTransport.write = faulty_handle, faulty_write
sys.exit(W.main(["--worker-id", os.environ["MEMWARDEN_WORKER_ID"], "--devices", "cpu", "--backend", "bytes"]))
"#;

/// Each fault gets a clear error (502 for a reply that is no model, 504 for a reply that never
/// comes, 503 for a worker that died); the admission reservation held during the load is given
/// back every time; the ledger agrees with the pools and the OS; a dead worker comes back, and
/// the daemon's descriptors and threads return to where they were (no pipe of a dead worker
/// left open).
#[test]
fn a_worker_that_replies_garbage_or_dies_mid_load_leaves_nothing_behind() {
    let s = Scratch::new("workers");
    let script = s.root.join("faulty_worker.py");
    std::fs::write(&script, FAULTY_WORKER).expect("script");
    let (model, _) = write_model(&s.root, "m", 4);
    let config = format!(
        "[workers]\nsocket = \"none\"\nload_timeout_ms = 2000\ncall_timeout_ms = 2000\nrestart_backoff_ms = 200\n\
         health_interval_ms = 0\n[[workers.worker]]\nid = \"faulty\"\ndevices = [\"cpu\"]\n\
         command = [\"python3\", \"{}\"]\n",
        script.display()
    );
    let d = Daemon::start(&s, &config, &[]);
    let first_pid = wait_worker_ready(&d, "faulty");
    // Some host memory in use throughout, so the ledger check has something to add up.
    let held = d.alloc_ok("host", 3 * MIB);
    let base = d.baseline();
    let load = |name: &str| {
        let body = json!({"path": model, "name": name, "deviceId": "cpu", "heldBy": "worker"});
        d.call("POST", "/api/memory/models/load", Some(body))
    };

    let reply = load("garbage-reply");
    assert_error(&reply, 502, "WORKER_ERROR", &["worker faulty sent a bad model info"]);
    assert!(d.assert_consistent().reservations.is_empty(), "no admission reservation left");

    // The reply that never comes: the admission reservation is held while the worker is
    // waited for, and given back at the timeout.
    let seen = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            // Its own agent (its own connection), dropped before the descriptors are counted.
            let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                let (_, list) = call_with(&agent, &d.url, "GET", "/api/memory/allocations", None);
                let found = list["data"]["allocations"].as_array().and_then(|a| {
                    a.iter().find(|a| a["memoryType"] == "reservation" && a["owner"] == "memwarden-admission").cloned()
                });
                if found.is_some() {
                    return found;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        });
        let reply = load("garbage-line");
        assert_error(&reply, 504, "TIMEOUT", &["worker faulty did not answer loadModel within 2000 ms"]);
        watcher.join().expect("watcher")
    });
    let seen = seen.expect("an admission reservation during the load");
    assert!(seen["sizeBytes"].as_u64() >= Some(4 * MIB), "{seen}");
    assert!(d.assert_consistent().reservations.is_empty(), "the reservation is given back at the timeout");
    // KNOWN: the error is a plain timeout; the bad line is only in the daemon's log ("bad
    // line"), not in the answer.
    assert!(d.log().contains("bad line"), "{}", d.log());

    let reply = load("die");
    assert_error(&reply, 503, "WORKER_UNAVAILABLE", &["worker faulty went away during loadModel"]);
    assert!(d.assert_consistent().reservations.is_empty(), "no admission reservation left");
    let second_pid = wait_worker_ready(&d, "faulty");
    assert_ne!(second_pid, first_pid, "restarted");
    let (code, models) = d.call("GET", "/api/memory/models", None);
    assert_eq!(code, 200, "{models}");
    let cpu = models["data"]["devices"].as_array().and_then(|ds| ds.iter().find(|x| x["deviceId"] == "cpu")).cloned();
    assert_eq!(cpu.expect("cpu")["modelMemory"]["loadedModelCount"], 0, "{models}");
    let f = d.assert_consistent();
    assert_eq!(f.ledger.get("host"), Some(&(3 * MIB)));
    assert_eq!(d.call("DELETE", &format!("/api/memory/allocations/{held}"), None).0, 200);
    d.clear_and_assert_back_to(&base);
}

// ---------------------------------------------------------------------------------------------
// 6. A copy failing mid-transfer, and block creation failing (fault injection).

const VK: DeviceId = DeviceId::Gpu(GpuApi::Vulkan, 0);

/// The host and a simulated GPU (`vulkan:0`, 4 GiB) that fails on demand: an API with no copy
/// fast path, so copies to and from it are staged through host memory with its own `read` and
/// `write`, in 8 MiB steps, and a write that fails after some bytes fails a transfer mid-way.
/// 8 MiB blocks, 16 MiB and up dedicated.
fn faulty_service() -> (Arc<Service>, Arc<Controls>) {
    let gpu = SimulatedBackend::new(VK).named("faulty");
    let faults = gpu.controls();
    let pool = PoolConfig { block_size_bytes: 8 * MIB, dedicated_threshold_bytes: 16 * MIB, ..PoolConfig::default() };
    let host = Arc::new(HostBackend::new(HostStatusReader::default()));
    let service = Service::with_backends(vec![host, Arc::new(gpu)], pool, Limits::default());
    (Arc::new(service), faults)
}

/// Ledger = pools = driver: `validate()` (every pool's invariants, ledger = pools), and the
/// faulty device's live blocks are exactly its pool's blocks.
fn assert_service_consistent(s: &Service, faults: &Controls) {
    s.validate().expect("ledger = pools");
    let st = s.status(VK).expect("status");
    let (_, pool) = st.pools.iter().find(|(k, _)| *k == MemoryKind::Device).expect("device pool");
    assert_eq!(faults.live_bytes(), pool.reserved_bytes, "driver vs pool bytes");
    assert_eq!(faults.live_blocks(), pool.block_count as u64, "driver vs pool blocks");
    let listed: u64 = s.allocations(Some(VK)).iter().map(|a| a.allocated_bytes).sum();
    assert_eq!(listed, pool.allocated_bytes, "ledger vs pool");
}

fn req(device: &str, size_bytes: u64) -> memwarden::service::AllocateRequest {
    memwarden::service::AllocateRequest {
        owner: Some("faults".into()),
        ..memwarden::service::AllocateRequest::new(device, size_bytes)
    }
}

fn transfer_to(source: &str, target: TransferTarget, move_source: bool) -> TransferRequest {
    TransferRequest { source_id: source.into(), source_offset: 0, target, size_bytes: None, move_source }
}

/// A synchronous move to a new allocation on the GPU fails after 16 of its 24 MiB: 500-class
/// TRANSFER_FAILED with the driver's words, the transfer shows `failed`, the destination it
/// made is freed, and the move keeps its source, every byte intact.
#[test]
fn a_copy_failing_mid_transfer_frees_the_new_destination_and_keeps_the_source() {
    let (s, faults) = faulty_service();
    let source = s.allocate(req("cpu", 24 * MIB)).expect("source");
    let data = crate::common::random_bytes((24 * MIB) as usize, 6);
    s.write_bytes(&source.id, 0, &data).expect("write");
    faults.fail_writes_after(16 * MIB);
    let target = TransferTarget::NewOn { device: "vulkan:0".into(), kind: None };
    let err = s.transfer(transfer_to(&source.id, target, true)).expect_err("fails");
    let ServiceError::TransferFailed { transfer_id, message } = &err else { panic!("{err:?}") };
    assert!(message.contains(INJECTED) && message.contains(INJECTED_WRITE_OPERATION), "{message}");
    assert!(faults.written_bytes() > 8 * MIB, "it failed mid-way, not before the copy");
    let record = s.transfer_status(transfer_id).expect("kept");
    assert_eq!(record.status, TransferStatus::Failed);
    assert_eq!(record.error.as_deref(), Some(message.as_str()));
    assert!(s.allocations(Some(VK)).is_empty(), "the destination it made is freed");
    assert_eq!(s.read_bytes(&source.id, 0, 24 * MIB).expect("source kept"), data);
    assert_service_consistent(&s, &faults);
    // Nothing is left marked busy: the source can be freed.
    s.free(&source.id).expect("free the source");
    assert_service_consistent(&s, &faults);
}

/// A background transfer (over 64 MiB) into an existing GPU allocation fails mid-way: it shows
/// `failed` with the error and how far it got, and both allocations stay, are not busy, and free.
#[test]
fn a_background_transfer_failing_mid_way_reports_failed_and_frees_nothing_it_did_not_make() {
    let (s, faults) = faulty_service();
    let size = 80 * MIB;
    let source = s.allocate(req("cpu", size)).expect("source");
    let destination = s.allocate(req("vulkan:0", size)).expect("destination");
    faults.fail_writes_after(40 * MIB);
    let target = TransferTarget::Allocation { id: destination.id.clone(), offset: 0 };
    let started = s.transfer(transfer_to(&source.id, target, false)).expect("started");
    assert_eq!(started.status, TransferStatus::Running);
    let deadline = Instant::now() + Duration::from_secs(30);
    let record = loop {
        let r = s.transfer_status(&started.id).expect("status");
        if r.status != TransferStatus::Running {
            break r;
        }
        assert!(Instant::now() < deadline, "still running: {r:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(record.status, TransferStatus::Failed);
    assert!(record.error.as_deref().is_some_and(|e| e.contains(INJECTED)), "{record:?}");
    assert!(record.bytes_done < size, "{record:?}");
    assert!(s.allocation(&destination.id).is_ok(), "a destination the caller made is the caller's");
    assert_service_consistent(&s, &faults);
    s.free(&destination.id).expect("not busy");
    s.free(&source.id).expect("not busy");
    assert_service_consistent(&s, &faults);
    assert_eq!(faults.live_blocks(), 0, "the dedicated block went with it");
}

/// Block creation failing: an allocation that needs a new block gets the driver's error and
/// leaves nothing; one that fits a block already held still works; a transfer to a new
/// allocation there fails before copying anything and leaves its source free to go.
#[test]
fn block_creation_failing_leaves_nothing_half_made() {
    let (s, faults) = faulty_service();
    let first = s.allocate(req("vulkan:0", MIB)).expect("first block");
    faults.fail_create(true);
    for size in [16 * MIB, 8 * MIB] {
        let err = s.allocate(req("vulkan:0", size)).expect_err("needs a new block");
        assert!(
            matches!(&err, ServiceError::BackendFailed { device, message } if device == "vulkan:0" && message.contains(INJECTED)),
            "{err:?}"
        );
        assert_service_consistent(&s, &faults);
    }
    let second = s.allocate(req("vulkan:0", 2 * MIB)).expect("fits the block already held");
    assert_service_consistent(&s, &faults);
    let source = s.allocate(req("cpu", 24 * MIB)).expect("source");
    let target = TransferTarget::NewOn { device: "vulkan:0".into(), kind: None };
    let err = s.transfer(transfer_to(&source.id, target, true)).expect_err("no destination");
    assert!(matches!(&err, ServiceError::BackendFailed { message, .. } if message.contains(INJECTED)), "{err:?}");
    assert_eq!(faults.written_bytes(), 0, "nothing copied");
    assert_eq!(s.allocations(Some(VK)).len(), 2);
    assert_service_consistent(&s, &faults);
    faults.fail_create(false);
    for id in [&first.id, &second.id, &source.id] {
        s.free(id).expect("free");
    }
    s.clear(None).expect("clear");
    assert_service_consistent(&s, &faults);
    assert_eq!(faults.live_blocks(), 0);
}
