//! Model memory on a real GPU (cargo feature `hw-tests`; fails without a GPU, torch or NVML):
//! a supervised torch worker loads real models (built from their configs by
//! `scripts/gpu/make_torch_models.py`, saved as .safetensors) onto `cuda:0` through the API;
//! the reported bytes must agree with torch's `memory_allocated` deltas and with NVML's
//! per-process figure, the difference (the CUDA context, the caching allocator's rounding)
//! showing as `unattributedBytes`; unloading returns the bytes to the driver.
#![cfg(feature = "hw-tests")]

mod common;

use common::TestServer;
use memwarden::config::{Config, WorkerSpec};
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: i64 = 1 << 20;

fn scripts() -> String {
    std::env::var("MEMWARDEN_SCRIPTS").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts").into())
}

fn make_models(dir: &std::path::Path) -> Vec<Value> {
    let out = Command::new("python3")
        .arg(format!("{}/gpu/make_torch_models.py", scripts()))
        .arg(dir)
        .output()
        .expect("python3");
    assert!(out.status.success(), "make_torch_models failed: {}", String::from_utf8_lossy(&out.stderr));
    let manifest: Value = serde_json::from_slice(&out.stdout).expect("manifest");
    let models = manifest.as_array().expect("list").clone();
    assert!(models.len() >= 2, "{manifest}");
    models
}

fn worker_row(s: &TestServer) -> Value {
    let (code, body) = s.call("GET", "/api/memory/models", None);
    assert_eq!(code, 200, "{body}");
    body["data"]["coordinationStatus"]["workers"][0].clone()
}

fn cuda0(row: &Value, field: &str) -> i64 {
    row[field]["cuda:0"].as_i64().unwrap_or(0)
}

#[test]
fn torch_worker_reports_match_torch_and_nvml_on_cuda0() {
    let dir = std::env::temp_dir().join(format!("mw-gpu-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let models = make_models(&dir);
    let mut config = Config::default();
    config.workers.socket = "none".into();
    config.workers.health_interval_ms = 0;
    config.workers.worker = vec![WorkerSpec {
        id: "gpu0".into(),
        devices: vec!["cpu".into(), "cuda:0".into()],
        command: vec![],
        env: Default::default(),
    }];
    let s = TestServer::start_with_workers(config);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, body) = s.call("GET", "/api/memory/models", None);
        if code == 200 && body["data"]["coordinationStatus"]["workers"][0]["state"] == "ready" {
            let devices = &body["data"]["coordinationStatus"]["workers"][0]["devices"];
            assert!(devices.as_array().expect("devices").iter().any(|d| d == "cuda:0"), "torch sees no GPU: {body}");
            break;
        }
        assert!(Instant::now() < deadline, "worker not ready: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut ids = Vec::new();
    let mut total: i64 = 0;
    for m in &models {
        let before = worker_row(&s);
        let t0 = Instant::now();
        let (code, body) = s.call(
            "POST",
            "/api/memory/models/load",
            Some(&json!({"path": m["path"], "name": m["name"], "deviceId": "cuda:0"}).to_string()),
        );
        assert_eq!(code, 200, "{body}");
        let size = body["data"]["sizeBytes"].as_i64().expect("size");
        assert_eq!(size, m["bytes"].as_i64().expect("bytes"), "reported bytes = the file's tensor bytes");
        assert_eq!(body["data"]["backend"], "torch");
        assert_eq!(body["data"]["deviceId"], "cuda:0");
        // Its own MemPool: at least the tensors, plus the allocator's rounding (small tensors
        // share 2 MiB segments, large ones are rounded to 2 MiB / 20 MiB segments).
        let reserved = body["data"]["reservedBytes"].as_i64().expect("reservedBytes of a torch GPU model");
        assert!(reserved >= size && reserved <= size + size / 5 + 64 * MIB, "reserved {reserved}, model {size}");
        total += size;
        ids.push((body["data"]["modelId"].as_str().expect("id").to_string(), size, reserved));
        let after = worker_row(&s);
        // torch.cuda.memory_allocated grew by the model's bytes (each tensor rounded up to 512 B;
        // the first CUDA use also allocates about 1 MiB of torch's own state).
        let alloc_delta = after["allocator"]["cuda:0"]["allocatedBytes"].as_i64().expect("torch allocated")
            - before["allocator"]["cuda:0"]["allocatedBytes"].as_i64().unwrap_or(0);
        let tensors = m["tensors"].as_i64().expect("tensors");
        assert!(
            alloc_delta >= size && alloc_delta <= size + tensors * 512 + 2 * MIB,
            "allocated grew {alloc_delta}, model {size}"
        );
        // NVML's per-process figure covers every model, plus the context and the cache.
        let nvml = cuda0(&after, "processBytes");
        let unattributed = cuda0(&after, "unattributedBytes");
        assert_eq!(nvml - total, unattributed);
        assert!(nvml >= total && unattributed < 2048 * MIB, "NVML {nvml}, models {total}");
        println!(
            "{}: {} MiB (pool {} MiB) in {:.0} ms ({} tensors; {}); torch allocated +{} MiB; NVML process {} MiB; unattributed {} MiB",
            m["name"].as_str().unwrap_or(""),
            size / MIB,
            reserved / MIB,
            t0.elapsed().as_secs_f64() * 1e3,
            tensors,
            m["source"].as_str().unwrap_or(""),
            alloc_delta / MIB,
            nvml / MIB,
            unattributed / MIB
        );
    }
    let (_, listing) = s.call("GET", "/api/memory/models?deviceId=cuda:0", None);
    let mm = &listing["data"]["devices"][0]["modelMemory"];
    assert_eq!(mm["totalModelMemory"].as_i64(), Some(total), "{listing}");
    assert_eq!(mm["loadedModelCount"].as_u64(), Some(models.len() as u64));
    // Unloading gives the bytes back to the driver (the worker empties torch's cache).
    for (id, size, reserved) in ids {
        let (code, body) = s.call("DELETE", &format!("/api/memory/models/{id}"), None);
        assert_eq!(code, 200, "{body}");
        let before = body["data"]["processBytesBefore"].as_i64().expect("before");
        let after = body["data"]["processBytesAfter"].as_i64().expect("after");
        let dropped = before - after;
        // Exactly the model's pool comes back (NVML counts whole 2 MiB pages).
        assert!((dropped - reserved).abs() <= 4 * MIB, "NVML dropped {dropped}, pool {reserved}, model {size}");
        println!(
            "unload {id}: NVML process {} → {} MiB (model {} MiB, its pool {} MiB)",
            before / MIB,
            after / MIB,
            size / MIB,
            reserved / MIB
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
