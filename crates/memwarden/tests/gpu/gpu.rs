//! GPU tests on a real NVIDIA GPU (cargo feature `hw-tests`): they fail, not skip, without one.
//! Run them one at a time (`--test-threads=1`): they compare the driver's free memory before and
//! after. `multi_gpu_*` need two GPUs and run in the 2-GPU job.
#![cfg(feature = "hw-tests")]

use crate::common::{assert_error, random_bytes, TestServer};
use memwarden::config::Config;
use serde_json::{json, Value};
use std::process::Command;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn start() -> TestServer {
    let s = TestServer::start_with(Config::default());
    let (_, h) = s.call("GET", "/health", None);
    let cuda = h["data"]["backends"].as_array().expect("backends").iter().find(|b| b["name"] == "cuda").cloned();
    assert_eq!(cuda.as_ref().map(|c| c["available"].clone()), Some(json!(true)), "CUDA must be available: {h}");
    s
}

/// nvidia-smi's (total, used, free) in bytes for GPU `i`.
fn smi(i: u32) -> (u64, u64, u64) {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.total,memory.used,memory.free",
            "--format=csv,noheader,nounits",
            "-i",
            &i.to_string(),
        ])
        .output()
        .expect("nvidia-smi");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u64> = text.trim().split(',').map(|x| x.trim().parse::<u64>().expect("MiB") * MIB).collect();
    (v[0], v[1], v[2])
}

fn alloc(s: &TestServer, device: &str, body: Value) -> String {
    s.alloc_on(device, body)
}

fn put(s: &TestServer, id: &str, data: &[u8]) {
    s.put_data(id, 0, data)
}

fn get(s: &TestServer, id: &str, offset: u64, len: u64) -> Vec<u8> {
    s.get_data(id, offset, len)
}

fn transfer(s: &TestServer, body: Value) -> Value {
    transfer_with_status(s, body).1
}

/// Posts a transfer and polls it to the end; returns the first HTTP status and the final record.
fn transfer_with_status(s: &TestServer, body: Value) -> (u16, Value) {
    let (status, v) = s.call("POST", "/api/memory/transfer", Some(&body.to_string()));
    assert!(status == 200 || status == 202, "{v}");
    let mut t = v["data"].clone();
    let id = t["transferId"].as_str().expect("id").to_string();
    for _ in 0..6000 {
        if t["status"] != "running" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        t = s.call("GET", &format!("/api/memory/transfer/{id}"), None).1["data"].clone();
    }
    assert_eq!(t["status"], "completed", "{t}");
    (status, t)
}

#[test]
fn gpu_status_matches_nvidia_smi() {
    let s = start();
    let (status, v) = s.call("GET", "/api/memory/status/gpu-0", None);
    assert_eq!(status, 200, "{v}");
    let d = &v["data"];
    assert_eq!(d["deviceId"], "cuda:0");
    assert_eq!(d["deviceType"], "GPU");
    assert_eq!(d["memoryType"], "VRAM");
    assert!(d["uuid"].as_str().expect("uuid").starts_with("GPU-"));
    assert!(d["pciBusId"].as_str().expect("pci").contains(':'));
    assert!(d["computeCapability"].as_str().expect("cc").contains('.'));
    assert!(d["memoryBandwidth"].as_u64().expect("bandwidth") > 1_000_000_000_000, "HBM: over 1 TB/s");
    assert!(d["reservedMemory"].is_u64());
    assert_eq!(d["healthy"], true);
    let (total, used, free) = smi(0);
    let t = d["totalMemory"].as_u64().expect("total");
    let u = d["usedMemory"].as_u64().expect("used");
    let a = d["availableMemory"].as_u64().expect("available");
    let tol = total as f64 * 0.01;
    assert!((t as f64 - total as f64).abs() <= tol, "total {t} vs nvidia-smi {total}");
    assert!((u as f64 - used as f64).abs() <= tol, "used {u} vs nvidia-smi {used}");
    assert!((a as f64 - free as f64).abs() <= tol, "free {a} vs nvidia-smi {free}");
    // This process holds a CUDA context: NVML lists it among the processes.
    let me = std::process::id();
    assert!(
        d["processes"].as_array().expect("processes").iter().any(|p| p["pid"] == me),
        "own pid {me} in {}",
        d["processes"]
    );
    let (_, all) = s.call("GET", "/api/memory/status", None);
    assert!(all["data"]["devices"].as_array().expect("devices").len() >= 2, "cpu and at least one GPU");
}

#[test]
fn ten_gib_on_the_gpu_lowers_driver_free_memory_and_comes_back() {
    let s = start();
    let (_, _, free_before) = smi(0);
    let id = alloc(&s, "cuda:0", json!({"sizeBytes": 10 * GIB, "purpose": "hw-test"}));
    let (_, _, free_during) = smi(0);
    let dropped = free_before as f64 - free_during as f64;
    assert!((dropped - (10 * GIB) as f64).abs() < 0.02 * (10 * GIB) as f64, "free fell by {dropped} bytes");
    let (_, rec) = s.call("GET", &format!("/api/memory/allocation/{id}"), None);
    assert_eq!(rec["data"]["memoryType"], "device");
    assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
    assert_eq!(s.call("POST", "/api/memory/operations/clear/cuda:0", None).0, 200);
    let (_, _, free_after) = smi(0);
    assert!(
        (free_after as f64 - free_before as f64).abs() < 0.01 * (10 * GIB) as f64,
        "free {free_before} -> {free_after}"
    );
    // Far more than the card has: 507 with both numbers, nothing allocated.
    assert_error(
        &s.call("POST", "/api/memory/allocations/allocate/cuda:0", Some(&json!({"sizeBytes": 1000 * GIB}).to_string())),
        507,
        "INSUFFICIENT_MEMORY",
        "available",
    );
    assert_eq!(s.call("GET", "/api/memory/allocations/device/cuda:0", None).1["data"]["count"], 0);
}

#[test]
fn host_to_gpu_to_gpu_to_host_round_trip_verifies() {
    let s = start();
    let size = 32 * MIB;
    let data = random_bytes(size as usize, 7);
    let h = alloc(&s, "cpu", json!({"sizeBytes": size, "memoryType": "pinned"}));
    put(&s, &h, &data);
    let d1 = transfer(&s, json!({"sourceAllocationId": h, "targetDeviceId": "cuda:0"}))["destinationAllocationId"]
        .as_str()
        .expect("d1")
        .to_string();
    let d2 = alloc(&s, "cuda:0", json!({"sizeBytes": size}));
    let t = transfer(&s, json!({"sourceAllocationId": d1, "destinationAllocationId": d2}));
    assert_eq!(t["sourceDeviceId"], "cuda:0");
    let back = transfer(&s, json!({"sourceAllocationId": d2, "targetDeviceId": "cpu", "transferType": "move"}))
        ["destinationAllocationId"]
        .as_str()
        .expect("back")
        .to_string();
    assert!(get(&s, &back, 0, size) == data, "H2D -> D2D -> D2H returned other bytes");
    // Device memory also reads and writes directly, bounds-checked.
    assert!(get(&s, &d1, size - 4096, 4096) == data[(size - 4096) as usize..]);
    assert_error(
        &s.call("GET", &format!("/api/memory/allocations/{d1}/data?offset={size}&length=1"), None),
        400,
        "INVALID_ARGUMENT",
        "offset",
    );
    s.service.validate().expect("ledger matches pools");
}

#[test]
fn large_gpu_transfers_run_in_the_background() {
    let s = start();
    let h = alloc(&s, "cpu", json!({"sizeBytes": GIB, "memoryType": "pinned"}));
    let tail = random_bytes(MIB as usize, 9);
    s.put_data(&h, GIB - MIB, &tail);
    let (status, t) = transfer_with_status(&s, json!({"sourceAllocationId": h, "targetDeviceId": "cuda:0"}));
    assert_eq!(status, 202, "1 GiB is above the synchronous limit");
    assert_eq!(t["bytesDone"], GIB);
    assert!(t["bytesPerSecond"].as_f64().expect("rate") > 10e9, "pinned H2D over 10 GB/s: {t}");
    let d = t["destinationAllocationId"].as_str().expect("d");
    assert!(get(&s, d, GIB - MIB, MIB) == tail);
}

#[test]
fn device_memory_export_is_shared_with_another_process() {
    let s = start();
    let id = alloc(&s, "cuda:0", json!({"sizeBytes": 4 * MIB}));
    let data = random_bytes(4 * MIB as usize, 11);
    put(&s, &id, &data);
    let (status, v) = s.call("POST", &format!("/api/memory/allocations/{id}/export"), None);
    assert_eq!(status, 200, "{v}");
    let e = &v["data"];
    assert_eq!(e["kind"], "cudaIpc");
    assert_eq!(e["deviceId"], "cuda:0");
    let handle = e["ipcHandle"].as_str().expect("handle");
    assert_eq!(handle.len(), 128, "64 bytes in hex");
    let scripts = std::env::var("MEMWARDEN_SCRIPTS")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts").into());
    let out = Command::new("python3")
        .arg(format!("{scripts}/gpu/ipc_peer.py"))
        .args([handle, &e["offset"].to_string(), &e["sizeBytes"].to_string(), "0"])
        .output()
        .expect("python3");
    assert!(out.status.success(), "peer failed: {}", String::from_utf8_lossy(&out.stderr));
    let hex: String = data[..16].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout), hex, "the other process read the daemon's bytes");
    assert_eq!(get(&s, &id, 100, 5), b"HELLO", "the daemon reads what the other process wrote");
    assert!(get(&s, &id, 105, 1000) == data[105..1105], "and nothing else changed");
    let (_, rec) = s.call("GET", &format!("/api/memory/allocation/{id}"), None);
    assert_eq!(rec["data"]["exported"], true);
    assert_eq!(rec["data"]["movable"], false);
}

#[test]
fn multi_gpu_peer_copy_verifies() {
    let s = start();
    let (_, h) = s.call("GET", "/health", None);
    let gpus = h["data"]["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter(|d| d.as_str().is_some_and(|x| x.starts_with("cuda:")))
        .count();
    assert!(gpus >= 2, "this test needs two GPUs, found {gpus}");
    let size = 64 * MIB;
    let data = random_bytes(size as usize, 13);
    let a = alloc(&s, "cuda:0", json!({"sizeBytes": size}));
    put(&s, &a, &data);
    let b = transfer(&s, json!({"sourceAllocationId": a, "targetDeviceId": "cuda:1"}));
    assert_eq!(b["destinationDeviceId"], "cuda:1");
    let b = b["destinationAllocationId"].as_str().expect("b").to_string();
    assert!(get(&s, &b, 0, size) == data, "peer copy cuda:0 -> cuda:1 returned other bytes");
    let c = alloc(&s, "cuda:0", json!({"sizeBytes": size}));
    transfer(&s, json!({"sourceAllocationId": b, "destinationAllocationId": c}));
    assert!(get(&s, &c, 0, size) == data, "peer copy cuda:1 -> cuda:0 returned other bytes");
}

/// The fragmented-pool scenario on a GPU: a capped device pool fails a 32 MiB allocation with
/// 64 MiB free in pieces; defragmentation moves the bytes (all verified), releases a block, the
/// driver's free memory rises by `bytesReleased`, and the allocation then fits.
#[test]
fn gpu_defragmentation_releases_driver_memory() {
    let mut config = Config::default();
    config.pool.block_size_bytes = 64 * MIB;
    config.pool.dedicated_threshold_bytes = 64 * MIB;
    config.pool.max_pool_bytes = 128 * MIB;
    let s = TestServer::start_with(config);
    let ids: Vec<String> = (0..16).map(|_| alloc(&s, "cuda:0", json!({"sizeBytes": 8 * MIB}))).collect();
    for (i, id) in ids.iter().enumerate() {
        put(&s, id, &random_bytes(8 * MIB as usize, 100 + i as u64));
    }
    for id in ids.iter().step_by(2) {
        assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
    }
    assert_error(
        &s.call("POST", "/api/memory/allocations/allocate/cuda:0", Some(&json!({"sizeBytes": 32 * MIB}).to_string())),
        507,
        "INSUFFICIENT_MEMORY",
        "capped",
    );
    let (_, _, free_before) = smi(0);
    let (status, r) = s.call("POST", "/api/memory/operations/defragment/cuda:0", Some(r#"{"strategy": "quick"}"#));
    assert_eq!(status, 200, "{r}");
    let r = &r["data"];
    assert_eq!(r["allocationsMoved"], 4);
    assert_eq!(r["bytesReleased"], 64 * MIB);
    let (_, _, free_after) = smi(0);
    let rose = free_after as i64 - free_before as i64;
    assert!((rose - (64 * MIB) as i64).abs() <= (4 * MIB) as i64, "driver free memory rose by {rose} bytes");
    for (i, id) in ids.iter().enumerate().skip(1).step_by(2) {
        assert!(get(&s, id, 0, 8 * MIB) == random_bytes(8 * MIB as usize, 100 + i as u64), "allocation {i} changed");
    }
    let (status, v) =
        s.call("POST", "/api/memory/allocations/allocate/cuda:0", Some(&json!({"sizeBytes": 32 * MIB}).to_string()));
    assert_eq!(status, 201, "fits after defragmentation: {v}");
    s.service.validate().expect("ledger matches pools");
}

/// Real GPU pressure: an outside process allocates with torch until `cuda:0` crosses a threshold
/// set just above its utilization; the level change arrives on the event stream, and the level
/// drops again once the process lets go.
#[test]
fn gpu_pressure_follows_an_outside_torch_process() {
    use std::io::{BufRead, BufReader};
    let probe = start();
    let (_, st) = probe.call("GET", "/api/memory/pressure/cuda:0", None);
    let total = st["data"]["totalMemory"].as_u64().expect("total");
    let u0 = st["data"]["utilizationPercentage"].as_f64().expect("u") / 100.0;
    drop(probe);
    let mut config = Config::default();
    config.pressure.thresholds.moderate = u0 + 0.05;
    config.pressure.thresholds.high = (u0 + 0.5).min(0.99);
    config.pressure.thresholds.critical = (u0 + 0.55).min(0.995);
    config.pressure.thresholds.hysteresis = 0.02;
    let s = TestServer::start_with(config);
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let url = s.url("/api/memory/events");
    std::thread::spawn(move || {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(std::time::Duration::from_secs(60))).build().into();
        let Ok(resp) = agent.get(&url).call() else { return };
        for line in BufReader::new(resp.into_body().into_reader()).lines().map_while(Result::ok) {
            if let Some(d) = line.strip_prefix("data:") {
                if tx.send(serde_json::from_str(d.trim()).expect("json")).is_err() {
                    return;
                }
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    let take = (0.10 * total as f64) as u64;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sys, torch\nx = torch.empty({take}, dtype=torch.uint8, device='cuda:0')\ntorch.cuda.synchronize()\nprint('held', flush=True)\nsys.stdin.read()\n"
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with torch");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("held");
    assert_eq!(line.trim(), "held");
    let wait = |level: &str| loop {
        let e = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap_or_else(|_| panic!("no {level} event"));
        if e["deviceId"] == "cuda:0" && e["newLevel"] == level {
            return e;
        }
    };
    let e = wait("moderate");
    assert_eq!(e["oldLevel"], "low");
    drop(child.stdin.take());
    child.wait().expect("exit");
    wait("low");
}
