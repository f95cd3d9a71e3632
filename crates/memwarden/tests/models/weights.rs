//! Model weights held by memwarden, through the HTTP API on cpu (no GPU needed): load, listing,
//! sharing, drop and reload, unload, and every bad input with its stable code.

use crate::common::{assert_error, tempdir, write_model, TestServer};
use serde_json::json;

fn load(s: &TestServer, body: serde_json::Value) -> (u16, serde_json::Value) {
    s.call("POST", "/api/memory/models/load", Some(&body.to_string()))
}

#[test]
fn a_model_loads_into_memwarden_memory_and_a_second_load_of_the_file_shares_it() {
    let s = TestServer::start();
    let dir = tempdir("weights-http");
    let (path, bytes) = write_model(&dir, "m", 24);
    let (code, body) = load(&s, json!({"path": path, "name": "m"}));
    assert_eq!(code, 200, "{body}");
    let m = &body["data"];
    assert_eq!(m["state"], "resident");
    assert_eq!(m["deviceId"], "cpu");
    assert_eq!(m["sizeBytes"], bytes);
    assert_eq!(m["tensorCount"], 24);
    assert!(m["residentBytes"].as_u64().expect("resident") >= bytes);
    assert!(m["load"]["gbPerS"].as_f64().expect("rate") > 0.0);
    assert_eq!(m["hash"].as_str().expect("hash").len(), 64);
    let id = m["modelId"].as_str().expect("id").to_string();
    let (code, again) = load(&s, json!({"path": path}));
    assert_eq!(code, 200);
    assert_eq!(again["data"]["modelId"], id.as_str(), "the same file is held once");
    // Listed once, with no worker running.
    let (code, list) = s.call("GET", "/api/memory/models", None);
    assert_eq!(code, 200, "{list}");
    let weights = list["data"]["weights"].as_array().expect("weights");
    assert_eq!(weights.len(), 1);
    assert_eq!(weights[0]["modelId"], id.as_str());
    // /metrics shows the held bytes and the holders.
    let metrics = ureq::get(&s.url("/metrics")).call().expect("metrics").into_body().read_to_string().expect("text");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("memwarden_weights_bytes{") && l.contains(&id) && l.contains("memory=\"resident\""))
        .unwrap_or_else(|| panic!("no resident weights line in {metrics}"));
    let value: u64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("value");
    assert!(value >= bytes, "{line}");
    assert!(metrics.contains(&format!("memwarden_weights_holders{{model=\"{id}\"}} 0")), "{metrics}");
    // On cpu a model is resident or dropped: no park.
    let (code, body) = s.call("POST", &format!("/api/memory/models/{id}/park"), None);
    assert_error(&(code, body), 409, "NOT_SUPPORTED", "resident or dropped");
    // Drop keeps the file; resume reads it again (same hash).
    let (code, body) = s.call("POST", &format!("/api/memory/models/{id}/drop"), None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["model"]["state"], "dropped");
    assert_eq!(body["data"]["model"]["residentBytes"], 0);
    let (code, body) = s.call("POST", &format!("/api/memory/models/{id}/resume"), None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["action"], "resume");
    assert_eq!(body["data"]["model"]["state"], "resident");
    assert_eq!(body["data"]["model"]["hash"], m["hash"]);
    let (code, body) = s.call("POST", &format!("/api/memory/models/{id}/resume"), Some("{\"targetDeviceId\": 7}"));
    assert_error(&(code, body), 400, "INVALID_ARGUMENT", "targetDeviceId");
    // Unload frees it; the id is gone.
    let (code, body) = s.call("DELETE", &format!("/api/memory/models/{id}"), None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["workerId"], "memwarden");
    assert!(body["data"]["freedBytes"].as_u64().expect("freed") >= bytes);
    let (code, body) = s.call("POST", &format!("/api/memory/models/{id}/resume"), None);
    assert_error(&(code, body), 404, "MODEL_NOT_FOUND", &id);
}

#[test]
fn bad_files_and_arguments_get_stable_codes_and_allocate_nothing() {
    let s = TestServer::start();
    let dir = tempdir("weights-bad");
    let (path, _) = write_model(&dir, "cut", 4);
    let len = std::fs::metadata(&path).expect("meta").len();
    std::fs::OpenOptions::new().write(true).open(&path).expect("open").set_len(len - 100).expect("truncate");
    let r = load(&s, json!({"path": path}));
    assert_error(&r, 422, "INVALID_MODEL_FILE", "truncated");
    let lying = dir.join("lying.safetensors");
    let header = br#"{"a":{"dtype":"F32","shape":[1000],"data_offsets":[0,8]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 8]);
    std::fs::write(&lying, bytes).expect("write");
    assert_error(&load(&s, json!({"path": lying})), 422, "INVALID_MODEL_FILE", "header");
    assert_error(&load(&s, json!({"path": "/nonexistent/x.safetensors"})), 404, "FILE_NOT_FOUND", "no such file");
    assert_error(&load(&s, json!({"path": "rel.safetensors"})), 400, "INVALID_ARGUMENT", "absolute");
    let (good, _) = write_model(&dir, "good", 1);
    assert_error(&load(&s, json!({"path": good, "heldBy": "gpu-fairy"})), 400, "INVALID_ARGUMENT", "heldBy");
    assert_error(&load(&s, json!({"path": good, "deviceId": "cuda:0"})), 503, "BACKEND_UNAVAILABLE", "cuda:0");
    let (code, list) = s.call("GET", "/api/memory/models", None);
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["data"]["coordinationStatus"]["mode"], "fallback", "no worker runs: {list}");
    assert_eq!(list["data"]["weights"], json!([]), "nothing was loaded: {list}");
    assert_error(&s.call("POST", "/api/memory/models/w-77/park", None), 404, "MODEL_NOT_FOUND", "w-77");
    assert_error(&s.call("POST", "/api/memory/models/w-77/drop", None), 404, "MODEL_NOT_FOUND", "w-77");
}

fn optimize(s: &TestServer, body: serde_json::Value) -> serde_json::Value {
    let (code, r) = s.call("POST", "/api/memory/models/optimize", Some(&body.to_string()));
    assert_eq!(code, 200, "optimize needs no worker: {r}");
    r["data"].clone()
}

/// A cached, empty 64 MiB host block: what the first rung gives back.
fn cache_a_block(s: &TestServer) {
    let id = s.alloc_on("cpu", json!({"sizeBytes": 8 << 20}));
    assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
}

fn skipped(run: &serde_json::Value) -> Vec<String> {
    run["rungsSkipped"]
        .as_array()
        .expect("rungsSkipped")
        .iter()
        .map(|r| r["rung"].as_str().expect("rung").into())
        .collect()
}

fn state_of(s: &TestServer, id: &str) -> String {
    let (_, list) = s.call("GET", "/api/memory/models", None);
    let w = list["data"]["weights"].as_array().expect("weights").iter().find(|w| w["modelId"] == id).cloned();
    w.expect("listed")["state"].as_str().expect("state").into()
}

/// With workers disabled, optimize runs what needs no worker (memwarden's caches, the weights
/// it holds) and names the rungs it left out, instead of 503 WORKER_UNAVAILABLE.
#[test]
fn optimize_with_no_worker_runs_the_rungs_that_need_none_and_names_the_others() {
    let s = TestServer::start();
    let dir = tempdir("optimize-no-worker");
    let (path, bytes) = write_model(&dir, "m", 24);
    let (code, body) = load(&s, json!({"path": path}));
    assert_eq!(code, 200, "{body}");
    let id = body["data"]["modelId"].as_str().expect("id").to_string();

    // Conservative never unloads: the caches go, the held model stays, and the answer says so.
    cache_a_block(&s);
    let run = optimize(&s, json!({"deviceId": "cpu", "strategy": "conservative", "minMemoryToFree": 4 * bytes}));
    assert_eq!(run["optimizationTriggered"], true, "{run}");
    let clear = &run["steps"][0];
    assert_eq!((clear["action"].as_str(), clear["claimedBytes"].as_u64()), (Some("clear"), Some(64 << 20)), "{run}");
    assert_eq!(clear["verified"], true, "memwarden's own blocks going are measured on cpu too: {run}");
    assert_eq!(skipped(&run), ["trimCache", "offload", "unload", "drop"], "{run}");
    let reason = run["rungsSkipped"][0]["reason"].as_str().expect("reason");
    assert!(reason.contains("workers.enabled = false"), "{reason}");
    assert_eq!(state_of(&s, &id), "resident");

    // Balanced: the caches, then the idle held model is dropped (on cpu there is nowhere to park).
    cache_a_block(&s);
    let run = optimize(&s, json!({"deviceId": "cpu", "strategy": "balanced", "minMemoryToFree": 4 * bytes}));
    assert_eq!(skipped(&run), ["trimCache", "offload", "unload"], "{run}");
    let steps = run["steps"].as_array().expect("steps");
    assert_eq!(steps[0]["claimedBytes"], 64 << 20, "{run}");
    let drop = steps.iter().find(|s| s["action"] == "drop" && s["target"] == id.as_str()).expect("a drop step");
    assert!(drop["error"].is_null() && drop["verified"] == true, "{run}");
    assert_eq!(run["modelsUnloaded"], json!([id]), "{run}");
    assert!(run["memoryFreed"].as_u64().expect("freed") >= bytes + (64 << 20), "measured, not claimed: {run}");
    assert_eq!(state_of(&s, &id), "dropped");
    // The issue's request, as sent: no device, no worker.
    let (code, r) = s.call(
        "POST",
        "/api/memory/models/optimize",
        Some(&json!({"targetPressureLevel": 50, "strategy": "balanced"}).to_string()),
    );
    assert_eq!(code, 200, "{r}");
}

/// Reads `/api/memory/events` on a thread: `(event name, data)` per event. Returns once the
/// stream is open (the daemon subscribed before it answered).
fn subscribe(s: &TestServer) -> std::sync::mpsc::Receiver<(String, serde_json::Value)> {
    use std::io::{BufRead, BufReader};
    let (tx, rx) = std::sync::mpsc::channel();
    let (open_tx, open_rx) = std::sync::mpsc::channel();
    let url = s.url("/api/memory/events");
    std::thread::spawn(move || {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(std::time::Duration::from_secs(60))).build().into();
        let Ok(resp) = agent.get(&url).call() else { return };
        let _ = open_tx.send(());
        let mut name = String::new();
        for line in BufReader::new(resp.into_body().into_reader()).lines() {
            let Ok(line) = line else { return };
            if let Some(n) = line.strip_prefix("event:") {
                name = n.trim().to_string();
            } else if let Some(data) = line.strip_prefix("data:") {
                let v: serde_json::Value = serde_json::from_str(data.trim()).expect("event JSON");
                if tx.send((std::mem::take(&mut name), v)).is_err() {
                    return;
                }
            }
        }
    });
    open_rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the event stream opens");
    rx
}

/// The next `modelState` event (others are skipped), within 10 s.
fn next_model_state(rx: &std::sync::mpsc::Receiver<(String, serde_json::Value)>) -> serde_json::Value {
    loop {
        let (name, e) = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("a modelState event within 10 s");
        if name == "modelState" {
            assert_eq!(e["type"], "modelState");
            return e;
        }
    }
}

/// The value of the `/metrics` line that starts with `prefix`.
fn metric(s: &TestServer, prefix: &str) -> u64 {
    let text = ureq::get(&s.url("/metrics")).call().expect("metrics").into_body().read_to_string().expect("text");
    let line = text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in {text}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no value in {line}"))
}

#[test]
fn a_router_sees_each_models_state_its_resume_estimate_and_every_change() {
    let s = TestServer::start();
    let dir = tempdir("weights-residency");
    let events = subscribe(&s);
    let (path, bytes) = write_model(&dir, "routed", 8);
    let (code, body) = load(&s, json!({"path": path, "name": "routed"}));
    assert_eq!(code, 200, "{body}");
    let id = body["data"]["modelId"].as_str().expect("id").to_string();
    assert_eq!(body["data"]["resumeEstimateMs"], 0, "resident: no wait");
    let e = next_model_state(&events);
    assert_eq!((e["modelId"].as_str(), e["state"].as_str()), (Some(id.as_str()), Some("resident")));
    assert_eq!((e["previousState"].clone(), e["bytes"].as_u64()), (serde_json::Value::Null, Some(bytes)));
    assert_eq!((e["name"].as_str(), e["deviceId"].as_str()), (Some("routed"), Some("cpu")));
    assert!(e["at"].as_str().is_some_and(|a| !a.is_empty()));
    let resident = "memwarden_held_model_bytes{device=\"cpu\",state=\"resident\"}";
    let dropped = "memwarden_held_model_bytes{device=\"cpu\",state=\"dropped\"}";
    assert_eq!((metric(&s, resident), metric(&s, dropped)), (bytes, 0));
    assert_eq!(metric(&s, "memwarden_held_models{device=\"cpu\",state=\"resident\"}"), 1);

    let (code, body) = s.call("POST", &format!("/api/memory/models/{id}/drop"), None);
    assert_eq!(code, 200, "{body}");
    let e = next_model_state(&events);
    assert_eq!((e["state"].as_str(), e["previousState"].as_str()), (Some("dropped"), Some("resident")));
    assert!(e["resumeEstimateMs"].as_u64().expect("estimate") >= 1, "{e}");
    let (_, list) = s.call("GET", "/api/memory/models", None);
    let listed = &list["data"]["weights"][0];
    assert_eq!(listed["state"], "dropped");
    assert!(listed["resumeEstimateMs"].as_u64().expect("estimate") >= 1, "a reload takes time: {listed}");
    assert_eq!((metric(&s, resident), metric(&s, dropped)), (0, bytes));
    assert_eq!(metric(&s, "memwarden_held_models{device=\"cpu\",state=\"dropped\"}"), 1);

    let (code, body) = s.call("POST", &format!("/api/memory/models/{id}/resume"), None);
    assert_eq!(code, 200, "{body}");
    let e = next_model_state(&events);
    assert_eq!((e["state"].as_str(), e["previousState"].as_str()), (Some("resident"), Some("dropped")));
    assert_eq!(e["resumeEstimateMs"], 0);
    let (code, body) = s.call("DELETE", &format!("/api/memory/models/{id}"), None);
    assert_eq!(code, 200, "{body}");
    let e = next_model_state(&events);
    assert_eq!((e["state"].as_str(), e["unloaded"].as_bool()), (Some("dropped"), Some(true)));
}
