//! The Vulkan backend over HTTP on Mesa's lavapipe (a CPU Vulkan driver: `scripts/test` installs
//! it where it is missing, and CI has it), served because `vulkan.include_software = true`.

mod common;

use common::{random_bytes, TestServer};
use memwarden::config::Config;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// lavapipe served as `vulkan:0`, 8 MiB blocks, nothing dedicated below 8 MiB.
fn with_lavapipe() -> TestServer {
    let mut config = Config::default();
    config.vulkan.include_software = true;
    config.pool.block_size_bytes = 8 * MIB;
    config.pool.dedicated_threshold_bytes = 8 * MIB;
    TestServer::start_with(config)
}

fn backend(s: &TestServer, name: &str) -> Value {
    let (status, h) = s.call("GET", "/health", None);
    assert_eq!(status, 200, "{h}");
    h["data"]["backends"].as_array().expect("backends").iter().find(|b| b["name"] == name).expect("listed").clone()
}

#[test]
fn lavapipe_is_vulkan_0_with_its_status_and_gpu_0_names_it() {
    let s = with_lavapipe();
    let vk = backend(&s, "vulkan");
    assert_eq!(vk["available"], true, "{vk}");
    assert_eq!(vk["devices"][0], "vulkan:0");
    let (status, v) = s.call("GET", "/api/memory/status/vulkan:0", None);
    assert_eq!(status, 200, "{v}");
    let d = &v["data"];
    assert_eq!(d["deviceId"], "vulkan:0");
    assert!(["vk-memory-budget", "vk-heap-size"].contains(&d["source"].as_str().expect("source")), "{d}");
    let total = d["totalMemory"].as_u64().expect("total");
    assert!(total > 0 && d["availableMemory"].as_u64().expect("available") <= total, "{d}");
    assert!(d["uuid"].as_str().is_some_and(|u| u.starts_with("GPU-")), "{d}");
    assert_eq!(d["vendor"], "Mesa", "{d}");
    assert_eq!(d["physicalDeviceType"], "cpu");
    assert!(d["driver"].as_str().is_some_and(|n| n.contains("llvmpipe")), "{d}");
    assert!(d.get("computeCapability").is_none_or(Value::is_null), "no CUDA fields for a Vulkan device: {d}");
    // No CUDA here: the seed's gpu:N alias names the Vulkan GPU.
    let (status, v) = s.call("GET", "/api/memory/status/gpu:0", None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["deviceId"], "vulkan:0");
}

#[test]
fn device_memory_holds_data_across_transfers_defragmentation_free_and_clear() {
    let s = with_lavapipe();
    // Eight 1 MiB allocations share one 8 MiB block; every other one is freed.
    let ids: Vec<String> = (0..8).map(|_| s.alloc_on("vulkan:0", json!({"sizeBytes": MIB}))).collect();
    let (_, rec) = s.call("GET", &format!("/api/memory/allocation/{}", ids[0]), None);
    assert_eq!(rec["data"]["memoryType"], "device");
    for id in ids.iter().step_by(2) {
        assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
    }
    let live: Vec<String> = ids.into_iter().skip(1).step_by(2).collect();
    for (i, id) in live.iter().enumerate() {
        s.put_data(id, 0, &random_bytes(MIB as usize, i as u64));
    }
    // host → vulkan (a copy into a live allocation) → host (a transfer to a new allocation).
    let host = s.alloc_on("cpu", json!({"sizeBytes": MIB}));
    let data = random_bytes(MIB as usize, 77);
    s.put_data(&host, 0, &data);
    let dev = s.alloc_on("vulkan:0", json!({"sizeBytes": 2 * MIB}));
    let body = json!({"sourceAllocationId": host, "sourceOffset": 0, "destinationAllocationId": dev,
                      "destinationOffset": 4096, "sizeBytes": MIB});
    let (status, v) = s.call("POST", "/api/memory/copy", Some(&body.to_string()));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["status"], "completed");
    assert!(s.get_data(&dev, 4096, MIB) == data, "host -> vulkan bytes differ");
    let body = json!({"sourceAllocationId": dev, "targetDeviceId": "cpu", "transferType": "copy"});
    let (status, v) = s.call("POST", "/api/memory/transfer", Some(&body.to_string()));
    assert_eq!(status, 200, "{v}");
    let back = v["data"]["destinationAllocationId"].as_str().expect("new id").to_string();
    assert!(s.get_data(&back, 4096, MIB) == data, "vulkan -> host bytes differ");
    // Not shareable (yet): refused with the reason.
    common::assert_error(
        &s.call("POST", &format!("/api/memory/allocations/{dev}/export"), None),
        409,
        "INVALID_OPERATION",
        "cannot be exported",
    );

    let (status, r) = s.call("POST", "/api/memory/operations/defragment/vulkan:0", Some(r#"{"strategy": "thorough"}"#));
    assert_eq!(status, 200, "{r}");
    assert!(r["data"]["allocationsMoved"].as_u64().expect("moved") > 0, "{r}");
    for (i, id) in live.iter().enumerate() {
        assert!(s.get_data(id, 0, MIB) == random_bytes(MIB as usize, i as u64), "allocation {i} changed");
    }
    assert!(s.get_data(&dev, 4096, MIB) == data, "the copied allocation changed");
    s.service.validate().expect("ledger matches pools");

    for id in live.iter().chain([&dev, &back, &host]) {
        assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200, "free {id}");
    }
    let (status, c) = s.call("POST", "/api/memory/operations/clear/vulkan:0", None);
    assert_eq!(status, 200, "{c}");
    assert!(c["data"]["clearedBytes"].as_u64().expect("cleared") >= 8 * MIB, "{c}");
    let (_, st) = s.call("GET", "/api/memory/status/vulkan:0", None);
    assert_eq!(st["data"]["reservedBytes"], 0, "{st}");
}

#[test]
fn a_missing_loader_leaves_vulkan_unavailable_with_the_reason_and_nothing_else_changes() {
    let mut config = Config::default();
    config.vulkan.include_software = true;
    config.vulkan.loader = "/nonexistent/libvulkan.so.1".into();
    let s = TestServer::start_with(config);
    let vk = backend(&s, "vulkan");
    assert_eq!(vk["available"], false, "{vk}");
    assert!(vk["reason"].as_str().is_some_and(|r| r.contains("no Vulkan loader")), "{vk}");
    assert_eq!(backend(&s, "host")["available"], true);
    let (status, _) = s.call("GET", "/api/memory/status/cpu", None);
    assert_eq!(status, 200);
    let (status, v) = s.call("GET", "/api/memory/status/vulkan:0", None);
    assert_eq!(status, 503, "{v}");
}
