//! The API as a contract (issue 15): what the OpenAPI document promises, what malformed and
//! oversized bodies get, the seed's clients' spellings, and the answers that name things right.

mod common;

use common::{assert_envelope, assert_error, TestServer};
use memwarden::config::Config;
use serde_json::{json, Value};

fn openapi(s: &TestServer) -> Value {
    let (code, doc) = s.call("GET", "/api/openapi.json", None);
    assert_eq!(code, 200);
    doc
}

/// The schema a `$ref` points at.
fn schema<'a>(doc: &'a Value, reference: &Value) -> &'a Value {
    let name = reference.as_str().and_then(|r| r.strip_prefix("#/components/schemas/")).expect("a schema $ref");
    &doc["components"]["schemas"][name]
}

#[test]
fn the_document_shows_what_the_routes_answer() {
    let s = TestServer::start();
    let doc = openapi(&s);
    // The defragmentation answer is documented with its own fields (a second `DefragDto` once
    // replaced it with analytics' window figures).
    let ok = &doc["paths"]["/api/memory/operations/defragment"]["post"]["responses"]["200"];
    let envelope = schema(&doc, &ok["content"]["application/json"]["schema"]["$ref"]);
    let data = &envelope["properties"]["data"];
    for field in ["bytesMoved", "bytesReleased", "devices"] {
        assert!(data["properties"][field].is_object(), "{field} in {data}");
    }
    let run = schema(&doc, &data["properties"]["devices"]["items"]["$ref"]);
    for field in ["bytesMoved", "allocationsMoved", "fragmentationAfter"] {
        assert!(run["properties"][field].is_object(), "{field} in {run}");
    }
    for field in ["isSuccess", "message", "correlationId"] {
        assert!(envelope["properties"][field].is_object(), "{field} in {envelope}");
    }
    // Every error answer of every route carries the error envelope; the shared ones are there.
    let mut routes = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("ops") {
            routes += 1;
            let responses = op["responses"].as_object().expect("responses");
            for (status, r) in responses {
                if !status.starts_with('2') {
                    assert_eq!(
                        r["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/ErrorResponse",
                        "{method} {path} {status}"
                    );
                }
            }
            if path.starts_with("/api/") {
                assert!(responses.contains_key("401"), "{method} {path}");
            }
            if path.contains('{') {
                assert!(responses.contains_key("404"), "{method} {path}");
            }
            if method == "post" || method == "put" {
                assert!(responses.contains_key("413") && responses.contains_key("400"), "{method} {path}");
            }
        }
    }
    assert!(routes > 40, "{routes} operations");
    // AllocateBody requires a size under either name; TransferBody its source and a destination.
    let allocate = &doc["components"]["schemas"]["AllocateBody"];
    assert_eq!(
        allocate["allOf"][1]["anyOf"],
        json!([{"type": "object", "required": ["sizeBytes"]}, {"type": "object", "required": ["size"]}]),
        "{allocate}"
    );
    assert!(allocate["allOf"][0]["properties"]["size"].is_object(), "{allocate}");
    let pattern = allocate["allOf"][0]["properties"]["memoryType"]["pattern"].as_str().expect("memoryType pattern");
    assert!(pattern.contains("[vV][rR][aA][mM]") && pattern.contains("[hH][oO][sS][tT]"), "{pattern}");
    let transfer = &doc["components"]["schemas"]["TransferBody"];
    assert_eq!(transfer["allOf"][0]["required"], json!(["sourceAllocationId"]), "{transfer}");
    // Device ids in the path are documented with their accepted spellings.
    let status = &doc["paths"]["/api/memory/status/{deviceId}"]["get"]["parameters"][0];
    assert!(status["schema"]["pattern"].as_str().expect("pattern").contains("[gG][pP][uU]"), "{status}");
}

#[test]
fn bodies_must_be_objects_of_the_documented_fields() {
    let s = TestServer::start();
    for (method, path, body, says) in [
        ("POST", "/api/memory/operations/defragment", "[null, null]", "must be a JSON object, not an array"),
        ("POST", "/api/memory/operations/defragment/cpu", "\"u\"", "must be a JSON object, not a string"),
        ("POST", "/api/memory/operations/clear", "not json", "not valid JSON"),
        ("POST", "/api/memory/operations/clear/cpu", r#"{"force": true}"#, "unknown field `force`"),
        (
            "POST",
            "/api/memory/allocations/allocate/cpu",
            "[4096, null, null, null, null, null, null, null]",
            "not an array",
        ),
        (
            "POST",
            "/api/memory/allocations/allocate/cpu",
            r#"{"sizeBytes": 100000000000000000000}"#,
            "is not an integer from",
        ),
        ("POST", "/api/memory/analytics/reset-peaks", "[]", "not an array"),
    ] {
        let r = s.call(method, path, Some(body));
        assert_error(&r, 400, "INVALID_ARGUMENT", says);
        let message = r.1["error"]["message"].as_str().unwrap_or_default();
        for internal in ["struct", "Body", "u64", "floating point"] {
            assert!(!message.contains(internal), "{path} {body}: {message}");
        }
    }
    // Nothing was done: no allocation, no defragmentation run.
    assert_eq!(s.call("GET", "/api/memory/allocations", None).1["data"]["count"], 0);
    // Empty bodies and `{}` stay fine where the body is optional.
    assert_eq!(s.call("POST", "/api/memory/operations/clear", None).0, 200);
    assert_eq!(s.call("POST", "/api/memory/operations/clear", Some("{}")).0, 200);
    assert_eq!(s.call("POST", "/api/memory/operations/defragment/cpu", None).0, 200);
}

#[test]
fn oversized_bodies_get_413_with_the_configured_limit() {
    let mut c = Config::default();
    c.api.max_body_bytes = 4096;
    let s = TestServer::start_with(c);
    let big = format!(r#"{{"sizeBytes": 4096, "purpose": "{}"}}"#, "x".repeat(8192));
    assert_error(
        &s.call("POST", "/api/memory/allocations/allocate/cpu", Some(&big)),
        413,
        "PAYLOAD_TOO_LARGE",
        "4096 bytes",
    );
    assert_error(
        &s.call("POST", "/api/memory/operations/defragment", Some(&big)),
        413,
        "PAYLOAD_TOO_LARGE",
        "api.max_body_bytes",
    );
    assert_eq!(s.call("GET", "/api/memory/allocations", None).1["data"]["count"], 0, "nothing allocated");
    // The data route has its own, larger limit: 8 KiB of bytes are fine there.
    let id = s.alloc_on("cpu", json!({"sizeBytes": 8192}));
    s.put_data(&id, 0, &[7u8; 8192]);
    assert_eq!(s.get_data(&id, 0, 8192), vec![7u8; 8192]);
}

#[test]
fn free_text_fields_are_bounded() {
    let s = TestServer::start();
    for field in ["purpose", "owner"] {
        let body = json!({"sizeBytes": 4096, field: "p".repeat(257)}).to_string();
        assert_error(
            &s.call("POST", "/api/memory/allocations/allocate/cpu", Some(&body)),
            400,
            "INVALID_ARGUMENT",
            field,
        );
    }
    let body = json!({"sizeBytes": 4096, "purpose": "é".repeat(256)}).to_string();
    assert_eq!(s.call("POST", "/api/memory/allocations/allocate/cpu", Some(&body)).0, 201, "256 characters are fine");
}

#[test]
fn seed_clients_are_served_with_their_own_spellings() {
    let s = TestServer::start();
    // The seed's ASP.NET client: PascalCase fields, `Size`, `MemoryType: "RAM"`, no device id.
    let (code, r) = s.call(
        "POST",
        "/api/memory/allocations/allocate",
        Some(r#"{"Size": 65536, "MemoryType": "RAM", "Purpose": "seed", "Owner": "seed-client"}"#),
    );
    assert_eq!(code, 201, "{r}");
    assert_envelope(&r);
    assert_eq!(r["isSuccess"], true);
    let a = &r["data"];
    assert_eq!((a["deviceId"].as_str(), a["memoryType"].as_str()), (Some("cpu"), Some("host")), "{a}");
    assert_eq!((a["sizeBytes"].as_u64(), a["purpose"].as_str()), (Some(65536), Some("seed")), "{a}");
    for (seed, kind) in [("System", "host"), ("CPU", "host")] {
        let body = json!({"sizeBytes": 4096, "memoryType": seed}).to_string();
        let (code, r) = s.call("POST", "/api/memory/allocations/allocate/cpu", Some(&body));
        assert_eq!((code, r["data"]["memoryType"].as_str()), (201, Some(kind)), "{seed}: {r}");
    }
    // GPU memory on a host without a GPU names what is missing.
    let body = json!({"sizeBytes": 4096, "memoryType": "VRAM"}).to_string();
    let (code, r) = s.call("POST", "/api/memory/allocations/allocate", Some(&body));
    assert!(code == 400 || code == 201, "{r}");
    if code == 400 {
        assert!(r["error"]["message"].as_str().unwrap_or_default().contains("device memory"), "{r}");
    }
    // Errors carry the seed's fields too.
    let (code, r) = s.call("DELETE", "/api/memory/allocations/nope", None);
    assert_eq!(code, 404);
    assert_eq!((r["isSuccess"].as_bool(), r["message"].as_str().is_some()), (Some(false), true), "{r}");
}

#[test]
fn a_gpu_id_on_a_host_without_that_backend_says_why() {
    let s = TestServer::start();
    let (_, health) = s.call("GET", "/health", None);
    let cuda = health["data"]["backends"].as_array().expect("backends").iter().find(|b| b["name"] == "cuda").cloned();
    let cuda = cuda.expect("the cuda backend is listed");
    if cuda["available"] == true {
        // A GPU host: the alias names a real device.
        assert_eq!(s.call("GET", "/api/memory/status/gpu_0", None).0, 200);
        return;
    }
    let r = s.call("GET", "/api/memory/status/gpu_0", None);
    assert_error(&r, 503, "BACKEND_UNAVAILABLE", "cuda:0");
    let reason = cuda["reason"].as_str().expect("reason").trim_start_matches("backend unavailable: ").to_string();
    assert!(r.1["error"]["message"].as_str().unwrap_or_default().contains(&reason), "{r:?} lacks {reason}");
    // Another API's id is still not found, by its canonical name.
    assert_error(&s.call("GET", "/api/memory/status/VULKAN-3", None), 404, "DEVICE_NOT_FOUND", "'vulkan:3'");
}

#[test]
fn health_tells_about_the_workers() {
    let s = TestServer::start();
    let (code, h) = s.call("GET", "/health", None);
    assert_eq!(code, 200);
    let w = &h["data"]["workers"];
    assert_eq!((w["enabled"].as_bool(), w["ready"].as_u64()), (Some(false), Some(0)), "{h}");
    assert!(w["reason"].as_str().is_some_and(|r| !r.is_empty()), "{h}");
    assert_eq!(w["workers"], json!([]));
}
