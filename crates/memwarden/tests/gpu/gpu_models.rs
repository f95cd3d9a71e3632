//! Model memory on a real GPU (cargo feature `hw-tests`; fails without a GPU, torch or NVML):
//! a supervised torch worker loads real models (built from their configs by
//! `scripts/gpu/make_torch_models.py`, saved as .safetensors) onto `cuda:0` through the API;
//! the reported bytes must agree with torch's `memory_allocated` deltas and with NVML's
//! per-process figure, the difference (the CUDA context, the caching allocator's rounding)
//! showing as `unattributedBytes`; unloading returns the bytes to the driver.
#![cfg(feature = "hw-tests")]

use crate::common::TestServer;
use memwarden::config::{Config, WorkerSpec};
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: i64 = 1 << 20;

fn scripts() -> String {
    std::env::var("MEMWARDEN_SCRIPTS").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts").into())
}

fn make_models(dir: &std::path::Path) -> Vec<Value> {
    make_models_of(dir, "default")
}

fn make_models_of(dir: &std::path::Path, which: &str) -> Vec<Value> {
    let out = Command::new("python3")
        .arg(format!("{}/gpu/make_torch_models.py", scripts()))
        .arg(dir)
        .arg(which)
        .output()
        .expect("python3");
    assert!(out.status.success(), "make_torch_models failed: {}", String::from_utf8_lossy(&out.stderr));
    let manifest: Value = serde_json::from_slice(&out.stdout).expect("manifest");
    manifest.as_array().expect("list").clone()
}

fn gpu_workers(ids: &[&str]) -> Config {
    let mut config = Config::default();
    config.workers.socket = "none".into();
    config.workers.health_interval_ms = 0;
    config.workers.worker = ids
        .iter()
        .map(|id| WorkerSpec {
            id: id.to_string(),
            devices: vec!["cpu".into(), "cuda:0".into()],
            command: vec![],
            env: Default::default(),
        })
        .collect();
    config
}

fn wait_workers(s: &TestServer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, body) = s.call("GET", "/api/memory/models", None);
        let ready = body["data"]["coordinationStatus"]["workers"]
            .as_array()
            .map(|ws| ws.iter().filter(|w| w["state"] == "ready").count())
            .unwrap_or(0);
        if code == 200 && ready == n {
            return;
        }
        assert!(Instant::now() < deadline, "workers not ready: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Loads `path` on cuda:0 through the API; returns (model id, worker id, reserved bytes).
fn load_gpu(s: &TestServer, path: &Value, name: &str, priority: u8, pinned: bool) -> (String, String, i64) {
    let (code, body) = s.call(
        "POST",
        "/api/memory/models/load",
        Some(
            &json!({"path": path, "name": name, "deviceId": "cuda:0", "priority": priority, "pinned": pinned, "heldBy": "worker"})
                .to_string(),
        ),
    );
    assert_eq!(code, 200, "{body}");
    let d = &body["data"];
    (
        d["modelId"].as_str().expect("id").to_string(),
        d["workerId"].as_str().expect("worker").to_string(),
        d["reservedBytes"].as_i64().expect("reserved"),
    )
}

fn gpu_free(s: &TestServer) -> i64 {
    let (_, st) = s.call("GET", "/api/memory/status/cuda:0", None);
    st["data"]["availableMemory"].as_i64().expect("available")
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
    assert!(models.len() >= 2);
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
            Some(&json!({"path": m["path"], "name": m["name"], "deviceId": "cuda:0", "heldBy": "worker"}).to_string()),
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

/// Issue 7 on the GPU: torch models in two worker processes on cuda:0; an outside process fills
/// the GPU past `critical`; the watchdog runs the aggressive ladder and frees enough that the
/// outside process's next allocation, which did not fit, succeeds. NVML confirms the bytes.
#[test]
fn watchdog_frees_torch_models_so_an_outside_allocation_succeeds() {
    let dir = std::env::temp_dir().join(format!("mw-gpu-watchdog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut models = make_models(&dir);
    models.extend(make_models_of(&dir, "large"));
    let by_name = |n: &str| models.iter().find(|m| m["name"] == n).unwrap_or_else(|| panic!("no {n}"))["path"].clone();
    let config = gpu_workers(&["gpu-a", "gpu-b"]);
    let s = TestServer::start_with_workers(config);
    wait_workers(&s, 2);
    // Two processes: the least loaded worker takes each load.
    let large = load_gpu(&s, &by_name("gpt2-large"), "gpt2-large", 20, false);
    let medium = load_gpu(&s, &by_name("gpt2-medium"), "gpt2-medium", 40, false);
    let pinned = load_gpu(&s, &by_name("bert-base"), "bert-base", 0, true);
    let workers: std::collections::BTreeSet<&str> =
        [&large.1, &medium.1, &pinned.1].iter().map(|w| w.as_str()).collect();
    assert_eq!(workers.len(), 2, "models spread over both workers");
    let extra: i64 = 4 << 30;
    // Fill until 2 GiB are left, whatever the card's size (past `critical` on an 80 GiB H100
    // and a 141 GiB H200 alike), so the extra 4 GiB cannot fit until the watchdog frees models.
    let (_, st) = s.call("GET", "/api/memory/status/cuda:0", None);
    let total = st["data"]["totalMemory"].as_f64().expect("total");
    let fill_to = 1.0 - (2u64 << 30) as f64 / total;
    assert!(fill_to > 0.95, "the fill must pass critical: {fill_to}");
    let hog = crate::common::Hog::fill(fill_to, extra as u64);
    let filled = hog.filled.clone();
    assert!(filled["freeBytes"].as_i64().expect("free") < extra, "the extra allocation must not fit yet: {filled}");
    // Wait for the watchdog's runs to finish (one at `high`, maybe one more at `critical`).
    let deadline = Instant::now() + Duration::from_secs(60);
    let runs = loop {
        std::thread::sleep(Duration::from_millis(500));
        let (_, h) = s.call("GET", "/api/memory/models/optimize/history", None);
        let runs: Vec<Value> = h["data"]["runs"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .filter(|r| r["trigger"] == "watchdog" && r["optimizationTriggered"] == true)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let (_, again) = s.call("GET", "/api/memory/models/optimize/history", None);
        let settled = again["data"]["runs"].as_array().map(Vec::len) == h["data"]["runs"].as_array().map(Vec::len);
        if !runs.is_empty() && settled {
            break runs;
        }
        assert!(Instant::now() < deadline, "the watchdog never ran: {h}");
    };
    let after = hog.try_extra();
    assert_eq!(after["extraAllocated"], true, "outside allocation still failed: {after}; runs {runs:?}");
    let released: Vec<String> = runs
        .iter()
        .flat_map(|r| {
            let mut v: Vec<String> = serde_json::from_value(r["modelsUnloaded"].clone()).unwrap_or_default();
            v.extend(serde_json::from_value::<Vec<String>>(r["modelsOffloaded"].clone()).unwrap_or_default());
            v
        })
        .collect();
    assert!(released.contains(&large.0) && released.contains(&medium.0), "{runs:?}");
    assert!(!released.contains(&pinned.0), "the pinned model stays: {runs:?}");
    let freed: i64 = runs.iter().map(|r| r["memoryFreed"].as_i64().unwrap_or(0)).sum();
    let expected = large.2 + medium.2;
    assert!((freed - expected).abs() <= 64 * MIB, "measured {freed}, the two pools hold {expected}: {runs:?}");
    // When the first pressure event came, and when the memory was back.
    let (_, history) = s.call("GET", "/api/memory/pressure/history", None);
    let first = history["data"]["events"]
        .as_array()
        .and_then(|es| {
            es.iter().find(|e| e["deviceId"] == "cuda:0" && (e["newLevel"] == "high" || e["newLevel"] == "critical"))
        })
        .cloned()
        .unwrap_or(Value::Null);
    let parse = |v: &Value| {
        time::OffsetDateTime::parse(v.as_str().unwrap_or(""), &time::format_description::well_known::Rfc3339).ok()
    };
    let last = runs.last().expect("run");
    let event_to_freed = match (parse(&first["timestamp"]), parse(&last["startedAt"])) {
        (Some(e), Some(r)) => (r - e).as_seconds_f64() * 1e3 + last["optimizationTimeMs"].as_f64().unwrap_or(0.0),
        _ => f64::NAN,
    };
    for r in &runs {
        let steps: Vec<String> = r["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|st| st["action"] == "unload" || st["action"] == "offload")
            .map(|st| {
                format!(
                    "{} {} {:.0} ms ({} MiB measured, {} claimed)",
                    st["action"].as_str().unwrap_or(""),
                    st["target"].as_str().unwrap_or(""),
                    st["durationMs"].as_f64().unwrap_or(0.0),
                    st["measuredBytes"].as_i64().unwrap_or(0) / MIB,
                    st["claimedBytes"].as_i64().unwrap_or(0) / MIB
                )
            })
            .collect();
        println!(
            "watchdog run ({}, from {}): {:.0} ms, freed {} MiB measured: {}",
            r["optimizationStrategy"].as_str().unwrap_or(""),
            r["previousPressureLevel"],
            r["optimizationTimeMs"].as_f64().unwrap_or(0.0),
            r["memoryFreed"].as_i64().unwrap_or(0) / MIB,
            steps.join("; ")
        );
    }
    println!(
        "first pressure event ({} at {}) → memory freed: {event_to_freed:.0} ms; models {} + {} MiB; the outside process's extra {} GiB then fit (free before {} MiB)",
        first["newLevel"].as_str().unwrap_or(""),
        first["timestamp"].as_str().unwrap_or(""),
        large.2 / MIB,
        medium.2 / MIB,
        extra >> 30,
        filled["freeBytes"].as_i64().unwrap_or(0) / MIB,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Admission on the GPU, where the driver's numbers are exact: with a reservation leaving room
/// for two models, the third load makes room by unloading the least valuable model; a load that
/// cannot fit even with everything released is refused with 507 and nothing is unloaded.
#[test]
fn admission_makes_room_on_the_gpu_or_refuses_without_unloading() {
    let dir = std::env::temp_dir().join(format!("mw-gpu-admission-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let models = make_models(&dir);
    let medium = models.iter().find(|m| m["name"] == "gpt2-medium").expect("gpt2-medium")["path"].clone();
    let mut config = gpu_workers(&["gpu-a"]);
    config.optimizer.watchdog = false;
    let s = TestServer::start_with_workers(config);
    wait_workers(&s, 1);
    // Warm up: the worker's CUDA context (about 500 MiB) is not model memory.
    let (warm, _, _) = load_gpu(&s, &medium, "warm", 50, false);
    assert_eq!(s.call("DELETE", &format!("/api/memory/models/{warm}"), None).0, 200);
    // Hopeless: with 100 MiB of budget and nothing loaded, a 1.5 GiB model is refused at once.
    let hold = |bytes: i64| {
        let (code, r) = s.call(
            "POST",
            "/api/memory/allocations/allocate/cuda:0",
            Some(&json!({"sizeBytes": bytes, "memoryType": "reservation", "owner": "test"}).to_string()),
        );
        assert_eq!(code, 201, "{r}");
        r["data"]["allocationId"].as_str().expect("id").to_string()
    };
    let r1 = hold(gpu_free(&s) - 100 * MIB);
    let (code, body) = s.call(
        "POST",
        "/api/memory/models/load",
        Some(&json!({"path": medium, "deviceId": "cuda:0", "heldBy": "worker"}).to_string()),
    );
    assert_eq!((code, body["error"]["code"].as_str()), (507, Some("INSUFFICIENT_MEMORY")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("nothing was unloaded"), "{body}");
    assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{r1}"), None).0, 200);
    // Leave 4000 MiB of budget: gpt2-medium takes 1554 MiB (admitted at 1690), so two fit and
    // the third only after one is gone.
    hold(gpu_free(&s) - 4000 * MIB);
    let free_before = gpu_free(&s);
    let a = load_gpu(&s, &medium, "a", 10, false);
    let b = load_gpu(&s, &medium, "b", 90, false);
    let c = load_gpu(&s, &medium, "c", 50, false);
    let run = s.admission_run();
    // Balanced: offloaded to the CPU (the host has room) or unloaded; either frees its pool.
    let mut released: Vec<String> = serde_json::from_value(run["modelsUnloaded"].clone()).expect("list");
    released.extend(serde_json::from_value::<Vec<String>>(run["modelsOffloaded"].clone()).expect("list"));
    assert_eq!(released, std::slice::from_ref(&a.0), "{run}");
    let freed = run["memoryFreed"].as_i64().expect("freed");
    assert!((freed - a.2).abs() <= 4 * MIB, "measured {freed}, a's pool {}", a.2);
    let (_, listing) = s.call("GET", "/api/memory/models?deviceId=cuda:0", None);
    let mut ids: Vec<String> = listing["data"]["devices"][0]["modelMemory"]["loadedModels"]
        .as_array()
        .expect("models")
        .iter()
        .map(|m| m["modelId"].as_str().unwrap_or("").to_string())
        .collect();
    ids.sort();
    let mut expect = vec![b.0.clone(), c.0.clone()];
    expect.sort();
    assert_eq!(ids, expect);
    // The driver agrees: two models' pools are in use, not three.
    let used = free_before - gpu_free(&s);
    assert!((used - b.2 - c.2).abs() <= 64 * MIB, "driver shows {used} used, pools {} + {}", b.2, c.2);
    println!(
        "admission: a released (offloaded or unloaded) to admit c in {:.0} ms: {}",
        run["optimizationTimeMs"].as_f64().unwrap_or(0.0),
        run["message"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
