//! Model weights held by memwarden on a real GPU (cargo feature `hw-tests`; fails without one):
//! an 8 GiB model (`MEMWARDEN_WEIGHTS_GIB`) loaded from the page cache into a CUDA VMM
//! allocation on cuda:0, parked to pinned host memory and resumed, through the HTTP API, with
//! the driver's free memory checked at every step and the rates printed for docs/PERFORMANCE.md.
#![cfg(feature = "hw-tests")]

mod common;

use common::{tempdir, write_model, TestServer};
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
    let free4 = available(&s);
    assert!(free4 + GIB / 4 >= free0, "unload returned the memory: {free0} → {free4}");
    drop(s);
    // The same load without hashing, and with 8 threads: where the load's time goes.
    for (threads, hash) in [(16, false), (8, true), (8, false)] {
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
