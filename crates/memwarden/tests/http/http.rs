//! Every route over real loopback HTTP, with the bad inputs of the foundation issue.

use crate::common::{assert_envelope, assert_error, TestServer};
use memwarden::config::Config;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn alloc(server: &TestServer, device: &str, body: &str) -> Value {
    let (status, v) = server.call("POST", &format!("/api/memory/allocations/allocate/{device}"), Some(body));
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["success"], true);
    assert_envelope(&v);
    v["data"].clone()
}

fn live_count(server: &TestServer) -> u64 {
    server.call("GET", "/api/memory/allocations", None).1["data"]["count"].as_u64().expect("count")
}

#[test]
fn health_lists_devices_and_backends() {
    let s = TestServer::start();
    let (status, v) = s.call("GET", "/health", None);
    assert_eq!(status, 200);
    assert_envelope(&v);
    let d = &v["data"];
    assert_eq!(d["status"], "healthy");
    assert_eq!(d["devices"][0], "cpu", "cpu is always present, first");
    let backends = d["backends"].as_array().expect("backends");
    let host = backends.iter().find(|b| b["name"] == "host").expect("host backend");
    assert_eq!(host["available"], true);
    let cuda = backends.iter().find(|b| b["name"] == "cuda").expect("cuda backend listed");
    if cuda["available"] == true {
        // A GPU machine: every listed GPU is a device.
        assert!(cuda["reason"].is_null());
        for g in cuda["devices"].as_array().expect("gpus") {
            assert!(d["devices"].as_array().expect("devices").contains(g));
        }
    } else {
        // No driver or no GPU (CI): unavailable with the reason, and only the cpu.
        assert!(cuda["reason"].as_str().expect("reason").starts_with("backend unavailable: "));
        assert_eq!(d["devices"], serde_json::json!(["cpu"]));
    }
}

#[test]
fn status_reports_real_host_memory() {
    let s = TestServer::start();
    let (status, v) = s.call("GET", "/api/memory/status", None);
    assert_eq!(status, 200);
    let devices = v["data"]["devices"].as_array().expect("devices");
    let backends = v["data"]["backends"].as_array().expect("backends listed in status too");
    let cuda = backends.iter().find(|b| b["name"] == "cuda").expect("cuda backend");
    assert!(
        cuda["available"] == true || cuda["reason"].as_str().is_some_and(|r| r.starts_with("backend unavailable: "))
    );
    let cpu = &devices[0];
    assert_eq!(cpu["deviceId"], "cpu");
    assert_eq!(cpu["deviceType"], "CPU");
    assert_eq!(cpu["memoryType"], "RAM");
    let total = cpu["totalMemory"].as_u64().expect("total");
    let available = cpu["availableMemory"].as_u64().expect("available");
    let used = cpu["usedMemory"].as_u64().expect("used");
    assert_eq!(used + available, total);
    let util = cpu["memoryUtilization"].as_f64().expect("utilization");
    assert!((0.0..=1.0).contains(&util));
    assert!((util - used as f64 / total as f64).abs() < 1e-9);
    for field in ["source", "lastUpdated", "name"] {
        assert!(cpu[field].as_str().is_some_and(|x| !x.is_empty()), "{field}");
    }
    for field in ["reservedBytes", "allocatedBytes", "reservationBytes"] {
        assert!(cpu[field].is_u64(), "{field}");
    }
    assert_eq!(cpu["healthy"], true);
    assert!(cpu["lastError"].is_null());
    for gpu_only in ["uuid", "pciBusId", "computeCapability", "memoryBandwidth", "reservedMemory"] {
        assert!(cpu[gpu_only].is_null(), "{gpu_only} is for GPUs");
    }
    assert_eq!(cpu["processes"], serde_json::json!([]));
    // Against /proc/meminfo read now: within 1% of total.
    if cpu["source"] == "meminfo" {
        let mi = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
        let kb = |key: &str| -> u64 {
            mi.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|x| x.parse().ok())
                .expect(key)
        };
        assert_eq!(total, kb("MemTotal:") * 1024);
        // memwarden adds the per-CPU free lists MemAvailable leaves out (/proc/zoneinfo).
        let pcp = memwarden_backends::host::HostStatusReader::default().per_cpu_free_bytes() as f64;
        let expect = (kb("MemAvailable:") * 1024) as f64 + pcp;
        assert!((available as f64 - expect).abs() / (total as f64) < 0.01, "available {available}, expected {expect}");
    }
}

#[test]
fn status_by_device_accepts_aliases_and_names_known_devices() {
    let s = TestServer::start();
    for alias in ["cpu", "cpu:0", "cpu-0", "cpu_0"] {
        let (status, v) = s.call("GET", &format!("/api/memory/status/{alias}"), None);
        assert_eq!(status, 200, "{alias}");
        assert_eq!(v["data"]["deviceId"], "cpu");
    }
    // CI has no CUDA: a CUDA id names a backend that is not available here (tests/http/contract.rs).
    assert_error(&s.call("GET", "/api/memory/status/cuda:77", None), 503, "BACKEND_UNAVAILABLE", "cuda:77");
    assert_error(&s.call("GET", "/api/memory/status/gpu-99", None), 503, "BACKEND_UNAVAILABLE", "cuda:99");
    assert_error(&s.call("GET", "/api/memory/status/tpu:7", None), 404, "DEVICE_NOT_FOUND", "devices: cpu");
    assert_error(&s.call("GET", "/api/memory/status/nonsense", None), 404, "DEVICE_NOT_FOUND", "cpu");
    // The Vulkan backend serves nothing with the default config (CI's only Vulkan device is
    // lavapipe, a software driver; a host without a loader has none): its ids are unavailable,
    // with the reason, like CUDA's.
    assert_error(&s.call("GET", "/api/memory/status/vulkan:0", None), 503, "BACKEND_UNAVAILABLE", "vulkan backend");
}

#[test]
fn allocate_get_list_free_round_trip() {
    let s = TestServer::start();
    let a = alloc(&s, "cpu", r#"{"sizeBytes": 1000, "purpose": "kv-cache", "owner": "test", "persistent": true}"#);
    assert_eq!(a["deviceId"], "cpu");
    assert_eq!(a["memoryType"], "host");
    assert_eq!(a["sizeBytes"], 1000);
    assert_eq!(a["allocatedSize"], 1024);
    assert_eq!(a["alignment"], 256);
    assert_eq!(a["purpose"], "kv-cache");
    assert_eq!(a["owner"], "test");
    assert_eq!(a["persistent"], true);
    assert_eq!(a["movable"], true);
    assert_eq!(a["generation"], 0);
    let addr = a["address"].as_str().expect("address");
    assert!(addr.starts_with("0x") && u64::from_str_radix(&addr[2..], 16).is_ok());
    assert!(a["offset"].is_u64());
    assert!(a["allocatedAt"].as_str().expect("time").ends_with('Z'));
    let id = a["allocationId"].as_str().expect("id").to_string();

    // The body route, with seed aliases.
    let b = {
        let (status, v) = s.call(
            "POST",
            "/api/memory/allocations/allocate",
            Some(r#"{"deviceId": "cpu-0", "size": 4096, "memoryType": "pinned", "alignment": 4096, "movable": false}"#),
        );
        assert_eq!(status, 201, "{v}");
        v["data"].clone()
    };
    assert_eq!(b["memoryType"], "pinned");
    assert_eq!(b["movable"], false);
    let baddr = u64::from_str_radix(&b["address"].as_str().expect("address")[2..], 16).expect("hex");
    assert_eq!(baddr % 4096, 0);
    let r = alloc(&s, "cpu", r#"{"sizeBytes": 1073741824, "memoryType": "reservation"}"#);
    assert!(r["address"].is_null() && r["offset"].is_null(), "a reservation has no memory");

    let (status, one) = s.call("GET", &format!("/api/memory/allocation/{id}"), None);
    assert_eq!(status, 200);
    assert_eq!(one["data"], a);
    let (_, list) = s.call("GET", "/api/memory/allocations", None);
    assert_eq!(list["data"]["count"], 3);
    assert_eq!(list["data"]["totalBytes"], 1000 + 4096 + (1u64 << 30));
    assert_eq!(list["data"]["allocations"][0]["allocationId"], id.as_str(), "oldest first");
    let (_, by_dev) = s.call("GET", "/api/memory/allocations/device/tpu_99", None);
    assert_eq!(by_dev["error"]["code"], "DEVICE_NOT_FOUND");
    let (status, by_dev) = s.call("GET", "/api/memory/allocations/device/cpu", None);
    assert_eq!(status, 200);
    assert_eq!(by_dev["data"]["count"], 3);

    let (status, st) = s.call("GET", "/api/memory/status/cpu", None);
    assert_eq!(status, 200);
    assert_eq!(st["data"]["reservationBytes"], 1u64 << 30);
    assert_eq!(st["data"]["allocatedBytes"], 1024 + 4096);

    let (status, freed) = s.call("DELETE", &format!("/api/memory/allocations/{id}"), None);
    assert_eq!(status, 200);
    assert_eq!(freed["data"]["freedBytes"], 1024);
    assert_error(&s.call("DELETE", &format!("/api/memory/allocations/{id}"), None), 404, "ALLOCATION_NOT_FOUND", &id);
    assert_error(&s.call("GET", &format!("/api/memory/allocation/{id}"), None), 404, "ALLOCATION_NOT_FOUND", &id);
    assert_error(
        &s.call("DELETE", "/api/memory/allocations/not-an-id", None),
        404,
        "ALLOCATION_NOT_FOUND",
        "not-an-id",
    );
    assert_eq!(live_count(&s), 2);
    s.service.validate().expect("ledger matches pools");
}

#[test]
fn bad_inputs_get_the_envelope_and_change_nothing() {
    let s = TestServer::start();
    let keep = alloc(&s, "cpu", r#"{"sizeBytes": 4096}"#);
    let path = "/api/memory/allocations/allocate/cpu";
    let cases: &[(&str, u16, &str, &str)] = &[
        (r#"{"sizeBytes": 0}"#, 400, "INVALID_ARGUMENT", "sizeBytes"),
        (r#"{"sizeBytes": -5}"#, 400, "INVALID_ARGUMENT", "sizeBytes"),
        (r#"{"sizeBytes": "lots"}"#, 400, "INVALID_ARGUMENT", "sizeBytes"),
        (r#"{"sizeBytes": 1.5}"#, 400, "INVALID_ARGUMENT", "sizeBytes"),
        (r#"{}"#, 400, "INVALID_ARGUMENT", "sizeBytes"),
        (r#"{"sizeBytes": 10, "alignment": 3}"#, 400, "INVALID_ARGUMENT", "alignment"),
        (r#"{"sizeBytes": 10, "alignment": 0}"#, 400, "INVALID_ARGUMENT", "alignment"),
        (r#"{"sizeBytes": 10, "alignment": 1073741824}"#, 400, "INVALID_ARGUMENT", "alignment"),
        (r#"{"sizeBytes": 10, "memoryType": "vram"}"#, 400, "INVALID_ARGUMENT", "memoryType"),
        (r#"{"sizeBytes": 10, "memoryType": "device"}"#, 400, "INVALID_ARGUMENT", "memoryType"),
        (r#"{"sizeBytes": 10, "memoryType": 3}"#, 400, "INVALID_ARGUMENT", "memoryType"),
        (r#"{"sizeBytes": 10, "persistent": "yes"}"#, 400, "INVALID_ARGUMENT", "persistent"),
        (r#"{"sizeBytes": 10, "deviceId": "tpu:99"}"#, 404, "DEVICE_NOT_FOUND", "tpu:99"),
        (r#"{"sizeBytes": 10"#, 400, "INVALID_ARGUMENT", "not valid JSON"),
        (r#"not json at all"#, 400, "INVALID_ARGUMENT", "not valid JSON"),
        (r#"[1, 2]"#, 400, "INVALID_ARGUMENT", "must be a JSON object"),
        (
            r#"{"sizeBytes": 9000000000000000000}"#,
            507,
            "INSUFFICIENT_MEMORY",
            "requested 9000000000000000000 bytes, available",
        ),
    ];
    for (body, status, code, needle) in cases {
        let resp = s.call("POST", path, Some(body));
        assert_error(&resp, *status, code, needle);
    }
    // Reservations get the same budget check.
    assert_error(
        &s.call("POST", path, Some(r#"{"sizeBytes": 9000000000000000000, "memoryType": "reservation"}"#)),
        507,
        "INSUFFICIENT_MEMORY",
        "available",
    );
    // No content type, and the body route without a device.
    assert_error(
        &s.call_with("POST", path, Some(r#"{"sizeBytes": 10}"#), &[("content-type", "text/plain")]),
        400,
        "INVALID_ARGUMENT",
        "Content-Type",
    );
    // Without a device, the body route picks one (tests/http/contract.rs); a kind no device here
    // provides is refused.
    assert_error(
        &s.call("POST", "/api/memory/allocations/allocate", Some(r#"{"sizeBytes": 10, "memoryType": "device"}"#)),
        400,
        "INVALID_ARGUMENT",
        "no device here provides device memory",
    );
    assert_error(
        &s.call("POST", "/api/memory/allocations/allocate/nowhere", Some(r#"{"sizeBytes": 10}"#)),
        404,
        "DEVICE_NOT_FOUND",
        "cpu",
    );
    // Nothing was allocated by any of them and the daemon still serves.
    let (_, list) = s.call("GET", "/api/memory/allocations", None);
    assert_eq!(list["data"]["count"], 1);
    assert_eq!(list["data"]["allocations"][0]["allocationId"], keep["allocationId"]);
    let (_, st) = s.call("GET", "/api/memory/status/cpu", None);
    assert_eq!(st["data"]["allocatedBytes"], 4096);
    s.service.validate().expect("valid");
}

#[test]
fn clear_returns_cached_blocks() {
    let s = TestServer::start();
    let a = alloc(&s, "cpu", r#"{"sizeBytes": 1048576}"#);
    let (_, st) = s.call("GET", "/api/memory/status/cpu", None);
    let held = st["data"]["reservedBytes"].as_u64().expect("reserved");
    assert_eq!(held, 64 * MIB, "one default 64 MiB block");
    let (status, c) = s.call("POST", "/api/memory/operations/clear", None);
    assert_eq!(status, 200);
    assert_eq!(c["data"]["clearedBytes"], 0, "the block is in use");
    s.call("DELETE", &format!("/api/memory/allocations/{}", a["allocationId"].as_str().expect("id")), None);
    let (status, c) = s.call("POST", "/api/memory/operations/clear/cpu", None);
    assert_eq!(status, 200);
    assert_eq!(c["data"]["clearedBytes"], 64 * MIB);
    assert_eq!(c["data"]["devices"][0]["deviceId"], "cpu");
    assert_eq!(c["data"]["devices"][0]["reservedBytes"], 0);
    assert_error(&s.call("POST", "/api/memory/operations/clear/tpu:99", None), 404, "DEVICE_NOT_FOUND", "cpu");
}

#[test]
fn unknown_routes_and_methods_get_the_envelope() {
    let s = TestServer::start();
    assert_error(&s.call("GET", "/api/memory/nothing", None), 404, "ROUTE_NOT_FOUND", "/api/memory/nothing");
    assert_error(&s.call("PUT", "/api/memory/status", Some("{}")), 405, "METHOD_NOT_ALLOWED", "PUT");
    assert_error(&s.call("GET", "/api/memory/operations/clear", None), 405, "METHOD_NOT_ALLOWED", "GET");
}

#[test]
fn correlation_ids_are_echoed() {
    let s = TestServer::start();
    let (_, v) = s.call_with("GET", "/api/memory/status", None, &[("x-correlation-id", "trace-42")]);
    assert_eq!(v["correlationId"], "trace-42");
    let (_, v) = s.call_with("GET", "/api/memory/status/cuda:99", None, &[("x-correlation-id", "trace-43")]);
    assert_eq!(v["correlationId"], "trace-43", "errors carry it too");
    let (_, v1) = s.call("GET", "/health", None);
    let (_, v2) = s.call("GET", "/health", None);
    assert_ne!(v1["correlationId"], v2["correlationId"], "generated when absent");
}

#[test]
fn openapi_lists_every_route_and_swagger_is_served_offline() {
    let s = TestServer::start();
    let (status, doc) = s.call("GET", "/api/openapi.json", None);
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/health",
        "/api/memory/status",
        "/api/memory/status/{deviceId}",
        "/api/memory/allocations",
        "/api/memory/allocations/allocate",
        "/api/memory/allocations/allocate/{deviceId}",
        "/api/memory/allocations/{allocationId}",
        "/api/memory/allocations/device/{deviceId}",
        "/api/memory/allocation/{allocationId}",
        "/api/memory/operations/clear",
        "/api/memory/operations/clear/{deviceId}",
        "/api/memory/allocations/{allocationId}/export",
        "/api/memory/allocations/{allocationId}/data",
        "/api/memory/transfer",
        "/api/memory/transfer/{transferId}",
        "/api/memory/copy",
        "/api/memory/operations/defragment",
        "/api/memory/operations/defragment/{deviceId}",
        "/api/memory/pools",
        "/api/memory/pools/{deviceId}",
    ] {
        assert!(paths.contains_key(p), "openapi lacks {p}");
    }
    assert!(doc["components"]["schemas"]["AllocateBody"].is_object());
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut resp = agent.get(&s.url("/swagger-ui/")).call().expect("swagger");
    assert_eq!(resp.status().as_u16(), 200);
    let html = resp.body_mut().read_to_string().expect("html");
    assert!(html.contains("swagger"), "swagger ui page");
}

#[test]
fn a_token_guards_the_api_but_not_health() {
    let config = Config { auth_token: Some("s3cret".into()), ..Config::default() };
    let open = TestServer::start_with(config.clone());
    assert_error(&open.call("GET", "/api/memory/status", None), 401, "UNAUTHORIZED", "token");
    assert_error(
        &open.call_with("GET", "/api/memory/status", None, &[("authorization", "Bearer wrong")]),
        401,
        "UNAUTHORIZED",
        "token",
    );
    assert_eq!(open.call("GET", "/health", None).0, 200);
    let authed = TestServer::start_with(config).with_token("s3cret");
    assert_eq!(authed.call("GET", "/api/memory/status", None).0, 200);
}
