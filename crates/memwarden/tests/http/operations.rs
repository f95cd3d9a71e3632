//! Model loads and defragmentations run in the background (`"async": true`): 202 with the
//! operation and its `Location`, then `GET /api/memory/operations/{id}` until it ends, with the
//! progress shape of a transfer and the synchronous answer as `result`.

use crate::common::{assert_envelope, assert_error, random_bytes, tempdir, write_model, TestServer};
use memwarden::config::Config;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// POSTs `body` to `path`; the 202's operation, after checking its `Location` header.
fn start(s: &TestServer, path: &str, body: Value) -> Value {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut resp =
        agent.post(s.url(path)).header("content-type", "application/json").send(body.to_string()).expect("request");
    let v: Value = resp.body_mut().read_json().expect("json");
    assert_eq!(resp.status().as_u16(), 202, "{v}");
    assert_envelope(&v);
    let op = v["data"].clone();
    let id = op["operationId"].as_str().expect("operationId");
    let location = format!("/api/memory/operations/{id}");
    assert_eq!(resp.headers().get("location").and_then(|h| h.to_str().ok()), Some(location.as_str()));
    assert_eq!(op["location"], location.as_str());
    op
}

/// Reads the operation until it is no longer running; every reading's bytes done never go back.
fn wait(s: &TestServer, op: &Value) -> Value {
    let path = op["location"].as_str().expect("location").to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut done = 0;
    loop {
        let (code, v) = s.call("GET", &path, None);
        assert_eq!(code, 200, "{v}");
        let now = v["data"].clone();
        let bytes = now["bytesDone"].as_u64().expect("bytesDone");
        assert!(bytes >= done, "bytes done went back: {done} -> {now}");
        done = bytes;
        if now["status"] != "running" {
            return now;
        }
        assert!(now["result"].is_null() && now["completedAt"].is_null(), "{now}");
        assert!(Instant::now() < deadline, "still running after 30 s: {now}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 8 MiB blocks, each pool capped at two: sixteen 1 MiB allocations with every other one freed
/// leave 8 MiB free in 1 MiB pieces (as in tests/http/defrag.rs); the live ones hold known bytes.
fn fragmented() -> (TestServer, Vec<String>) {
    let mut config = Config::default();
    config.pool.block_size_bytes = 8 * MIB;
    config.pool.dedicated_threshold_bytes = 8 * MIB;
    config.pool.max_pool_bytes = 16 * MIB;
    let s = TestServer::start_with(config);
    let ids: Vec<String> = (0..16).map(|_| s.alloc_on("cpu", json!({"sizeBytes": MIB}))).collect();
    for id in ids.iter().step_by(2) {
        assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
    }
    let live: Vec<String> = ids.into_iter().skip(1).step_by(2).collect();
    for (i, id) in live.iter().enumerate() {
        s.put_data(id, 0, &random_bytes(MIB as usize, i as u64));
    }
    (s, live)
}

#[test]
fn an_async_defragmentation_answers_202_and_its_operation_ends_with_the_report() {
    let (s, live) = fragmented();
    let op = start(&s, "/api/memory/operations/defragment/cpu", json!({"strategy": "quick", "async": true}));
    assert_eq!((op["kind"].as_str(), op["deviceId"].as_str()), (Some("defragment"), Some("cpu")));
    let done = wait(&s, &op);
    assert_eq!(done["status"], "completed", "{done}");
    let report = &done["result"];
    // The synchronous pass on this layout moves four allocations, 4 MiB (tests/http/defrag.rs).
    assert_eq!((report["allocationsMoved"].as_u64(), report["bytesMoved"].as_u64()), (Some(4), Some(4 * MIB)));
    assert_eq!(report["strategy"], "quick");
    assert_eq!(report["bytesReleased"], 8 * MIB);
    assert_eq!(done["bytesDone"], report["bytesMoved"], "{done}");
    assert_eq!(done["bytesTotal"], report["bytesMoved"], "everything planned was moved: {done}");
    assert_eq!(done["progress"], 1.0);
    assert!(done["bytesPerSecond"].as_f64().expect("rate") > 0.0, "{done}");
    assert!(done["durationMs"].as_f64().expect("ms") > 0.0 && done["completedAt"].is_string(), "{done}");
    assert!(done["error"].is_null() && done["errorCode"].is_null(), "{done}");
    // Every byte survived the moves.
    for (i, id) in live.iter().enumerate() {
        assert!(s.get_data(id, 0, MIB) == random_bytes(MIB as usize, i as u64), "allocation {i} changed");
    }
    s.service.validate().expect("ledger matches pools");

    // Every device: the answer of the route without a device, nothing left to move.
    let all = wait(&s, &start(&s, "/api/memory/operations/defragment", json!({"async": true})));
    assert_eq!((all["status"].as_str(), all["deviceId"].is_null()), (Some("completed"), true), "{all}");
    assert_eq!(all["result"]["devices"][0]["deviceId"], "cpu", "{all}");
    assert_eq!((all["bytesDone"].as_u64(), all["progress"].as_f64()), (Some(0), Some(1.0)), "{all}");
    // Both are listed, oldest first.
    let (code, list) = s.call("GET", "/api/memory/operations", None);
    assert_eq!(code, 200);
    let ids: Vec<&str> = list["data"]["operations"]
        .as_array()
        .expect("operations")
        .iter()
        .filter_map(|o| o["operationId"].as_str())
        .collect();
    assert_eq!(ids, [done["operationId"].as_str().expect("id"), all["operationId"].as_str().expect("id")]);
    // The body is checked before anything starts; without `async` the answer is the report.
    let path = "/api/memory/operations/defragment/cpu";
    assert_error(
        &s.call("POST", path, Some(r#"{"async": true, "strategy": "tidy"}"#)),
        400,
        "INVALID_ARGUMENT",
        "strategy",
    );
    assert_error(&s.call("POST", path, Some(r#"{"async": "yes"}"#)), 400, "INVALID_ARGUMENT", "async");
    assert_error(
        &s.call("POST", "/api/memory/operations/defragment/tpu:9", Some(r#"{"async": true}"#)),
        404,
        "DEVICE_NOT_FOUND",
        "cpu",
    );
    let (code, sync) = s.call("POST", path, Some(r#"{"async": false}"#));
    assert_eq!((code, sync["data"]["deviceId"].as_str()), (200, Some("cpu")), "{sync}");
    let (_, list) = s.call("GET", "/api/memory/operations", None);
    assert_eq!(
        list["data"]["operations"].as_array().expect("operations").len(),
        2,
        "refused and synchronous runs are no operations"
    );
}

#[test]
fn an_async_load_counts_the_bytes_read_and_ends_with_the_held_model() {
    let s = TestServer::start();
    let dir = tempdir("ops-load");
    let (path, bytes) = write_model(&dir, "m", 24);
    let op = start(&s, "/api/memory/models/load", json!({"path": path, "name": "m", "async": true}));
    assert_eq!((op["kind"].as_str(), op["deviceId"].as_str()), (Some("modelLoad"), Some("cpu")));
    let done = wait(&s, &op);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!((done["bytesDone"].as_u64(), done["bytesTotal"].as_u64()), (Some(bytes), Some(bytes)), "{done}");
    assert_eq!(done["progress"], 1.0);
    assert!(done["bytesPerSecond"].as_f64().expect("rate") > 0.0, "{done}");
    let m = &done["result"];
    assert_eq!(
        (m["name"].as_str(), m["state"].as_str(), m["sizeBytes"].as_u64()),
        (Some("m"), Some("resident"), Some(bytes))
    );
    let id = m["modelId"].as_str().expect("modelId");
    let (_, list) = s.call("GET", "/api/memory/models", None);
    assert_eq!(list["data"]["weights"][0]["modelId"], id, "{list}");
    // A second load shares the copy held: nothing is read, so nothing is claimed.
    let again = wait(&s, &start(&s, "/api/memory/models/load", json!({"path": path, "async": true})));
    assert_eq!(again["result"]["modelId"], id, "{again}");
    assert_eq!((again["bytesDone"].as_u64(), again["bytesTotal"].as_u64()), (Some(0), Some(0)), "{again}");
    assert_eq!((again["progress"].as_f64(), again["bytesPerSecond"].as_f64()), (Some(1.0), Some(0.0)), "{again}");
    // Without `async`, the model as before.
    let (code, sync) = s.call("POST", "/api/memory/models/load", Some(&json!({"path": path}).to_string()));
    assert_eq!((code, sync["data"]["modelId"].as_str()), (200, Some(id)), "{sync}");
}

#[test]
fn a_failed_async_load_and_an_unknown_operation() {
    let s = TestServer::start();
    let op = start(&s, "/api/memory/models/load", json!({"path": "/nonexistent/x.safetensors", "async": true}));
    let failed = wait(&s, &op);
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["errorCode"], "FILE_NOT_FOUND", "the synchronous answer's code: {failed}");
    assert!(failed["error"].as_str().expect("error").contains("/nonexistent/x.safetensors: no such file"), "{failed}");
    assert!(failed["result"].is_null() && failed["completedAt"].is_string(), "{failed}");
    assert_eq!((failed["bytesDone"].as_u64(), failed["progress"].as_f64()), (Some(0), Some(0.0)), "{failed}");
    // What can be checked at once still is, before any operation starts.
    let load = |body: Value| s.call("POST", "/api/memory/models/load", Some(&body.to_string()));
    assert_error(&load(json!({"path": "rel.safetensors", "async": true})), 400, "INVALID_ARGUMENT", "absolute");
    assert_error(
        &load(json!({"path": "/m.safetensors", "async": true, "priority": 101})),
        400,
        "INVALID_ARGUMENT",
        "priority",
    );
    assert_error(&load(json!({"path": "/m.safetensors", "async": 1})), 400, "INVALID_ARGUMENT", "async");
    // Unknown ids: 404 with the envelope.
    for id in ["nope", "00000000-0000-0000-0000-000000000000"] {
        assert_error(&s.call("GET", &format!("/api/memory/operations/{id}"), None), 404, "OPERATION_NOT_FOUND", id);
    }
    // The document has the route and the 202 answers.
    let (_, doc) = s.call("GET", "/api/openapi.json", None);
    let get = &doc["paths"]["/api/memory/operations/{operationId}"]["get"]["responses"];
    assert_eq!(
        get["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/ApiResponse_OperationDto"
    );
    assert!(get["404"].is_object(), "{get}");
    for path in
        ["/api/memory/models/load", "/api/memory/operations/defragment", "/api/memory/operations/defragment/{deviceId}"]
    {
        let accepted = &doc["paths"][path]["post"]["responses"]["202"];
        assert_eq!(
            accepted["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/ApiResponse_OperationDto",
            "{path}: {accepted}"
        );
        assert!(accepted["headers"]["Location"].is_object(), "{path}: {accepted}");
    }
}
