//! A daemon on a real loopback port, in-process, and a tiny JSON client for tests.
#![allow(dead_code)]

use memwarden::config::Config;
use memwarden::service::Service;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const MIB_BYTES: u64 = 1 << 20;
use std::net::SocketAddr;
use std::sync::Arc;

/// Who runs now: a test that measures or moves the machine's memory (`alone`), or how many
/// [`TestServer`]s of other tests.
struct Quiet {
    alone: Option<std::thread::ThreadId>,
    servers: usize,
}

static QUIET: std::sync::Mutex<Quiet> = std::sync::Mutex::new(Quiet { alone: None, servers: 0 });
static QUIET_CHANGED: std::sync::Condvar = std::sync::Condvar::new();

fn quiet() -> std::sync::MutexGuard<'static, Quiet> {
    QUIET.lock().unwrap_or_else(|e| e.into_inner())
}

/// Held by a test that measures or moves the machine's memory (a pressure threshold just above
/// today's use, RSS and available-memory figures, a GiB committed): the tests of one area share
/// a test binary and run in parallel, so this waits until no other test of the binary has a
/// [`TestServer`] running or holds it, and keeps others from starting one until it is dropped
/// (the holder's own servers start as usual). Take it before starting a server.
pub struct MachineMemory(());

pub fn machine_memory() -> MachineMemory {
    let me = std::thread::current().id();
    let mut q = quiet();
    while q.alone.is_some() || q.servers > 0 {
        q = QUIET_CHANGED.wait(q).unwrap_or_else(|e| e.into_inner());
    }
    q.alone = Some(me);
    MachineMemory(())
}

impl Drop for MachineMemory {
    fn drop(&mut self) {
        quiet().alone = None;
        QUIET_CHANGED.notify_all();
    }
}

/// A running server's place: waits while another thread's test holds [`machine_memory`].
struct ServerSlot {
    counted: bool,
}

impl ServerSlot {
    fn take() -> ServerSlot {
        let me = std::thread::current().id();
        let mut q = quiet();
        if q.alone == Some(me) {
            return ServerSlot { counted: false };
        }
        while q.alone.is_some() {
            q = QUIET_CHANGED.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        q.servers += 1;
        ServerSlot { counted: true }
    }
}

impl Drop for ServerSlot {
    fn drop(&mut self) {
        if self.counted {
            quiet().servers -= 1;
            QUIET_CHANGED.notify_all();
        }
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub service: Arc<Service>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    agent: ureq::Agent,
    token: Option<String>,
    /// Released after the server has stopped (fields drop after `Drop::drop`).
    _slot: ServerSlot,
}

impl TestServer {
    pub fn start() -> Self {
        Self::start_with(Config::default())
    }

    /// A daemon without model workers or client socket (most tests are about memory alone).
    pub fn start_with(mut config: Config) -> Self {
        config.workers.enabled = false;
        config.workers.socket = "none".into();
        Self::start_with_workers(config)
    }

    /// A daemon with the workers and socket `config` names.
    pub fn start_with_workers(config: Config) -> Self {
        let slot = ServerSlot::take();
        let service = Arc::new(Service::from_config(&config));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let svc = service.clone();
        let thread = std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                addr_tx.send(listener.local_addr().expect("addr")).expect("send addr");
                memwarden::server::serve_on(listener, svc, &config, async {
                    let _ = rx.await;
                })
                .await
                .expect("serve");
            });
        });
        let addr = addr_rx.recv().expect("server address");
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        TestServer { addr, service, shutdown: Some(tx), thread: Some(thread), agent, token: None, _slot: slot }
    }

    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends a request; returns the status and the parsed JSON body.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.call_with(method, path, body, &[])
    }

    pub fn call_with(&self, method: &str, path: &str, body: Option<&str>, headers: &[(&str, &str)]) -> (u16, Value) {
        let url = self.url(path);
        let mut hs: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if let Some(t) = &self.token {
            hs.push(("authorization".into(), format!("Bearer {t}")));
        }
        let result = match method {
            "GET" | "DELETE" => {
                let mut r = if method == "GET" { self.agent.get(&url) } else { self.agent.delete(&url) };
                for (k, v) in &hs {
                    r = r.header(k, v);
                }
                r.call()
            }
            _ => {
                let mut r = match method {
                    "POST" => self.agent.post(&url),
                    "PUT" => self.agent.put(&url),
                    other => panic!("method {other}"),
                };
                for (k, v) in &hs {
                    r = r.header(k, v);
                }
                match body {
                    Some(b) => {
                        if !hs.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
                            r = r.header("content-type", "application/json");
                        }
                        r.send(b)
                    }
                    None => r.send_empty(),
                }
            }
        };
        let mut resp = result.expect("request");
        let status = resp.status().as_u16();
        // Data reads can be large (base64 of up to 64 MiB); lift ureq's 10 MiB default.
        let text = resp.body_mut().with_config().limit(1 << 30).read_to_string().expect("body");
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        (status, json)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Asserts the envelope of an error response: status, code, statusCode, and a message containing `needle`.
pub fn assert_error(resp: &(u16, Value), status: u16, code: &str, needle: &str) {
    let (s, v) = resp;
    assert_eq!(*s, status, "status for {v}");
    assert_eq!(v["success"], false, "{v}");
    assert!(v["data"].is_null(), "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["statusCode"], status, "{v}");
    let message = v["error"]["message"].as_str().expect("message");
    assert!(message.contains(needle), "message {message:?} lacks {needle:?}");
    assert_envelope(v);
}

/// Every envelope has a timestamp (RFC 3339 UTC) and a correlation id, and the seed's
/// `isSuccess` (= `success`) and `message` (the error's, or null).
pub fn assert_envelope(v: &Value) {
    assert_eq!(v["isSuccess"], v["success"], "{v}");
    if v["success"] == true {
        assert!(v["message"].is_null() && v["error"].is_null(), "{v}");
    } else {
        assert_eq!(v["message"], v["error"]["message"], "{v}");
    }
    let ts = v["timestamp"].as_str().expect("timestamp");
    assert!(ts.ends_with('Z') && ts.contains('T'), "timestamp {ts}");
    assert!(!v["correlationId"].as_str().expect("correlationId").is_empty());
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).expect("kB") * 1024
}

impl TestServer {
    /// Allocates on `device` with the JSON `body`; returns the allocation id.
    pub fn alloc_on(&self, device: &str, body: serde_json::Value) -> String {
        let (status, v) =
            self.call("POST", &format!("/api/memory/allocations/allocate/{device}"), Some(&body.to_string()));
        assert_eq!(status, 201, "{v}");
        v["data"]["allocationId"].as_str().expect("id").to_string()
    }

    /// Writes `data` into an allocation at `offset`.
    pub fn put_data(&self, id: &str, offset: u64, data: &[u8]) {
        let mut resp = self
            .agent
            .put(&self.url(&format!("/api/memory/allocations/{id}/data?offset={offset}")))
            .header("content-type", "application/octet-stream")
            .send(data)
            .expect("put");
        let v: Value = resp.body_mut().read_json().expect("json");
        assert_eq!(v["data"]["bytesWritten"], data.len(), "{v}");
    }

    /// Reads `len` bytes of an allocation at `offset`.
    pub fn get_data(&self, id: &str, offset: u64, len: u64) -> Vec<u8> {
        use base64::Engine as _;
        let (status, v) =
            self.call("GET", &format!("/api/memory/allocations/{id}/data?offset={offset}&length={len}"), None);
        assert_eq!(status, 200, "{v}");
        base64::engine::general_purpose::STANDARD
            .decode(v["data"]["dataBase64"].as_str().expect("b64"))
            .expect("decode")
    }
}

/// Pseudo-random bytes (xorshift): data a wrong offset or a partial copy cannot match by accident.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A safetensors file of `mib` F32 tensors of 1 MiB each (written here: the format is an 8-byte
/// header length, a JSON header, then the bytes).
pub fn write_model(dir: &Path, name: &str, mib: u64) -> (PathBuf, u64) {
    let mut header = serde_json::Map::new();
    for i in 0..mib {
        header.insert(
            format!("layer{i}.weight"),
            json!({"dtype": "F32", "shape": [512, 512], "data_offsets": [i * MIB_BYTES, (i + 1) * MIB_BYTES]}),
        );
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    for i in 0..mib {
        bytes.extend(std::iter::repeat_n((i % 251) as u8 + 1, MIB_BYTES as usize));
    }
    let path = dir.join(format!("{name}.safetensors"));
    std::fs::write(&path, bytes).expect("write model");
    (path, mib * MIB_BYTES)
}

/// A scratch directory, removed with its model files when the test ends.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tempdir(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("mw-models-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tempdir");
    TempDir(d)
}

impl TestServer {
    /// The first optimizer run that admission triggered (the history is oldest first).
    pub fn admission_run(&self) -> Value {
        let (_, h) = self.call("GET", "/api/memory/models/optimize/history", None);
        h["data"]["runs"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["trigger"] == "admission"))
            .cloned()
            .expect("admission run")
    }
}

/// `scripts/gpu/gpu_hog.py`: an outside torch process that fills cuda:0 to `fill_to` (0–1) of
/// its memory, then, on `try_extra`, tries one more allocation of `extra_bytes`.
pub struct Hog {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    /// Its report once filled: `freeBytes`, `totalBytes`, `heldBytes`.
    pub filled: Value,
}

impl Hog {
    pub fn fill(fill_to: f64, extra_bytes: u64) -> Hog {
        let scripts = std::env::var("MEMWARDEN_SCRIPTS")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts").into());
        let mut child = std::process::Command::new("python3")
            .arg(format!("{scripts}/gpu/gpu_hog.py"))
            .args([&format!("{fill_to:.5}"), &extra_bytes.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("hog");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let filled = Self::line(&mut out);
        Hog { child, out, filled }
    }

    fn line(out: &mut std::io::BufReader<std::process::ChildStdout>) -> Value {
        let mut line = String::new();
        std::io::BufRead::read_line(out, &mut line).expect("hog output");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("hog printed {line:?}: {e}"))
    }

    /// Tries the extra allocation; its report (`extraAllocated`, `freeBytes`). The hog exits.
    pub fn try_extra(mut self) -> Value {
        let mut stdin = self.child.stdin.take().expect("stdin");
        std::io::Write::write_all(&mut stdin, b"go\n").expect("go");
        let after = Self::line(&mut self.out);
        let _ = std::io::Write::write_all(&mut stdin, b"done\n");
        let _ = self.child.wait();
        after
    }
}
