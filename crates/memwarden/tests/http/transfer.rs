//! Transfers, copies, exports and allocation data over HTTP, between host allocations (the whole
//! path CI can exercise without a GPU; the GPU versions are in tests/gpu/gpu.rs).

use crate::common::{assert_error, random_bytes, TestServer};
use memwarden::config::Config;
use serde_json::{json, Value};

fn alloc(s: &TestServer, body: Value) -> String {
    s.alloc_on("cpu", body)
}

fn put(s: &TestServer, id: &str, offset: u64, data: &[u8]) {
    s.put_data(id, offset, data)
}

fn get(s: &TestServer, id: &str, offset: u64, len: u64) -> Vec<u8> {
    s.get_data(id, offset, len)
}

#[test]
fn data_round_trips_and_is_bounds_checked() {
    let s = TestServer::start();
    let id = alloc(&s, json!({"sizeBytes": 10000}));
    let data = random_bytes(4000, 1);
    put(&s, &id, 123, &data);
    assert_eq!(get(&s, &id, 123, 4000), data);
    assert_error(
        &s.call("GET", &format!("/api/memory/allocations/{id}/data?offset=9000&length=1001"), None),
        400,
        "INVALID_ARGUMENT",
        "offset",
    );
    assert_error(
        &s.call("GET", &format!("/api/memory/allocations/{id}/data?length=x"), None),
        400,
        "INVALID_ARGUMENT",
        "length",
    );
    assert_error(
        &s.call("GET", "/api/memory/allocations/nope/data?length=1", None),
        404,
        "ALLOCATION_NOT_FOUND",
        "nope",
    );
    let r = alloc(&s, json!({"sizeBytes": 4096, "memoryType": "reservation"}));
    assert_error(
        &s.call("GET", &format!("/api/memory/allocations/{r}/data?length=1"), None),
        400,
        "INVALID_ARGUMENT",
        "reservation",
    );
}

#[test]
fn copy_between_host_allocations_moves_the_right_bytes() {
    let s = TestServer::start();
    let a = alloc(&s, json!({"sizeBytes": 1 << 20}));
    let b = alloc(&s, json!({"sizeBytes": 1 << 20, "memoryType": "pinned"}));
    let data = random_bytes(1 << 20, 2);
    put(&s, &a, 0, &data);
    let body = json!({"sourceAllocationId": a, "sourceOffset": 1000, "destinationAllocationId": b,
                      "destinationOffset": 5000, "sizeBytes": 300000});
    let (status, v) = s.call("POST", "/api/memory/copy", Some(&body.to_string()));
    assert_eq!(status, 200, "{v}");
    let t = &v["data"];
    assert_eq!(t["status"], "completed");
    assert_eq!(t["bytesDone"], 300000);
    assert_eq!(t["progress"], 1.0);
    assert_eq!(t["transferType"], "copy");
    assert_eq!(get(&s, &b, 5000, 300000), data[1000..301000].to_vec());
    assert_eq!(get(&s, &b, 0, 5000), vec![0u8; 5000], "bytes before the range untouched");
    // The transfer is kept for polling.
    let (status, polled) =
        s.call("GET", &format!("/api/memory/transfer/{}", t["transferId"].as_str().expect("id")), None);
    assert_eq!(status, 200);
    assert_eq!(polled["data"]["status"], "completed");
    assert_error(&s.call("GET", "/api/memory/transfer/unknown", None), 404, "TRANSFER_NOT_FOUND", "unknown");
}

#[test]
fn transfer_to_a_new_allocation_and_move() {
    let s = TestServer::start();
    let a = alloc(&s, json!({"sizeBytes": 70000, "purpose": "weights"}));
    let data = random_bytes(70000, 3);
    put(&s, &a, 0, &data);
    let (status, v) = s.call(
        "POST",
        "/api/memory/transfer",
        Some(&json!({"sourceAllocationId": a, "targetDeviceId": "cpu-0", "targetMemoryType": "pinned", "transferType": "move"}).to_string()),
    );
    assert_eq!(status, 200, "{v}");
    let new_id = v["data"]["destinationAllocationId"].as_str().expect("new id").to_string();
    assert_eq!(v["data"]["sizeBytes"], 70000, "default size: the whole source");
    assert_eq!(get(&s, &new_id, 0, 70000), data);
    let (_, rec) = s.call("GET", &format!("/api/memory/allocation/{new_id}"), None);
    assert_eq!(rec["data"]["memoryType"], "pinned");
    assert_eq!(rec["data"]["purpose"], "weights");
    assert_error(&s.call("GET", &format!("/api/memory/allocation/{a}"), None), 404, "ALLOCATION_NOT_FOUND", &a);
    s.service.validate().expect("valid");
}

#[test]
fn large_transfers_run_in_the_background() {
    let config =
        Config { transfer: memwarden::config::TransferSection { sync_max_bytes: 1 << 20 }, ..Config::default() };
    let s = TestServer::start_with(config);
    let a = alloc(&s, json!({"sizeBytes": 48 << 20}));
    let data = random_bytes(1 << 20, 4);
    put(&s, &a, (47 << 20) as u64, &data);
    let (status, v) = s.call(
        "POST",
        "/api/memory/transfer",
        Some(&json!({"sourceAllocationId": a, "targetDeviceId": "cpu"}).to_string()),
    );
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["data"]["status"], "running");
    let id = v["data"]["transferId"].as_str().expect("id").to_string();
    let dst = v["data"]["destinationAllocationId"].as_str().expect("dst").to_string();
    // The allocations in use cannot be freed until it finishes; poll until done.
    let mut last = Value::Null;
    for _ in 0..500 {
        let (_, p) = s.call("GET", &format!("/api/memory/transfer/{id}"), None);
        last = p["data"].clone();
        if last["status"] != "running" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(last["status"], "completed", "{last}");
    assert_eq!(last["bytesDone"], 48u64 << 20);
    assert!(last["bytesPerSecond"].as_f64().expect("rate") > 0.0);
    assert!(last["completedAt"].is_string());
    assert_eq!(get(&s, &dst, 47 << 20, 1 << 20), data);
}

#[test]
fn transfer_inputs_are_checked() {
    let s = TestServer::start();
    let a = alloc(&s, json!({"sizeBytes": 1000}));
    let b = alloc(&s, json!({"sizeBytes": 500}));
    let r = alloc(&s, json!({"sizeBytes": 500, "memoryType": "reservation"}));
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (json!({}), 400, "INVALID_ARGUMENT", "sourceAllocationId"),
        (json!({"sourceAllocationId": a}), 400, "INVALID_ARGUMENT", "destinationAllocationId"),
        (json!({"sourceAllocationId": "nope", "destinationAllocationId": b}), 404, "ALLOCATION_NOT_FOUND", "nope"),
        (json!({"sourceAllocationId": a, "destinationAllocationId": "nope"}), 404, "ALLOCATION_NOT_FOUND", "nope"),
        (json!({"sourceAllocationId": a, "destinationAllocationId": b}), 400, "INVALID_ARGUMENT", "destinationOffset"),
        (
            json!({"sourceAllocationId": a, "destinationAllocationId": b, "sizeBytes": 100, "destinationOffset": 450}),
            400,
            "INVALID_ARGUMENT",
            "destinationOffset",
        ),
        (
            json!({"sourceAllocationId": a, "destinationAllocationId": b, "sizeBytes": 100, "sourceOffset": 950}),
            400,
            "INVALID_ARGUMENT",
            "sizeBytes",
        ),
        (
            json!({"sourceAllocationId": a, "destinationAllocationId": b, "sourceOffset": 2000}),
            400,
            "INVALID_ARGUMENT",
            "sourceOffset",
        ),
        (
            json!({"sourceAllocationId": a, "destinationAllocationId": b, "sizeBytes": -1}),
            400,
            "INVALID_ARGUMENT",
            "sizeBytes",
        ),
        (
            json!({"sourceAllocationId": a, "destinationAllocationId": b, "sizeBytes": 0}),
            400,
            "INVALID_ARGUMENT",
            "sizeBytes",
        ),
        (
            json!({"sourceAllocationId": a, "destinationAllocationId": a, "sizeBytes": 100, "destinationOffset": 50}),
            400,
            "INVALID_ARGUMENT",
            "overlap",
        ),
        (
            json!({"sourceAllocationId": a, "destinationAllocationId": b, "sizeBytes": 10, "transferType": "teleport"}),
            400,
            "INVALID_ARGUMENT",
            "transferType",
        ),
        (
            json!({"sourceAllocationId": r, "destinationAllocationId": b, "sizeBytes": 10}),
            400,
            "INVALID_ARGUMENT",
            "reservation",
        ),
        (json!({"sourceAllocationId": a, "targetDeviceId": "tpu:99"}), 404, "DEVICE_NOT_FOUND", "tpu:99"),
        (
            json!({"sourceAllocationId": a, "targetDeviceId": "cpu", "targetMemoryType": "swap"}),
            400,
            "INVALID_ARGUMENT",
            "targetMemoryType",
        ),
        (
            json!({"sourceAllocationId": a, "targetDeviceId": "cpu", "destinationAllocationId": b}),
            400,
            "INVALID_ARGUMENT",
            "targetDeviceId",
        ),
    ];
    for (body, status, code, needle) in &cases {
        assert_error(&s.call("POST", "/api/memory/transfer", Some(&body.to_string())), *status, code, needle);
    }
    assert_error(
        &s.call(
            "POST",
            "/api/memory/copy",
            Some(&json!({"sourceAllocationId": a, "targetDeviceId": "cpu"}).to_string()),
        ),
        400,
        "INVALID_ARGUMENT",
        "destinationAllocationId",
    );
    assert_error(
        &s.call("POST", "/api/memory/copy", Some(&json!({"sourceAllocationId": a, "destinationAllocationId": b, "sizeBytes": 10, "transferType": "move"}).to_string())),
        400,
        "INVALID_ARGUMENT",
        "transferType",
    );
    // Nothing was created or lost.
    assert_eq!(s.call("GET", "/api/memory/allocations", None).1["data"]["count"], 3);
    s.service.validate().expect("valid");
}

#[test]
fn host_exports_map_the_same_memory_from_another_process() {
    let s = TestServer::start();
    let id = alloc(&s, json!({"sizeBytes": 8192, "alignment": 4096}));
    let data = random_bytes(8192, 5);
    put(&s, &id, 0, &data);
    let (status, v) = s.call("POST", &format!("/api/memory/allocations/{id}/export"), None);
    assert_eq!(status, 200, "{v}");
    let e = &v["data"];
    assert_eq!(e["kind"], "shm");
    let path = e["path"].as_str().expect("path");
    assert!(path.starts_with("/dev/shm/memwarden-"), "{path}");
    let offset = e["offset"].as_u64().expect("offset");
    assert_eq!(e["sizeBytes"], 8192);
    // Another process reads the daemon's bytes and writes new ones through the file.
    let script = format!(
        "import mmap,os,sys\nfd=os.open('{path}',os.O_RDWR)\nm=mmap.mmap(fd,0)\nsys.stdout.write(m[{offset}:{offset}+16].hex())\nm[{offset}+100:{offset}+105]=b'HELLO'\nm.flush()\n"
    );
    let out = std::process::Command::new("python3").arg("-c").arg(&script).output().expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hex: String = data[..16].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout), hex, "the other process read the daemon's bytes");
    assert_eq!(get(&s, &id, 100, 5), b"HELLO", "the daemon reads what the other process wrote");
    let (_, rec) = s.call("GET", &format!("/api/memory/allocation/{id}"), None);
    assert_eq!(rec["data"]["exported"], true);
    assert_eq!(rec["data"]["movable"], false, "exported allocations are never moved");
    let r = alloc(&s, json!({"sizeBytes": 10, "memoryType": "reservation"}));
    assert_error(
        &s.call("POST", &format!("/api/memory/allocations/{r}/export"), None),
        400,
        "INVALID_ARGUMENT",
        "reservation",
    );
}

#[test]
fn anonymous_host_memory_cannot_be_exported() {
    let mut config = Config::default();
    config.host.shared_memory_dir = "".into();
    let s = TestServer::start_with(config);
    let id = alloc(&s, json!({"sizeBytes": 4096}));
    assert_error(
        &s.call("POST", &format!("/api/memory/allocations/{id}/export"), None),
        409,
        "INVALID_OPERATION",
        "cannot be shared",
    );
    // Nothing of the failed export is left: not the mark, not the event, not the count.
    let (_, rec) = s.call("GET", &format!("/api/memory/allocation/{id}"), None);
    assert_eq!((rec["data"]["exported"].as_bool(), rec["data"]["movable"].as_bool()), (Some(false), Some(true)));
    let (_, ev) = s.call("GET", "/api/memory/analytics/events", None);
    let kinds: Vec<&str> =
        ev["data"]["events"].as_array().expect("events").iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds, ["allocated"]);
    let (_, a) = s.call("GET", "/api/memory/analytics?window=1m", None);
    let cpu = a["data"]["devices"].as_array().expect("devices").iter().find(|d| d["deviceId"] == "cpu").cloned();
    assert_eq!(cpu.expect("cpu")["activity"]["exports"], 0);
}
