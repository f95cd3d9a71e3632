//! Analytics, recommendations and `/metrics` over HTTP: a scripted workload (allocations with
//! owners, frees, a fragmenting pattern, a failed allocation, a model load) must show in the
//! analytics exactly as it happened; the recommendations must name the defragmentation it calls
//! for, and applying that action must work; the exposition must parse with the official Python
//! parser (`prometheus_client`) and agree with `/api/memory/status`.

use crate::common::{assert_error, tempdir, write_model, TestServer};
use memwarden::config::Config;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Capped 8 MiB host pools (as in tests/http/defrag.rs), a fast history sampler, and no automatic
/// releases or admission tickets, so every count below is the workload's own.
fn config(tag: &str) -> Config {
    let mut c = Config::default();
    c.pool.block_size_bytes = 8 * MIB;
    c.pool.dedicated_threshold_bytes = 8 * MIB;
    c.pool.max_pool_bytes = 16 * MIB;
    c.analytics.fine_interval_ms = 50;
    c.optimizer.watchdog = false;
    c.optimizer.admission = false;
    c.workers.socket =
        std::env::temp_dir().join(format!("mw-an-{tag}-{}.sock", std::process::id())).display().to_string();
    c.workers.health_interval_ms = 0;
    c
}

/// One supervised worker, `w`, holding models in plain bytes (no numpy or torch needed).
fn bytes_worker() -> memwarden::config::WorkerSpec {
    memwarden::config::WorkerSpec {
        id: "w".into(),
        devices: vec![],
        command: vec![],
        env: [("MEMWARDEN_BACKEND".to_string(), "bytes".to_string())].into(),
    }
}

fn cpu(list: &Value) -> Value {
    list.as_array().expect("devices").iter().find(|d| d["deviceId"] == "cpu").expect("cpu").clone()
}

fn post(s: &TestServer, path: &str, body: Value) -> (u16, Value) {
    s.call("POST", path, Some(&body.to_string()))
}

/// Polls `GET path` until `ok` holds (the sampler adds a point every 50 ms).
fn wait_for(s: &TestServer, path: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = s.call("GET", path, None);
        if code == 200 && ok(&body["data"]) {
            return body["data"].clone();
        }
        assert!(Instant::now() < deadline, "{what}: {code} {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_worker(s: &TestServer) {
    wait_for(s, "/api/memory/models", "worker ready", |d| {
        d["coordinationStatus"]["workers"].as_array().is_some_and(|w| w.iter().any(|w| w["state"] == "ready"))
    });
}

#[test]
fn a_scripted_workload_shows_in_analytics_and_its_defragment_recommendation_applies() {
    let dir = tempdir("analytics");
    let mut c = config("script");
    c.workers.worker = vec![bytes_worker()];
    let s = TestServer::start_with_workers(c);
    wait_worker(&s);

    // bob: three 10 MiB reservations; alice: sixteen 1 MiB allocations filling both blocks,
    // then every other one freed (8 MiB free in 1 MiB pieces), then a 4 MiB allocation fails.
    for _ in 0..3 {
        s.alloc_on("cpu", json!({"sizeBytes": 10 * MIB, "memoryType": "reservation", "owner": "bob", "purpose": "kv"}));
    }
    let alice: Vec<String> =
        (0..16).map(|_| s.alloc_on("cpu", json!({"sizeBytes": MIB, "owner": "alice", "purpose": "weights"}))).collect();
    for id in alice.iter().step_by(2) {
        assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
    }
    assert_error(
        &post(&s, "/api/memory/allocations/allocate/cpu", json!({"sizeBytes": 4 * MIB, "owner": "carol"})),
        507,
        "INSUFFICIENT_MEMORY",
        "",
    );
    let (path, model_bytes) = write_model(&dir, "tiny", 16);
    let (code, loaded) = post(&s, "/api/memory/models/load", json!({"path": path, "name": "tiny", "heldBy": "worker"}));
    assert_eq!(code, 200, "{loaded}");
    let model_id = loaded["data"]["modelId"].as_str().expect("id").to_string();

    // Wait for a history point taken after the model appeared.
    let a = wait_for(&s, "/api/memory/analytics?window=10m", "model in the history", |d| {
        d["topModels"].as_array().is_some_and(|m| m.iter().any(|m| m["modelId"] == model_id.as_str()))
            && cpu(&d["devices"])["modelBytes"] == model_bytes
    });
    assert_eq!(a["recording"], true);
    assert_eq!(a["eventLog"]["coversWindow"], true);
    let d = cpu(&a["devices"]);
    let act = &d["activity"];
    // The three reservations count as allocations made, but commit no memory: no bytes figure
    // counts them (issue 15).
    assert_eq!(act["allocations"], 19, "{act}");
    assert_eq!(act["allocatedBytes"], 16 * MIB);
    assert_eq!(act["frees"], 8);
    assert_eq!(act["freedBytes"], 8 * MIB);
    assert_eq!(act["failedAllocations"], 1);
    assert_eq!(act["averageAllocationSizeBytes"], MIB);
    // Peak of memwarden's live bytes: 16 MiB, before the frees; now 8 MiB.
    assert_eq!(d["peakAllocated"]["valueBytes"], 16 * MIB);
    assert_eq!(d["poolAllocatedBytes"], 8 * MIB);
    assert_eq!(d["reservationBytes"], 30 * MIB);
    assert!(d["samples"].as_u64().expect("samples") >= 1);
    assert!(d["usagePercentiles"]["p50Bytes"].as_u64().expect("p50") > 0);
    assert!(d["fragmentation"].as_f64().expect("frag") > 0.8);
    let hist: Vec<(u64, u64)> = d["sizeHistogram"]
        .as_array()
        .expect("histogram")
        .iter()
        .map(|b| (b["minBytes"].as_u64().expect("min"), b["count"].as_u64().expect("count")))
        .collect();
    assert_eq!(hist, vec![(MIB, 16)], "reservations allocate nothing");
    let owners: Vec<(String, u64, u64, u64)> = a["topOwners"]
        .as_array()
        .expect("owners")
        .iter()
        .map(|o| {
            let n = |k: &str| o[k].as_u64().expect(k);
            (o["name"].as_str().expect("name").to_string(), n("liveBytes"), n("liveCount"), n("allocationsInWindow"))
        })
        .collect();
    assert_eq!(owners[0], ("alice".into(), 8 * MIB, 8, 16));
    assert_eq!(owners[1], ("bob".into(), 0, 3, 3), "reservations: counted, no bytes");
    assert_eq!(a["topPurposes"][0]["name"], "weights");
    assert_eq!(
        (a["topPurposes"][1]["name"].as_str(), a["topPurposes"][1]["liveCount"].as_u64()),
        (Some("kv"), Some(3))
    );
    let model = a["topModels"].as_array().expect("models").iter().find(|m| m["modelId"] == model_id.as_str()).cloned();
    let model = model.expect("model");
    assert_eq!(model["currentBytes"], model_bytes);
    assert_eq!(model["peakBytesInWindow"], model_bytes);
    assert_eq!(model["workerId"], "w");

    // Usage (the seed's fields) agrees.
    let (code, u) = s.call("GET", "/api/memory/usage/cpu?window=10m", None);
    assert_eq!(code, 200, "{u}");
    let u = &u["data"];
    assert_eq!(u["allocationCount"], 11);
    assert_eq!(u["allocationsInWindow"], 19);
    assert_eq!(u["freesInWindow"], 8);
    assert_eq!(u["allocatedBytes"], 8 * MIB);
    assert_eq!(u["peakAllocatedBytes"], 16 * MIB);
    assert!(u["allocationsPerSecond"].as_f64().expect("rate") > 0.0);

    // The event log holds the workload in order, with owners and purposes.
    let (_, ev) = s.call("GET", "/api/memory/analytics/events?deviceId=cpu&limit=1000", None);
    let ev = ev["data"]["events"].as_array().expect("events").clone();
    assert_eq!(ev.len(), 27);
    assert_eq!((ev[0]["event"].as_str(), ev[0]["owner"].as_str()), (Some("allocated"), Some("bob")));
    assert_eq!((ev[26]["event"].as_str(), ev[26]["purpose"].as_str()), (Some("freed"), Some("weights")));

    // The recommendation: defragment cpu (fragmented, and a 4 MiB allocation failed).
    let (code, r) = s.call("GET", "/api/memory/optimization", None);
    assert_eq!(code, 200, "{r}");
    let recs = r["data"]["recommendations"].as_array().expect("recs").clone();
    let defrag = recs.iter().find(|r| r["type"] == "defragment").unwrap_or_else(|| panic!("no defragment in {r}"));
    assert_eq!(defrag["deviceId"], "cpu");
    assert_eq!(defrag["evidence"]["failedAllocationBytes"], 4 * MIB);
    assert_eq!(defrag["evidence"]["freeInPoolBytes"], 8 * MIB);
    assert_eq!(defrag["estimatedSavingsBytes"], 7 * MIB);
    assert_eq!(defrag["action"]["path"], "/api/memory/operations/defragment/cpu");
    assert!(recs.iter().all(|r| r["type"] != "unloadIdleModels"), "no pressure, no unload advice: {r}");

    // Applying it: the exact request, then the 4 MiB allocation fits.
    let action = &defrag["action"];
    let (code, done) = s.call(
        action["method"].as_str().expect("method"),
        action["path"].as_str().expect("path"),
        Some(&action["body"].to_string()),
    );
    assert_eq!(code, 200, "{done}");
    let moved = done["data"]["allocationsMoved"].as_u64().expect("moved");
    assert!(moved >= 1 && done["data"]["fragmentationAfter"].as_f64() < Some(0.875), "{done}");
    s.alloc_on("cpu", json!({"sizeBytes": 4 * MIB, "owner": "carol"}));
    let a = wait_for(&s, "/api/memory/analytics?window=10m", "defragmentation recorded", |d| {
        cpu(&d["devices"])["defragmentation"]["runs"] == 1
    });
    let d = cpu(&a["devices"]);
    assert_eq!(d["defragmentation"]["movedBytes"], done["data"]["bytesMoved"]);
    assert_eq!(d["defragmentation"]["releasedBytes"], done["data"]["bytesReleased"]);
    assert_eq!(d["activity"]["moves"], moved);
    let (_, r) = s.call("GET", "/api/memory/optimization", None);
    assert!(
        r["data"]["recommendations"].as_array().expect("recs").iter().all(|r| r["type"] != "defragment"),
        "defragmented: the rule is silent now: {r}"
    );

    // Resetting peaks starts them at the current live bytes (8 + 4 MiB).
    assert_eq!(s.call("POST", "/api/memory/analytics/reset-peaks", None).0, 200);
    let (_, u) = s.call("GET", "/api/memory/usage/cpu", None);
    assert_eq!(u["data"]["peakAllocatedBytes"], 12 * MIB);
}

fn recommendation_types(s: &TestServer) -> Vec<String> {
    let (code, r) = s.call("GET", "/api/memory/optimization", None);
    assert_eq!(code, 200, "{r}");
    r["data"]["recommendations"].as_array().expect("recs").iter().map(|r| r["type"].to_string()).collect()
}

/// Issue 15: the host and pinned pools are separate address spaces. Each with its free space in
/// one range, the device is not fragmented (it showed 0.5 when both were taken as one free
/// space), and a failed allocation does not call for a defragmentation.
#[test]
fn two_unfragmented_pools_make_an_unfragmented_device_and_no_defragment_advice() {
    let mut c = config("two-pools");
    c.pool.block_size_bytes = 4 * MIB;
    c.pool.dedicated_threshold_bytes = 4 * MIB;
    c.pool.max_pool_bytes = 8 * MIB;
    let s = TestServer::start_with(c);
    s.alloc_on("cpu", json!({"sizeBytes": 2 * MIB, "memoryType": "host"}));
    s.alloc_on("cpu", json!({"sizeBytes": 2 * MIB, "memoryType": "pinned"}));
    // Needs an 8 MiB dedicated block next to the 4 MiB one: over the pool cap.
    assert_error(
        &post(&s, "/api/memory/allocations/allocate/cpu", json!({"sizeBytes": 8 * MIB})),
        507,
        "INSUFFICIENT_MEMORY",
        "",
    );
    let (_, st) = s.call("GET", "/api/memory/status/cpu", None);
    let pools = st["data"]["pools"].as_array().expect("pools");
    assert_eq!(pools.len(), 2, "{st}");
    for p in pools {
        assert_eq!((p["freeInPoolBytes"].as_u64(), p["largestFreeBlock"].as_u64()), (Some(2 * MIB), Some(2 * MIB)));
        assert_eq!(p["fragmentation"], 0.0, "{p}");
    }
    assert_eq!(st["data"]["fragmentation"], 0.0, "{st}");
    let d = wait_for(&s, "/api/memory/analytics?window=1m", "a history point", |d| {
        cpu(&d["devices"])["samples"].as_u64() >= Some(1)
    });
    assert_eq!(cpu(&d["devices"])["fragmentation"], 0.0);
    let metrics = ureq::get(&s.url("/metrics")).call().expect("metrics").body_mut().read_to_string().expect("text");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("memwarden_device_fragmentation_ratio{") && l.contains("device=\"cpu\""))
        .expect("fragmentation metric");
    assert!(line.ends_with(" 0.0") || line.ends_with(" 0"), "{line}");
    let types = recommendation_types(&s);
    assert!(types.iter().all(|t| t != "\"defragment\""), "{types:?}");
}

/// Issue 15: a failed request larger than the whole device is no evidence of fragmentation,
/// however fragmented the pools are; one that compaction would make fit is.
#[test]
fn a_failed_request_larger_than_the_device_does_not_call_for_defragmentation() {
    let s = TestServer::start_with(config("huge-failure"));
    let ids: Vec<String> = (0..16).map(|_| s.alloc_on("cpu", json!({"sizeBytes": MIB}))).collect();
    for id in ids.iter().step_by(2) {
        assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
    }
    let (_, st) = s.call("GET", "/api/memory/status/cpu", None);
    assert!(st["data"]["fragmentation"].as_f64().expect("frag") > 0.8, "{st}");
    assert_error(
        &post(&s, "/api/memory/allocations/allocate/cpu", json!({"sizeBytes": 1u64 << 40})),
        507,
        "INSUFFICIENT_MEMORY",
        "",
    );
    let types = recommendation_types(&s);
    assert!(types.iter().all(|t| t != "\"defragment\""), "1 TiB failed: {types:?}");
    assert_error(
        &post(&s, "/api/memory/allocations/allocate/cpu", json!({"sizeBytes": 4 * MIB})),
        507,
        "INSUFFICIENT_MEMORY",
        "",
    );
    let types = recommendation_types(&s);
    assert!(types.iter().any(|t| t == "\"defragment\""), "4 MiB failed: {types:?}");
}

#[test]
fn idle_models_on_a_pressured_device_are_recommended_for_release_and_the_action_releases_them() {
    let dir = tempdir("idle");
    let mut c = config("idle");
    // The host counts as "high" at any real utilization; every model counts as idle at once.
    c.pressure.thresholds.moderate = 0.0001;
    c.pressure.thresholds.high = 0.0002;
    c.pressure.thresholds.critical = 1.0;
    c.pressure.thresholds.hysteresis = 0.0;
    c.analytics.model_idle_secs = 0;
    c.analytics.pinned_fraction = 0.0;
    c.workers.worker = vec![bytes_worker()];
    let s = TestServer::start_with_workers(c);
    wait_worker(&s);
    let mut ids = Vec::new();
    for (name, pinned) in [("idle-a", false), ("keep", true)] {
        let (path, _) = write_model(&dir, name, 8);
        let (code, m) = post(
            &s,
            "/api/memory/models/load",
            json!({"path": path, "name": name, "pinned": pinned, "heldBy": "worker"}),
        );
        assert_eq!(code, 200, "{m}");
        ids.push(m["data"]["modelId"].as_str().expect("id").to_string());
    }
    let r = wait_for(&s, "/api/memory/optimization", "idle-model advice", |d| {
        d["recommendations"].as_array().is_some_and(|r| r.iter().any(|r| r["type"] == "unloadIdleModels"))
    });
    let rec = r["recommendations"].as_array().expect("recs").iter().find(|r| r["type"] == "unloadIdleModels").cloned();
    let rec = rec.expect("rec");
    assert_eq!(rec["deviceId"], "cpu");
    assert_eq!(rec["evidence"]["pressureLevel"], "high");
    assert_eq!(rec["estimatedSavingsBytes"], 8 * MIB, "the pinned model is not offered: {rec}");
    assert_eq!(rec["action"]["body"]["models"], json!([ids[0]]));
    // The pressure report recommends what the advice rules do, with the same thresholds: the
    // idle model's release, and no defragmentation (no allocation failed here).
    let (_, p) = s.call("GET", "/api/memory/pressure/cpu", None);
    assert_eq!(p["data"]["pressureCategory"], "high", "{p}");
    let actions: Vec<&str> =
        p["data"]["recommendedActions"].as_array().expect("actions").iter().filter_map(|a| a.as_str()).collect();
    assert!(
        actions
            .iter()
            .any(|a| a.starts_with("unloadIdleModels: ") && a.ends_with("(POST /api/memory/models/optimize)")),
        "{actions:?}"
    );
    assert!(actions.iter().all(|a| !a.starts_with("defragment")), "{actions:?}");
    let action = &rec["action"];
    let (code, out) = s.call("POST", action["path"].as_str().expect("path"), Some(&action["body"].to_string()));
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["data"]["modelsUnloaded"], json!([ids[0]]), "{out}");
    let (_, models) = s.call("GET", "/api/memory/models", None);
    let listed = models.to_string();
    assert!(!listed.contains(&ids[0]) && listed.contains(&ids[1]), "{listed}");

    // Pinned host memory under pressure: move the largest movable pinned allocation to pageable
    // memory; then the emptied pinned block is cached, and the clear recommendation returns it.
    let pinned = s.alloc_on("cpu", json!({"sizeBytes": MIB, "memoryType": "pinned", "owner": "staging"}));
    let (_, r) = s.call("GET", "/api/memory/optimization", None);
    let recs = r["data"]["recommendations"].as_array().expect("recs").clone();
    let rec = recs.iter().find(|r| r["type"] == "releasePinnedMemory").unwrap_or_else(|| panic!("{r}"));
    assert_eq!(rec["evidence"]["pinnedBytes"], MIB);
    assert_eq!(rec["action"]["body"]["sourceAllocationId"], pinned.as_str());
    let a = &rec["action"];
    let (code, t) = s.call("POST", a["path"].as_str().expect("path"), Some(&a["body"].to_string()));
    assert_eq!(code, 200, "{t}");
    let moved_to = t["data"]["destinationAllocationId"].as_str().expect("destination").to_string();
    let (_, m) = s.call("GET", &format!("/api/memory/allocation/{moved_to}"), None);
    assert_eq!((m["data"]["memoryType"].as_str(), m["data"]["owner"].as_str()), (Some("host"), Some("staging")));
    assert_eq!(s.call("GET", &format!("/api/memory/allocation/{pinned}"), None).0, 404, "the move freed the source");
    let (_, r) = s.call("GET", "/api/memory/optimization", None);
    let recs = r["data"]["recommendations"].as_array().expect("recs").clone();
    assert!(recs.iter().all(|r| r["type"] != "releasePinnedMemory"), "{r}");
    let clear = recs.iter().find(|r| r["type"] == "clearCache").unwrap_or_else(|| panic!("{r}"));
    let empty = clear["estimatedSavingsBytes"].as_u64().expect("bytes");
    assert!(empty >= 8 * MIB, "{clear}");
    let a = &clear["action"];
    let (code, cleared) = s.call("POST", a["path"].as_str().expect("path"), None);
    assert_eq!(code, 200, "{cleared}");
    assert_eq!(cleared["data"]["clearedBytes"], empty, "{cleared}");
    let (_, r) = s.call("GET", "/api/memory/optimization", None);
    assert!(r["data"]["recommendations"].as_array().expect("recs").iter().all(|r| r["type"] != "clearCache"), "{r}");

    // Naming a model that is not on the device is refused before anything runs.
    assert_error(
        &post(&s, "/api/memory/models/optimize", json!({"deviceId": "cpu", "models": ["nope"]})),
        400,
        "INVALID_ARGUMENT",
        "nope",
    );
    // Moving a model to where it is, or to no such device, or a model that does not exist.
    let mv = |id: &str, to: &str| post(&s, &format!("/api/memory/models/{id}/move"), json!({"targetDeviceId": to}));
    assert_error(&mv(&ids[1], "cpu"), 400, "INVALID_ARGUMENT", "already on cpu");
    assert_error(&mv(&ids[1], "tpu:7"), 404, "DEVICE_NOT_FOUND", "tpu:7");
    assert_error(&mv("nope", "cpu"), 404, "MODEL_NOT_FOUND", "nope");
}

#[test]
fn leak_suspects_are_old_allocations_of_gone_idle_or_unnamed_owners() {
    let mut c = config("leaks");
    c.analytics.leak_min_age_secs = 0;
    c.analytics.leak_owner_idle_secs = 3600;
    let s = TestServer::start_with(c);
    // A process that has exited: its pid names a gone owner.
    let mut child = Command::new("true").spawn().expect("spawn true");
    let dead = child.id();
    child.wait().expect("wait");
    let gone = s.alloc_on("cpu", json!({"sizeBytes": MIB, "owner": format!("pid:{dead}")}));
    let anon = s.alloc_on("cpu", json!({"sizeBytes": MIB}));
    s.alloc_on("cpu", json!({"sizeBytes": MIB, "owner": "busy"}));
    s.alloc_on("cpu", json!({"sizeBytes": MIB, "owner": format!("pid:{}", std::process::id())}));
    s.alloc_on("cpu", json!({"sizeBytes": MIB, "persistent": true}));
    let (_, a) = s.call("GET", "/api/memory/analytics?window=1m", None);
    let suspects: Vec<(String, String)> = a["data"]["leakSuspects"]
        .as_array()
        .expect("suspects")
        .iter()
        .map(|l| {
            (l["allocationId"].as_str().expect("id").to_string(), l["reason"].as_str().expect("reason").to_string())
        })
        .collect();
    let mut want = vec![(gone, "ownerGone".to_string()), (anon, "noOwner".to_string())];
    let mut got = suspects.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "a live pid, an active owner and a persistent allocation are not suspects: {a}");
}

#[test]
fn bad_analytics_requests_get_clear_errors() {
    let s = TestServer::start_with(config("bad"));
    assert_error(&s.call("GET", "/api/memory/analytics?window=abc", None), 400, "INVALID_ARGUMENT", "window");
    assert_error(&s.call("GET", "/api/memory/analytics?window=2w", None), 400, "INVALID_ARGUMENT", "unit");
    assert_error(&s.call("GET", "/api/memory/analytics?window=0s", None), 400, "INVALID_ARGUMENT", "longer than 0");
    assert_error(&s.call("GET", "/api/memory/usage?window=2d", None), 400, "INVALID_ARGUMENT", "history keeps");
    assert_error(&s.call("GET", "/api/memory/usage/tpu:9", None), 404, "DEVICE_NOT_FOUND", "tpu:9");
    assert_error(&s.call("GET", "/api/memory/analytics/events?limit=-1", None), 400, "INVALID_ARGUMENT", "limit");
    assert_error(&s.call("GET", "/api/memory/analytics/events?deviceId=x", None), 404, "DEVICE_NOT_FOUND", "x");
    assert_error(&s.call("GET", "/api/memory/analytics/reset-peaks", None), 405, "METHOD_NOT_ALLOWED", "");
    assert_eq!(s.call("GET", "/api/memory/analytics?window=1d", None).0, 200);
}

#[test]
fn with_recording_off_analytics_report_current_state_only() {
    let mut c = config("off");
    c.analytics.enabled = false;
    let s = TestServer::start_with(c);
    s.alloc_on("cpu", json!({"sizeBytes": MIB, "owner": "x"}));
    let (code, a) = s.call("GET", "/api/memory/analytics?window=1m", None);
    assert_eq!(code, 200, "{a}");
    assert_eq!(a["data"]["recording"], false);
    let d = cpu(&a["data"]["devices"]);
    assert_eq!(d["activity"]["allocations"], 0);
    assert_eq!(d["poolAllocatedBytes"], MIB, "current state is still measured");
    assert_eq!(a["data"]["topOwners"][0]["liveBytes"], MIB, "live allocations are still listed");
    let (_, ev) = s.call("GET", "/api/memory/analytics/events", None);
    assert_eq!(ev["data"]["events"], json!([]));
}

/// Parses an exposition with `prometheus_client.parser` (the official Python client) and
/// returns `[name, labels, value]` for every sample. Fails when the parser is missing: CI
/// installs it (`.ci/run`, `scripts/test`).
fn parse_with_prometheus_client(text: &str) -> Vec<(String, Value, f64)> {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([fam.type, s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write as _;
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("parser");
    assert!(
        out.status.success(),
        "the Prometheus parser rejected /metrics (or prometheus_client is not installed: pip install prometheus_client): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    v.into_iter()
        .map(|s| {
            let kind = s[0].as_str().expect("type").to_string();
            let name = s[1].as_str().expect("name").to_string();
            assert!(["gauge", "counter", "histogram"].contains(&kind.as_str()), "{name}: type {kind}");
            (name, s[2].clone(), s[3].as_f64().expect("value"))
        })
        .collect()
}

#[test]
fn metrics_parse_with_the_prometheus_parser_and_agree_with_status() {
    let s = TestServer::start_with(config("metrics"));
    let a = s.alloc_on("cpu", json!({"sizeBytes": 3 * MIB, "owner": "m"}));
    let b = s.alloc_on("cpu", json!({"sizeBytes": MIB}));
    assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{b}"), None).0, 200);
    let _ = a;
    let resp = ureq::get(&s.url("/metrics")).call().expect("scrape");
    assert_eq!(resp.status(), 200);
    let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let text = resp.into_body().read_to_string().expect("body");
    let samples = parse_with_prometheus_client(&text);
    let get = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l[*k] == *v))
            .map(|(_, _, v)| *v)
            .unwrap_or_else(|| panic!("{name} {labels:?} missing from:\n{text}"))
    };
    let (_, st) = s.call("GET", "/api/memory/status/cpu", None);
    let st = &st["data"];
    assert_eq!(get("memwarden_device_total_bytes", &[("device", "cpu")]), st["totalMemory"].as_f64().expect("total"));
    let host_pool = st["pools"].as_array().expect("pools").iter().find(|p| p["memoryType"] == "host").expect("host");
    assert_eq!(
        get("memwarden_pool_allocated_bytes", &[("device", "cpu"), ("memory_type", "host")]),
        host_pool["allocatedBytes"].as_f64().expect("allocated")
    );
    assert_eq!(
        get("memwarden_pool_reserved_bytes", &[("device", "cpu"), ("memory_type", "host")]),
        host_pool["reservedBytes"].as_f64().expect("reserved")
    );
    // Used and available come from one OS reading per scrape (they sum to the total); the
    // machine's use moves between the scrape and the status read (other tests run alongside),
    // so those two are only compared loosely.
    let used = get("memwarden_device_used_bytes", &[("device", "cpu")]);
    let available = get("memwarden_device_available_bytes", &[("device", "cpu")]);
    assert_eq!(used + available, st["totalMemory"].as_f64().expect("total"));
    assert!((used - st["usedMemory"].as_f64().expect("used")).abs() < 4096.0 * MIB as f64, "{used} vs {st}");
    assert_eq!(get("memwarden_device_healthy", &[("device", "cpu")]), 1.0);
    assert_eq!(get("memwarden_allocations_total", &[("device", "cpu")]), 2.0);
    assert_eq!(get("memwarden_frees_total", &[("device", "cpu")]), 1.0);
    assert_eq!(get("memwarden_allocated_bytes_total", &[("device", "cpu")]), (4 * MIB) as f64);
    let level = get("memwarden_device_pressure_level", &[("device", "cpu")]);
    let (_, p) = s.call("GET", "/api/memory/pressure/cpu", None);
    let names = ["low", "moderate", "high", "critical"];
    assert_eq!(names[level as usize], p["data"]["pressureCategory"].as_str().expect("category"));
    assert_eq!(get("memwarden_device_pressure", &[("device", "cpu"), ("level", names[level as usize])]), 1.0);
    // Request latencies: the scrape sees the requests made before it, by route template.
    assert!(
        get(
            "memwarden_http_request_duration_seconds_count",
            &[("route", "/api/memory/allocations/allocate/{device_id}")]
        ) >= 2.0
    );
    // Every family is memwarden's, counters end in _total, byte figures in _bytes.
    for (name, _, _) in &samples {
        assert!(name.starts_with("memwarden_"), "{name}");
    }
    for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts[3] == "counter" {
            assert!(parts[2].ends_with("_total"), "{line}");
        }
    }
}

#[test]
fn metrics_need_the_token_when_one_is_configured() {
    let mut c = config("token");
    c.auth_token = Some("s3cret".into());
    let s = TestServer::start_with(c);
    assert_error(&s.call("GET", "/metrics", None), 401, "UNAUTHORIZED", "token");
    let scrape = ureq::get(&s.url("/metrics")).header("authorization", "Bearer s3cret").call().expect("scrape");
    assert_eq!(scrape.status(), 200);
}
