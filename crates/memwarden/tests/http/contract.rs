//! The API as a contract (issue 15): what the OpenAPI document promises, what malformed and
//! oversized bodies get, the seed's clients' spellings, and the answers that name things right.

use crate::common::{assert_envelope, assert_error, TestServer};
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

/// Issue 22: the document gives body integers as `int64`, so one over `i64::MAX` is refused even
/// where the field is a `u64` (schemathesis' seed 20261201 at 100 examples sent
/// `maxAllocationsToMove: 9223372036854775808` and got 200); `i64::MAX` itself is taken.
#[test]
fn body_integers_over_int64_are_refused() {
    let s = TestServer::start();
    let over = "9223372036854775808";
    for (path, field) in [
        ("/api/memory/operations/defragment", "maxAllocationsToMove"),
        ("/api/memory/operations/defragment/cpu", "maxBytesToMove"),
        ("/api/memory/operations/defragment", "maxTimeMs"),
        ("/api/memory/models/optimize", "minMemoryToFree"),
        ("/api/memory/models/optimize", "maxOptimizationTimeMs"),
        ("/api/memory/models/load", "keepAliveMs"),
    ] {
        for n in [over, "18446744073709551615"] {
            let body = if path.ends_with("/load") {
                format!(r#"{{"path": "/nonexistent/m.safetensors", "{field}": {n}}}"#)
            } else {
                format!(r#"{{"{field}": {n}}}"#)
            };
            let r = s.call("POST", path, Some(&body));
            assert_error(&r, 400, "INVALID_ARGUMENT", &format!("{field}: {n} is over 9223372036854775807"));
        }
    }
    let body = r#"{"maxAllocationsToMove": 9223372036854775807, "maxBytesToMove": 9223372036854775807}"#;
    assert_eq!(s.call("POST", "/api/memory/operations/defragment/cpu", Some(body)).0, 200);
}

/// Issue 22: only an empty body is no body. A form feed (seed 1322236776 at 100 examples sent
/// `\x0c` to defragment and got 200) or other whitespace alone is no JSON, so it is 400.
#[test]
fn a_body_of_whitespace_is_not_an_empty_body() {
    let s = TestServer::start();
    for path in
        ["/api/memory/operations/defragment", "/api/memory/operations/clear", "/api/memory/allocations/allocate"]
    {
        for body in ["\x0c", " ", "\n", "\t\r\n"] {
            let r = s.call("POST", path, Some(body));
            assert_error(&r, 400, "INVALID_ARGUMENT", "not valid JSON");
        }
        if !path.ends_with("/allocate") {
            assert_eq!(s.call("POST", path, Some("")).0, 200, "{path}: an empty body is no body");
        }
    }
}

#[test]
fn oversized_bodies_get_413_with_the_configured_limit() {
    let mut c = Config::default();
    c.api.max_body_bytes = 4096;
    let s = TestServer::start_with(c);
    let big = format!(r#"{{"sizeBytes": 4096, "purpose": "{}"}}"#, "x".repeat(8192));
    // The daemon answers 413 without reading the body, and the connection ends there: these
    // requests ask for a connection of their own, so the next one does not find a pooled
    // connection the daemon already closed.
    let close = [("connection", "close")];
    assert_error(
        &s.call_with("POST", "/api/memory/allocations/allocate/cpu", Some(&big), &close),
        413,
        "PAYLOAD_TOO_LARGE",
        "4096 bytes",
    );
    assert_error(
        &s.call_with("POST", "/api/memory/operations/defragment", Some(&big), &close),
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
    // `VRAM` is GPU memory: it goes to a GPU, and a host without one says what is missing.
    let body = json!({"sizeBytes": 4096, "memoryType": "VRAM"}).to_string();
    let r = s.call("POST", "/api/memory/allocations/allocate", Some(&body));
    if s.service.device_ids().iter().any(|d| d.is_gpu()) {
        assert_eq!((r.0, r.1["data"]["memoryType"].as_str()), (201, Some("device")), "{r:?}");
        assert!(r.1["data"]["deviceId"].as_str().is_some_and(|d| d != "cpu"), "{r:?}");
    } else {
        assert_error(&r, 400, "INVALID_ARGUMENT", "no device here provides device memory");
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
    // Another API's id, by its canonical name: not found where that backend serves devices,
    // unavailable with its reason where it serves none (CI: lavapipe is left out by default).
    let vulkan = health["data"]["backends"].as_array().expect("backends").iter().find(|b| b["name"] == "vulkan");
    let r = s.call("GET", "/api/memory/status/VULKAN-3", None);
    match vulkan {
        Some(v) if v["available"] == false => assert_error(&r, 503, "BACKEND_UNAVAILABLE", "vulkan:3"),
        _ => assert_error(&r, 404, "DEVICE_NOT_FOUND", "'vulkan:3'"),
    }
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

/// Item 3: a dead client's memory comes back. Allocations that name their process (`ownerPid`)
/// are freed, exports included, within a second of its exit and logged as `reclaimed`; the
/// others stay.
#[test]
fn a_dead_owners_allocations_come_back_within_a_second() {
    let s = TestServer::start();
    let mut client = std::process::Command::new("sleep").arg("60").spawn().expect("spawn a client");
    let pid = client.id();
    let owned = s.alloc_on("cpu", json!({"sizeBytes": 1 << 20, "ownerPid": pid, "owner": "client"}));
    let exported = s.alloc_on("cpu", json!({"sizeBytes": 4096, "ownerPid": pid}));
    assert_eq!(s.call("POST", &format!("/api/memory/allocations/{exported}/export"), None).0, 200);
    let kept = s.alloc_on("cpu", json!({"sizeBytes": 4096, "owner": "client"}));
    let (_, one) = s.call("GET", &format!("/api/memory/allocation/{owned}"), None);
    assert_eq!(one["data"]["ownerPid"], pid, "{one}");
    // A copy into a new allocation belongs to the same process.
    let (code, t) = s.call(
        "POST",
        "/api/memory/transfer",
        Some(&json!({"sourceAllocationId": owned, "targetDeviceId": "cpu"}).to_string()),
    );
    assert_eq!(code, 200, "{t}");
    let copy = t["data"]["destinationAllocationId"].as_str().expect("copy").to_string();
    client.kill().expect("kill");
    let killed = std::time::Instant::now();
    client.wait().expect("reap");
    let live = || -> Vec<String> {
        let (_, l) = s.call("GET", "/api/memory/allocations", None);
        l["data"]["allocations"]
            .as_array()
            .expect("list")
            .iter()
            .map(|a| a["allocationId"].as_str().unwrap_or("").to_string())
            .collect()
    };
    while live().len() > 1 {
        assert!(killed.elapsed() < std::time::Duration::from_secs(1), "not reclaimed within 1 s: {:?}", live());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(live(), vec![kept], "only the allocation without an owner process stays");
    // Logged and counted.
    let (_, events) = s.call("GET", "/api/memory/analytics/events?limit=50", None);
    let reclaimed: Vec<&Value> =
        events["data"]["events"].as_array().expect("events").iter().filter(|e| e["event"] == "reclaimed").collect();
    let ids: std::collections::BTreeSet<&str> = reclaimed.iter().filter_map(|e| e["allocationId"].as_str()).collect();
    assert_eq!(ids, [owned.as_str(), exported.as_str(), copy.as_str()].into_iter().collect(), "{events}");
    let (_, a) = s.call("GET", "/api/memory/analytics", None);
    let cpu = a["data"]["devices"].as_array().expect("devices").iter().find(|d| d["deviceId"] == "cpu").expect("cpu");
    assert_eq!(cpu["activity"]["reclaims"], 3, "{cpu}");
    assert_eq!(cpu["activity"]["reclaimedBytes"], (1u64 << 20) * 2 + 4096, "{cpu}");
    // A process that is not running cannot own memory.
    assert_error(
        &s.call(
            "POST",
            "/api/memory/allocations/allocate/cpu",
            Some(&json!({"sizeBytes": 4096, "ownerPid": pid}).to_string()),
        ),
        400,
        "INVALID_ARGUMENT",
        "ownerPid",
    );
}

/// A raw client: connects to the socket, says hello, prints the first line it gets (or EOF),
/// then stays until its stdin closes.
const RAW_CLIENT: &str = r#"
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
hello = {"type": "hello", "protocolVersion": 2, "workerId": "outsider", "pid": os.getpid(),
         "role": "client", "frameworks": {}, "devices": ["cpu"]}
s.sendall((json.dumps(hello) + "\n").encode())
s.settimeout(2.0)
try:
    line = s.makefile().readline()
    print(line.strip() or "EOF", flush=True)
except socket.timeout:
    print("SILENT", flush=True)
sys.stdin.read()
"#;

/// Item 9: the socket checks its peers' credentials (SO_PEERCRED) against the allow-list: the
/// daemon's own user, `workers.allowed_uids`, `workers.allowed_gids`. Needs root to run a peer
/// as another user (CI runs as root).
#[test]
fn the_socket_serves_the_users_its_allow_list_names_and_refuses_the_others() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    assert_eq!(rustix::process::getuid().as_raw(), 0, "this test runs a client as another user, which takes root");
    let dir = std::env::temp_dir().join(format!("mw-peercred-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let python = if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let run_as_nobody = |socket: &str| {
        let mut child = std::process::Command::new(python)
            .args(["-c", RAW_CLIENT, socket])
            .uid(65534)
            .gid(65534)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("client");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
        (child, line)
    };
    for (allowed_uids, allowed_gids, admitted) in [(vec![], vec![4242], false), (vec![65534], vec![], true)] {
        let socket = dir.join(format!("s-{admitted}.sock")).display().to_string();
        let mut c = Config::default();
        c.workers.enabled = false;
        c.workers.socket = socket.clone();
        c.workers.allowed_uids = allowed_uids;
        c.workers.allowed_gids = allowed_gids;
        let s = TestServer::start_with_workers(c);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !std::path::Path::new(&socket).exists() {
            assert!(std::time::Instant::now() < deadline, "the socket never appeared");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // The daemon sets the mode right after bind: wait for it rather than race it.
        let mode = || {
            std::fs::metadata(&socket).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777).ok()
        };
        while mode() != Some(0o666) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(mode(), Some(0o666), "others can reach it; the credentials decide");
        let (mut child, line) = run_as_nobody(&socket);
        let (_, h) = s.call("GET", "/health", None);
        let clients = h["data"]["workers"]["workers"].as_array().map(Vec::len).unwrap_or(0);
        if admitted {
            assert_eq!(line.trim(), "SILENT", "no refusal: {line}");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
            while s.call("GET", "/health", None).1["data"]["workers"]["ready"] != 1 {
                assert!(std::time::Instant::now() < deadline, "the allowed user never attached");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        } else {
            assert!(line.contains("PERMISSION_DENIED") && line.contains("uid 65534"), "{line}");
            assert_eq!(clients, 0, "nothing attached: {h}");
        }
        drop(child.stdin.take());
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Item 9: with a token, exports and `/metrics` follow the token rule; `/health` and the
/// document stay open (docs/API.md says why).
#[test]
fn with_a_token_exports_need_it_and_the_document_stays_open() {
    let open = TestServer::start_with(Config { auth_token: Some("s3cret".into()), ..Config::default() });
    for path in ["/api/memory/allocations/x/export", "/api/memory/operations/clear"] {
        assert_error(&open.call("POST", path, None), 401, "UNAUTHORIZED", "token");
    }
    let wrong = open.call_with("GET", "/api/memory/status", None, &[("authorization", "Bearer s3cre")]);
    assert_error(&wrong, 401, "UNAUTHORIZED", "token");
    assert_eq!(open.call("GET", "/health", None).0, 200);
    assert_eq!(open.call("GET", "/api/openapi.json", None).0, 200);
    let right = open.call_with("GET", "/api/memory/status", None, &[("authorization", "Bearer s3cret")]);
    assert_eq!(right.0, 200);
}
