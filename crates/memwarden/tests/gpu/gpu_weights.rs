//! Model weights held by memwarden on a real GPU (cargo feature `hw-tests`; fails without one):
//! an 8 GiB model (`MEMWARDEN_WEIGHTS_GIB`) loaded from the page cache into a CUDA VMM
//! allocation on cuda:0, parked to pinned host memory and resumed, through the HTTP API, with
//! the driver's free memory checked at every step and the rates printed for docs/PERFORMANCE.md.
#![cfg(feature = "hw-tests")]

use crate::common::{tempdir, write_model, TestServer};
use memwarden::config::Config;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

fn available(s: &TestServer) -> u64 {
    let (code, body) = s.call("GET", "/api/memory/status/cuda:0", None);
    assert_eq!(code, 200, "{body}");
    body["data"]["availableMemory"].as_u64().expect("availableMemory")
}

fn post(s: &TestServer, path: &str) -> (Value, f64) {
    let t = Instant::now();
    let (code, body) = s.call("POST", path, None);
    assert_eq!(code, 200, "{path}: {body}");
    (body["data"].clone(), t.elapsed().as_secs_f64())
}

#[test]
fn an_8_gib_model_loads_parks_and_resumes_at_copy_engine_speed_and_the_driver_sees_each_step() {
    let gib: u64 = std::env::var("MEMWARDEN_WEIGHTS_GIB").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let dir = tempdir("gpu-weights");
    let (path, bytes) = write_model(&dir, "big", gib * 1024);
    // Read it once so it is in the page cache, as the goal says.
    let t = Instant::now();
    let _ = std::fs::read(&path).expect("read");
    println!("page cache fill: {:.2} GB/s (one thread, std::fs::read)", bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
    let mut config = Config::default();
    config.weights.park_pool_bytes = bytes + GIB / 2;
    let s = TestServer::start_with(config);
    // The park pool registers its pinned chunks in the background.
    std::thread::sleep(Duration::from_secs(10));
    let free0 = available(&s);
    let t = Instant::now();
    let (code, body) = s.call(
        "POST",
        "/api/memory/models/load",
        Some(&json!({"path": path, "deviceId": "cuda:0", "name": "big", "keepAliveMs": 0}).to_string()),
    );
    let load_wall = t.elapsed().as_secs_f64();
    assert_eq!(code, 200, "{body}");
    let m = &body["data"];
    let id = m["modelId"].as_str().expect("id").to_string();
    assert_eq!(m["state"], "resident");
    let free1 = available(&s);
    println!(
        "load {gib} GiB → cuda:0: copy {:.2} GB/s ({:.0} ms), request {:.2} GB/s ({:.0} ms)",
        m["load"]["gbPerS"],
        m["load"]["ms"],
        bytes as f64 / load_wall / 1e9,
        load_wall * 1e3
    );
    assert!(free0 - free1 >= bytes * 99 / 100, "the driver lost at least the model's bytes: {free0} → {free1}");
    let mut park_rates = Vec::new();
    let mut resume_rates = Vec::new();
    for round in 0..3 {
        let (p, p_wall) = post(&s, &format!("/api/memory/models/{id}/park"));
        assert_eq!(p["action"], "park");
        assert_eq!(p["model"]["state"], "parked");
        let free2 = available(&s);
        assert!(
            free2 >= free1 + bytes * 99 / 100,
            "round {round}: park gave the device memory back: {free1} → {free2}"
        );
        let (r, r_wall) = post(&s, &format!("/api/memory/models/{id}/resume"));
        assert_eq!(r["action"], "resume");
        assert_eq!(r["model"]["modelId"], id.as_str(), "the id stays");
        assert_eq!(r["model"]["hash"], m["hash"]);
        let free3 = available(&s);
        assert!(free3 + bytes * 99 / 100 <= free2, "round {round}: resume took the memory again: {free2} → {free3}");
        println!("round {round}: park phases {} | resume phases {}", p["phasesMs"], r["phasesMs"]);
        println!(
            "round {round}: park copy {:.2} GB/s ({:.1} ms), request {:.1} ms | resume copy {:.2} GB/s ({:.1} ms), request {:.1} ms",
            p["rate"]["gbPerS"], p["rate"]["ms"], p_wall * 1e3, r["rate"]["gbPerS"], r["rate"]["ms"], r_wall * 1e3
        );
        park_rates.push(bytes as f64 / p_wall / 1e9);
        resume_rates.push(bytes as f64 / r_wall / 1e9);
    }
    park_rates.sort_by(f64::total_cmp);
    resume_rates.sort_by(f64::total_cmp);
    println!(
        "end to end (HTTP request): park median {:.2} GB/s, resume median {:.2} GB/s",
        park_rates[1], resume_rates[1]
    );
    // The goal is ≥ 90 % of the raw pinned rate of the same job (the job prints it beside this);
    // a floor here catches a path that lost pinning or overlap.
    assert!(park_rates[1] > 15.0 && resume_rates[1] > 15.0, "park {park_rates:?} resume {resume_rates:?}");
    let (code, body) = s.call("DELETE", &format!("/api/memory/models/{id}"), None);
    assert_eq!(code, 200, "{body}");
    // The status reading may be a sample taken just before the unload: poll it.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut free4 = available(&s);
    while free4 + GIB / 4 < free0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        free4 = available(&s);
    }
    assert!(free4 + GIB / 4 >= free0, "unload returned the memory: {free0} → {free4}");
    drop(s);
    // The same load without hashing, and with 8 threads: where the load's time goes.
    for (threads, hash) in [(16, false), (24, true), (32, true)] {
        let mut config = Config::default();
        config.weights.hash_on_load = hash;
        config.weights.load_threads = threads;
        let s = TestServer::start_with(config);
        let t = Instant::now();
        let (code, body) = s.call(
            "POST",
            "/api/memory/models/load",
            Some(&json!({"path": path, "deviceId": "cuda:0", "keepAliveMs": 0}).to_string()),
        );
        assert_eq!(code, 200, "{body}");
        println!(
            "load {gib} GiB, {threads} threads, hash {hash}: copy {:.2} GB/s, request {:.0} ms",
            body["data"]["load"]["gbPerS"],
            t.elapsed().as_secs_f64() * 1e3
        );
        let id = body["data"]["modelId"].as_str().expect("id").to_string();
        assert_eq!(s.call("DELETE", &format!("/api/memory/models/{id}"), None).0, 200);
    }
}

/// The worker's `since` and the weights' holders, from one listing.
fn worker_and_holders(s: &TestServer) -> (Value, Value) {
    let (_, body) = s.call("GET", "/api/memory/models", None);
    (body["data"]["coordinationStatus"]["workers"][0].clone(), body["data"]["weights"][0].clone())
}

#[test]
fn a_killed_worker_holding_8_gib_maps_them_again_within_a_second_of_its_hello() {
    let gib: u64 = std::env::var("MEMWARDEN_WEIGHTS_GIB").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let dir = tempdir("gpu-weights-worker");
    let (path, _) = write_model(&dir, "held", gib * 1024);
    let mut config = Config::default();
    config.workers.socket = "none".into();
    config.workers.health_interval_ms = 0;
    config.workers.restart_backoff_ms = 100;
    config.workers.worker = vec![memwarden::config::WorkerSpec {
        id: "gpu0".into(),
        devices: vec!["cpu".into(), "cuda:0".into()],
        command: vec![],
        env: Default::default(),
    }];
    let s = TestServer::start_with_workers(config);
    let deadline = Instant::now() + Duration::from_secs(120);
    while worker_and_holders(&s).0["state"] != "ready" {
        assert!(Instant::now() < deadline, "worker not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = s.call(
        "POST",
        "/api/memory/models/load",
        Some(&json!({"path": path, "deviceId": "cuda:0", "keepAliveMs": 0}).to_string()),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["holders"], json!(["gpu0"]), "the worker maps the weights: {body}");
    let load = body["data"]["load"].clone();
    held_weights_are_not_the_workers_own(&s, body["data"]["sizeBytes"].as_u64().expect("size"));
    let (w, _) = worker_and_holders(&s);
    let pid = w["pid"].as_u64().expect("pid");
    let killed = Instant::now();
    let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
    // Ready again (its hello), then holding the weights again: measured apart.
    let (mut hello_at, mut mapped_at) = (None, None);
    while mapped_at.is_none() {
        let (w, held) = worker_and_holders(&s);
        if hello_at.is_none() && w["state"] == "ready" && w["pid"].as_u64() != Some(pid) {
            hello_at = Some(Instant::now());
        }
        if hello_at.is_some() && held["holders"] == json!(["gpu0"]) && held["state"] == "resident" {
            mapped_at = Some(Instant::now());
            assert_eq!(held["load"], load, "the file was not read again");
        }
        assert!(killed.elapsed() < Duration::from_secs(120), "not re-attached: {held}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (hello_at, mapped_at) = (hello_at.expect("hello"), mapped_at.expect("mapped"));
    let after_hello = mapped_at.duration_since(hello_at);
    println!(
        "kill -9 → restarted worker's hello {:.0} ms → weights mapped {:.0} ms after the hello",
        hello_at.duration_since(killed).as_secs_f64() * 1e3,
        after_hello.as_secs_f64() * 1e3
    );
    assert!(after_hello < Duration::from_secs(1), "{gib} GiB usable in the restarted worker within 1 s of its hello");
}

/// The worker maps the held model but NVML charges it to memwarden, its creator: the worker's
/// own figure is its context, the model counts once (the device's `heldModelMemory`), and
/// `unattributedBytes` is never negative.
fn held_weights_are_not_the_workers_own(s: &TestServer, size: u64) {
    let (code, list) = s.call("GET", "/api/memory/models", None);
    assert_eq!(code, 200, "{list}");
    let w = &list["data"]["coordinationStatus"]["workers"][0];
    assert_eq!(w["mappedBytes"]["cuda:0"], size, "{w}");
    let process = w["processBytes"]["cuda:0"].as_u64().expect("NVML's per-process figure");
    let unattributed = w["unattributedBytes"]["cuda:0"].as_i64().expect("unattributed");
    println!("worker mapping {size} held bytes on cuda:0: processBytes {process}, unattributedBytes {unattributed}");
    assert!(process < size, "the worker's own figure is its context, not the model: {w}");
    assert!(unattributed >= 0, "{w}");
    let dev = list["data"]["devices"].as_array().expect("devices").iter().find(|d| d["deviceId"] == "cuda:0").cloned();
    let m = &dev.expect("cuda:0")["modelMemory"];
    assert_eq!(m["totalModelMemory"], m["heldModelMemory"], "counted once: {m}");
    assert!(m["heldModelMemory"].as_u64().expect("held") >= size, "{m}");
    assert!(m["unattributedBytes"].as_i64().expect("unattributed") >= 0, "{m}");
}

/// The watchdog with park available: an outside process fills cuda:0 past `critical` while an
/// 8 GiB held model is resident; the ladder parks it (its first rung after the caches) and the
/// outside process's next allocation, which did not fit, succeeds. Prints the time from the
/// first pressure event, and from the end of the fill, to the memory being back (goal: 300 ms
/// after the fill). Here with a park pool configured by hand and given time to register.
#[test]
fn the_watchdog_parks_held_weights_so_an_outside_allocation_succeeds() {
    let gib: u64 = std::env::var("MEMWARDEN_WEIGHTS_GIB").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let mut config = Config::default();
    config.weights.park_pool_bytes = (gib << 30) + GIB;
    watchdog_parks_a_held_model(config, Duration::from_secs(8), "configured pool");
}

/// The same with the default config (issue 25's goal: fill → fit ≤ 300 ms): the park pool
/// follows the load in the background; the fill starts as soon as the load has answered.
#[test]
fn with_the_default_config_the_watchdog_parks_held_weights_so_an_outside_allocation_succeeds() {
    watchdog_parks_a_held_model(Config::default(), Duration::ZERO, "default config");
}

fn watchdog_parks_a_held_model(config: Config, settle: Duration, label: &str) {
    let gib: u64 = std::env::var("MEMWARDEN_WEIGHTS_GIB").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let dir = tempdir("gpu-weights-watchdog");
    let (path, _bytes) = write_model(&dir, "parkme", gib * 1024);
    let _ = std::fs::read(&path).expect("read into the page cache");
    let s = TestServer::start_with(config);
    std::thread::sleep(settle); // a configured park pool registers in the background
    let (code, body) = s.call(
        "POST",
        "/api/memory/models/load",
        Some(&json!({"path": path, "deviceId": "cuda:0", "keepAliveMs": 0}).to_string()),
    );
    assert_eq!(code, 200, "{body}");
    let id = body["data"]["modelId"].as_str().expect("id").to_string();
    let extra: u64 = 4 << 30;
    let (_, st) = s.call("GET", "/api/memory/status/cuda:0", None);
    let total = st["data"]["totalMemory"].as_f64().expect("total");
    let fill_to = 1.0 - (2u64 << 30) as f64 / total;
    let hog = crate::common::Hog::fill(fill_to, extra);
    let filled_at = time::OffsetDateTime::now_utc();
    let filled = hog.filled.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let run = loop {
        let (_, h) = s.call("GET", "/api/memory/models/optimize/history", None);
        let parked = h["data"]["runs"].as_array().and_then(|rs| {
            rs.iter().find(|r| r["trigger"] == "watchdog" && r["modelsOffloaded"].to_string().contains(&id)).cloned()
        });
        if let Some(r) = parked {
            break r;
        }
        assert!(Instant::now() < deadline, "the watchdog did not park the model: {h}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let after = hog.try_extra();
    assert_eq!(after["extraAllocated"], true, "the outside allocation still failed: {after}; run {run}");
    let step = run["steps"].as_array().and_then(|ss| ss.iter().find(|st| st["action"] == "park").cloned());
    let step = step.expect("a park step");
    let (_, history) = s.call("GET", "/api/memory/pressure/history", None);
    let first = history["data"]["events"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["deviceId"] == "cuda:0" && e["newLevel"] != "low").cloned())
        .unwrap_or(Value::Null);
    let parse = |v: &Value| {
        time::OffsetDateTime::parse(v.as_str().unwrap_or(""), &time::format_description::well_known::Rfc3339).ok()
    };
    let event_to_freed = match (parse(&first["timestamp"]), parse(&run["startedAt"])) {
        (Some(e), Some(r)) => (r - e).as_seconds_f64() * 1e3 + run["optimizationTimeMs"].as_f64().unwrap_or(0.0),
        _ => f64::NAN,
    };
    let fill_to_freed = parse(&run["startedAt"]).map_or(f64::NAN, |r| {
        (r - filled_at).as_seconds_f64() * 1e3 + run["optimizationTimeMs"].as_f64().unwrap_or(0.0)
    });
    println!(
        "watchdog with park ({label}): fill done → run done {fill_to_freed:.0} ms; first event ({}) → run done {event_to_freed:.0} ms; run {:.0} ms; park step {:.0} ms, {} MiB measured; outside {} GiB fit (free before {} MiB)",
        first["newLevel"].as_str().unwrap_or(""),
        run["optimizationTimeMs"].as_f64().unwrap_or(0.0),
        step["durationMs"].as_f64().unwrap_or(0.0),
        step["measuredBytes"].as_i64().unwrap_or(0) >> 20,
        extra >> 30,
        filled["freeBytes"].as_i64().unwrap_or(0) >> 20,
    );
}

/// The value of the `/metrics` line that starts with `prefix` (0 when absent).
fn metric(s: &TestServer, prefix: &str) -> f64 {
    let text = ureq::get(&s.url("/metrics")).call().expect("metrics").into_body().read_to_string().expect("text");
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn phase(p: &Value, name: &str) -> f64 {
    p["phasesMs"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["phase"] == name))
        .map_or(-1.0, |x| x["ms"].as_f64().unwrap_or(-1.0))
}

/// Issue 25, item 2: with the default config (`park_pool_bytes = 0`) the park pool grows in the
/// background from the moment a load starts, so a park does not page-lock on its path.
#[test]
fn with_the_default_config_the_park_pool_follows_the_loads_and_a_park_runs_at_copy_speed() {
    let gib: u64 = std::env::var("MEMWARDEN_WEIGHTS_GIB").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let dir = tempdir("gpu-weights-pool");
    let (path_a, bytes) = write_model(&dir, "a", gib * 1024);
    let path_b = dir.join("b.safetensors");
    std::fs::hard_link(&path_a, &path_b).expect("hard link");
    let _ = std::fs::read(&path_a).expect("read into the page cache");
    let s = TestServer::start_with(Config::default());
    let load = |path: &std::path::Path| {
        let t = Instant::now();
        let (code, body) = s.call(
            "POST",
            "/api/memory/models/load",
            Some(&json!({"path": path, "deviceId": "cuda:0", "keepAliveMs": 0}).to_string()),
        );
        assert_eq!(code, 200, "{body}");
        println!("load {gib} GiB: request {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
        body["data"]["modelId"].as_str().expect("id").to_string()
    };
    // Right after the daemon starts and loads: park at once.
    let a = load(&path_a);
    let free_at_park = metric(&s, "memwarden_park_pool_bytes{state=\"free\"}");
    let (p, wall) = post(&s, &format!("/api/memory/models/{a}/park"));
    println!(
        "park right after the load: request {:.1} ms, copy {:.1} ms, takePinned {:.1} ms (pool had {:.2} GiB free), \
         chunks on the park path {}",
        wall * 1e3,
        p["rate"]["ms"],
        phase(&p, "takePinned"),
        free_at_park / GIB as f64,
        metric(&s, "memwarden_park_pool_chunks_on_park_path_total")
    );
    // A second model: the pool grows for it in the background; once it has, a park registers
    // nothing on its path.
    let before = metric(&s, "memwarden_park_pool_chunks_on_park_path_total");
    let t = Instant::now();
    let b = load(&path_b);
    let loaded = t.elapsed();
    while metric(&s, "memwarden_park_pool_bytes{state=\"free\"}") < bytes as f64
        && t.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "pool grown to {:.2} GiB free {:.0} ms after the load started (the load took {:.0} ms)",
        metric(&s, "memwarden_park_pool_bytes{state=\"free\"}") / GIB as f64,
        t.elapsed().as_secs_f64() * 1e3,
        loaded.as_secs_f64() * 1e3
    );
    let mut walls = Vec::new();
    for round in 0..3 {
        let (p, wall) = post(&s, &format!("/api/memory/models/{b}/park"));
        println!(
            "round {round}: park request {:.1} ms, copy {:.1} ms, takePinned {:.2} ms, phases {}",
            wall * 1e3,
            p["rate"]["ms"],
            phase(&p, "takePinned"),
            p["phasesMs"]
        );
        walls.push((wall * 1e3, p["rate"]["ms"].as_f64().unwrap_or(0.0)));
        post(&s, &format!("/api/memory/models/{b}/resume"));
    }
    let after = metric(&s, "memwarden_park_pool_chunks_on_park_path_total");
    assert_eq!(after, before, "no park of the grown pool registered on its path");
    for (wall, copy) in &walls {
        assert!(*wall <= copy + 25.0 && *wall <= 200.0, "park {wall:.1} ms end to end, copy {copy:.1} ms: {walls:?}");
    }
    // Unloaded: the pool lets its chunks go.
    for id in [&a, &b] {
        assert_eq!(s.call("DELETE", &format!("/api/memory/models/{id}"), None).0, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&s, "memwarden_park_pool_bytes{state=\"free\"}") > 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(&s, "memwarden_park_pool_bytes{state=\"free\"}"), 0.0, "the pool shrank after the unloads");
}
