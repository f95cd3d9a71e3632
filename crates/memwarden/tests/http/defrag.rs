//! Fragmentation metrics, the pool dump, "can I allocate N?", and defragmentation over HTTP on
//! host memory (the GPU run is in tests/gpu/gpu.rs).

use crate::common::{assert_error, random_bytes, TestServer};
use memwarden::config::Config;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// 8 MiB blocks, nothing dedicated below 8 MiB, each pool capped at two blocks.
fn capped() -> TestServer {
    let mut config = Config::default();
    config.pool.block_size_bytes = 8 * MIB;
    config.pool.dedicated_threshold_bytes = 8 * MIB;
    config.pool.max_pool_bytes = 16 * MIB;
    TestServer::start_with(config)
}

/// Sixteen 1 MiB allocations filling both blocks, every other one freed: 8 MiB free, in 1 MiB pieces.
fn fragment(s: &TestServer) -> Vec<String> {
    let ids: Vec<String> = (0..16).map(|_| s.alloc_on("cpu", json!({"sizeBytes": MIB}))).collect();
    for id in ids.iter().step_by(2) {
        assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
    }
    ids.into_iter().skip(1).step_by(2).collect()
}

fn host_pool(status: &Value) -> Value {
    status["pools"].as_array().expect("pools").iter().find(|p| p["memoryType"] == "host").expect("host pool").clone()
}

#[test]
fn a_fragmented_capped_pool_fails_then_fits_after_defragmentation() {
    let s = capped();
    let live = fragment(&s);
    for (i, id) in live.iter().enumerate() {
        s.put_data(id, 0, &random_bytes(MIB as usize, i as u64));
    }
    let (_, st) = s.call("GET", "/api/memory/status/cpu?canAllocate=4194304", None);
    let pool = host_pool(&st["data"]);
    assert_eq!(pool["freeInPoolBytes"], 8 * MIB);
    assert_eq!(pool["largestFreeBlock"], MIB);
    assert_eq!(pool["freeRangeCount"], 8);
    assert!((pool["fragmentation"].as_f64().expect("index") - 0.875).abs() < 1e-9);
    assert_eq!(st["data"]["canAllocate"]["fits"], "no");
    assert!(st["data"]["canAllocate"]["reason"].as_str().expect("reason").contains("capped"));
    assert_error(
        &s.call("POST", "/api/memory/allocations/allocate/cpu", Some(&json!({"sizeBytes": 4 * MIB}).to_string())),
        507,
        "INSUFFICIENT_MEMORY",
        "capped",
    );

    // The dump shows both blocks, alternating used and free, each used range with its allocation.
    let (status, dump) = s.call("GET", "/api/memory/pools/cpu", None);
    assert_eq!(status, 200);
    let pools = dump["data"]["pools"].as_array().expect("pools");
    let host = pools.iter().find(|p| p["memoryType"] == "host").expect("host");
    let blocks = host["blocks"].as_array().expect("blocks");
    assert_eq!(blocks.len(), 2);
    let used: Vec<&str> = blocks
        .iter()
        .flat_map(|b| b["ranges"].as_array().expect("ranges").iter())
        .filter(|r| r["free"] == false)
        .map(|r| r["allocationId"].as_str().expect("id of a used range"))
        .collect();
    assert_eq!(used.len(), 8);
    assert!(live.iter().all(|id| used.contains(&id.as_str())));

    let (status, r) = s.call("POST", "/api/memory/operations/defragment/cpu", Some(r#"{"strategy": "quick"}"#));
    assert_eq!(status, 200, "{r}");
    let r = &r["data"];
    assert_eq!(r["strategy"], "quick");
    assert_eq!(r["allocationsMoved"], 4);
    assert_eq!(r["bytesMoved"], 4 * MIB);
    assert_eq!(r["blocksReleased"], 1);
    assert_eq!(r["bytesReleased"], 8 * MIB);
    assert_eq!(r["largestFreeBlockBefore"], MIB);
    assert_eq!(r["fragmentationAfter"], 0.0);
    assert!(r["durationMs"].as_f64().expect("ms") >= 0.0);

    let (_, st) = s.call("GET", "/api/memory/status/cpu?canAllocate=4194304&memoryType=host", None);
    assert_eq!(st["data"]["canAllocate"]["fits"], "newMemory");
    let (status, v) =
        s.call("POST", "/api/memory/allocations/allocate/cpu", Some(&json!({"sizeBytes": 4 * MIB}).to_string()));
    assert_eq!(status, 201, "the same allocation now fits: {v}");
    // Every byte survived the moves, and moved allocations have a new generation.
    let mut moved = 0;
    for (i, id) in live.iter().enumerate() {
        assert!(s.get_data(id, 0, MIB) == random_bytes(MIB as usize, i as u64), "allocation {i} changed");
        let (_, rec) = s.call("GET", &format!("/api/memory/allocation/{id}"), None);
        moved += (rec["data"]["generation"].as_u64().expect("generation") > 0) as usize;
    }
    assert_eq!(moved, 4);
    s.service.validate().expect("ledger matches pools");
}

#[test]
fn defragment_every_device_and_bad_inputs() {
    let s = capped();
    fragment(&s);
    let (status, r) = s.call("POST", "/api/memory/operations/defragment", None);
    assert_eq!(status, 200, "no body: defaults (balanced)");
    assert_eq!(r["data"]["devices"][0]["deviceId"], "cpu");
    assert_eq!(r["data"]["devices"][0]["strategy"], "balanced");
    assert_eq!(r["data"]["bytesReleased"], 8 * MIB);
    let path = "/api/memory/operations/defragment/cpu";
    for (body, needle) in [
        (r#"{"strategy": "tidy"}"#, "strategy"),
        (r#"{"strategy": 3}"#, "strategy"),
        (r#"{"maxTimeMs": "soon"}"#, "maxTimeMs"),
        (r#"{"maxBytesToMove": -1}"#, "maxBytesToMove"),
        (r#"{"maxAllocationsToMove": 1.5}"#, "maxAllocationsToMove"),
        ("{not json", "not valid JSON"),
    ] {
        assert_error(&s.call("POST", path, Some(body)), 400, "INVALID_ARGUMENT", needle);
    }
    assert_error(&s.call("POST", "/api/memory/operations/defragment/tpu:99", None), 404, "DEVICE_NOT_FOUND", "cpu");
    assert_error(&s.call("GET", "/api/memory/pools/tpu:99", None), 404, "DEVICE_NOT_FOUND", "cpu");
    assert_error(
        &s.call("GET", "/api/memory/status/cpu?canAllocate=lots", None),
        400,
        "INVALID_ARGUMENT",
        "canAllocate",
    );
    assert_error(&s.call("GET", "/api/memory/status/cpu?canAllocate=0", None), 400, "INVALID_ARGUMENT", "canAllocate");
    assert_error(
        &s.call("GET", "/api/memory/status/cpu?canAllocate=1&memoryType=vram", None),
        400,
        "INVALID_ARGUMENT",
        "memoryType",
    );
    let (_, st) = s.call("GET", "/api/memory/status/cpu?canAllocate=1024&memoryType=reservation", None);
    assert_eq!(st["data"]["canAllocate"]["fits"], "budget");
    let (_, st) = s.call("GET", "/api/memory/status/cpu", None);
    assert!(st["data"].get("canAllocate").is_none(), "only when asked");
    let (status, all) = s.call("GET", "/api/memory/pools", None);
    assert_eq!(status, 200);
    assert_eq!(all["data"]["devices"][0]["deviceId"], "cpu");
    s.service.validate().expect("valid");
}

/// The issue-22 case on the default pool (64 MiB blocks): 256 movable 4 MiB allocations, every
/// other one freed, then a thorough pass on an idle daemon. A thorough plan moves some
/// allocations twice (compact, then evacuate); the pass must carry all of it out, keep every
/// byte, and give the emptied half of the pool back.
#[test]
fn a_thorough_pass_on_an_idle_pool_finishes_its_plan() {
    // A GiB committed: not beside the pressure test.
    let _quiet = crate::common::machine_memory();
    let s = TestServer::start_with(Config::default());
    let ids: Vec<String> =
        (0..256).map(|_| s.alloc_on("cpu", json!({"sizeBytes": 4 * MIB, "movable": true}))).collect();
    for id in ids.iter().step_by(2) {
        assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
    }
    let live: Vec<String> = ids.into_iter().skip(1).step_by(2).collect();
    for (i, id) in live.iter().enumerate() {
        s.put_data(id, 0, &random_bytes(4 * MIB as usize, 1000 + i as u64));
    }
    let (status, r) = s.call("POST", "/api/memory/operations/defragment/cpu", Some(r#"{"strategy": "thorough"}"#));
    assert_eq!(status, 200, "{r}");
    let r = &r["data"];
    assert_eq!(r["movesSkipped"], 0, "{r}");
    assert!(r["error"].is_null(), "{r}");
    assert_eq!(r["fragmentationAfter"], 0.0, "{r}");
    assert_eq!(r["blocksReleased"], 8, "{r}");
    assert_eq!(r["bytesReleased"], 512 * MIB, "{r}");
    for (i, id) in live.iter().enumerate() {
        assert!(
            s.get_data(id, 0, 4 * MIB) == random_bytes(4 * MIB as usize, 1000 + i as u64),
            "allocation {i} changed"
        );
    }
    let (_, st) = s.call("GET", "/api/memory/status/cpu", None);
    let pool = host_pool(&st["data"]);
    assert_eq!(pool["reservedBytes"], 512 * MIB, "{pool}");
    s.service.validate().expect("ledger matches pools");
}
