//! The Vulkan backend over HTTP on Mesa's lavapipe (a CPU Vulkan driver: `scripts/test` installs
//! it where it is missing, and CI has it), served because `vulkan.include_software = true`.

use crate::common::{random_bytes, tempdir, TestServer};
use memwarden::config::Config;
use serde_json::{json, Value};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

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
    // HTTP cannot carry the opaque fd: refused with the way that can, and still movable.
    crate::common::assert_error(
        &s.call("POST", &format!("/api/memory/allocations/{dev}/export"), None),
        409,
        "INVALID_OPERATION",
        "Unix socket",
    );
    let (_, rec) = s.call("GET", &format!("/api/memory/allocation/{dev}"), None);
    assert_eq!(rec["data"]["exported"], false, "a refused export leaves the allocation as it was: {rec}");

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

/// A protocol-v2 peer of the daemon's socket written in Rust: says hello, asks `export` of
/// `allocation_id`, and returns the reply and the descriptors that came before and with it.
fn export_over_socket(socket: &Path, allocation_id: &str) -> (Value, Vec<OwnedFd>) {
    let mut stream = UnixStream::connect(socket).expect("connect to the daemon's socket");
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).expect("timeout");
    let hello = json!({"type": "hello", "protocolVersion": 2, "workerId": "vk-importer", "pid": std::process::id(),
                       "role": "client", "frameworks": {}, "devices": ["cpu"]});
    let request = json!({"requestId": "c1", "action": "export", "data": {"allocationId": allocation_id}});
    write!(stream, "{hello}\n{request}\n").expect("send");
    let (mut pending, mut fds) = (Vec::new(), Vec::new());
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let (n, got) = memwarden_sys::recv_with_fds(stream.as_fd(), &mut buf).expect("receive");
        assert!(n > 0, "the daemon closed the socket before replying");
        fds.extend(got);
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let v: Value = serde_json::from_slice(&line).expect("a JSON line");
            if v["requestId"] == "c1" {
                return (v, fds);
            }
        }
    }
}

/// The importing process of the test below (run by it as a child; skipped otherwise): asks
/// the daemon for the export over the socket, imports the fd on the physical device with the
/// UUID given, prints the hash of the allocation's bytes and writes 0xa5 over its first 4 KiB.
#[test]
#[ignore = "run as a child process by a_vulkan_allocation_exported_over_the_socket_is_mapped_by_another_process"]
fn vulkan_import_child() {
    use memwarden_sys::vulkan::{ExportedMemory, HostAccess, VulkanDevice, VulkanInstance};
    let socket = std::env::var("MW_VK_SOCKET").expect("MW_VK_SOCKET");
    let id = std::env::var("MW_VK_ALLOCATION").expect("MW_VK_ALLOCATION");
    let (reply, mut fds) = export_over_socket(Path::new(&socket), &id);
    assert_eq!(reply["success"], true, "{reply}");
    let d = &reply["data"];
    assert_eq!(d["kind"], "vulkanOpaqueFd", "{d}");
    assert_eq!((reply["fds"].as_u64(), fds.len()), (Some(1), 1), "one descriptor with the reply: {reply}");
    let field = |k: &str| d[k].as_u64().unwrap_or_else(|| panic!("{k} in {d}"));
    let (offset, size) = (field("offset"), field("sizeBytes"));
    let instance = VulkanInstance::new(None).expect("a Vulkan loader and driver");
    let devices = instance.physical_devices().expect("devices");
    let same = devices.iter().find(|p| p.uuid_string() == d["deviceUuid"]).expect("the exporting device's UUID here");
    let dev = VulkanDevice::open(&instance, same.index, HostAccess::Staged).expect("open");
    let exported = ExportedMemory {
        fd: fds.remove(0),
        allocation_bytes: field("allocationBytes"),
        memory_type_index: field("memoryTypeIndex") as u32,
        dedicated: d["dedicated"] == true,
        buffer_bytes: field("bufferBytes"),
    };
    let memory = dev.import_fd(exported, offset + size).expect("import the opaque fd");
    let mut bytes = vec![0u8; size as usize];
    memory.read(offset, &mut bytes).expect("read the import");
    memory.write(offset, &[0xa5; 4096]).expect("write through the import");
    println!("{}", json!({"hash": blake3::hash(&bytes).to_hex().to_string()}));
}

/// An allocation of `size` on `device` written over HTTP, exported over the socket to another
/// process (this binary's `vulkan_import_child`) that imports it, reads it and writes 0xa5 over
/// its first 4 KiB: the bytes compared both ways, and the allocation marked exported.
fn export_round_trip(s: &TestServer, socket: &Path, device: &str, size: u64) {
    let id = s.alloc_on(device, json!({"sizeBytes": size}));
    let data = random_bytes(size as usize, 17);
    for (i, chunk) in data.chunks(32 * MIB as usize).enumerate() {
        s.put_data(&id, i as u64 * 32 * MIB, chunk);
    }
    let out = std::process::Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--ignored", "--exact", "vulkan::vulkan_import_child", "--nocapture", "--test-threads=1"])
        .env("MW_VK_SOCKET", socket)
        .env("MW_VK_ALLOCATION", &id)
        .output()
        .expect("run the importing process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the importer failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let at = stdout.find("{\"hash\"").unwrap_or_else(|| panic!("no hash in:\n{stdout}"));
    let line = stdout[at..].lines().next().unwrap_or_default();
    let got: Value = serde_json::from_str(line).expect("json");
    assert_eq!(got["hash"], blake3::hash(&data).to_hex().to_string(), "the importer read other bytes");
    assert!(s.get_data(&id, 0, 4096) == vec![0xa5; 4096], "the importer's write is not in the allocation");
    assert!(s.get_data(&id, 4096, MIB - 4096) == data[4096..MIB as usize], "bytes past the importer's write changed");
    let (_, rec) = s.call("GET", &format!("/api/memory/allocation/{id}"), None);
    assert_eq!(rec["data"]["exported"], true, "an exported allocation is never moved: {rec}");
    assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
}

/// A daemon with its client socket at `socket` and `config`'s Vulkan settings.
fn with_socket(mut config: Config, socket: &Path) -> TestServer {
    config.workers.enabled = false;
    config.workers.socket = socket.display().to_string();
    TestServer::start_with_workers(config)
}

/// Issue 17: Vulkan memory exported as an opaque fd (`VK_KHR_external_memory_fd`) in a
/// protocol-v2 reply on the Unix socket. Another process imports it and reads the bytes written
/// over HTTP; what it writes through the import is what HTTP then reads.
#[test]
fn a_vulkan_allocation_exported_over_the_socket_is_mapped_by_another_process() {
    let dir = tempdir("vk-export");
    let socket = dir.join("mw.sock");
    let mut config = Config::default();
    config.vulkan.include_software = true;
    let s = with_socket(config, &socket);
    export_round_trip(&s, &socket, "vulkan:0", MIB);
    // An unknown allocation is refused over the socket as over HTTP.
    let (reply, fds) = export_over_socket(&socket, "no-such-allocation");
    assert_eq!(
        (reply["success"].as_bool(), reply["error"]["code"].as_str()),
        (Some(false), Some("ALLOCATION_NOT_FOUND")),
        "{reply}"
    );
    assert!(fds.is_empty());
}

/// On an NVIDIA GPU (the GPU machine; `hw-tests`), served by Vulkan with `vulkan.nvidia =
/// "vulkan"` through NVIDIA's Vulkan driver. Fails, not skips, without one.
#[cfg(feature = "hw-tests")]
mod nvidia {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn config() -> Config {
        let mut config = Config::default();
        config.vulkan.nvidia = memwarden::config::NvidiaOwner::Vulkan;
        config
    }

    /// `nvidia-smi --query-gpu=FIELDS` of GPU 0, one value per field.
    fn smi(fields: &str) -> Vec<String> {
        let out = std::process::Command::new("nvidia-smi")
            .args([format!("--query-gpu={fields}").as_str(), "--format=csv,noheader,nounits", "-i", "0"])
            .output()
            .expect("nvidia-smi");
        assert!(out.status.success(), "nvidia-smi: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).split(',').map(|f| f.trim().to_string()).collect()
    }

    fn smi_mib(field: &str) -> u64 {
        smi(field)[0].parse::<u64>().expect("MiB") * MIB
    }

    fn status(s: &TestServer) -> Value {
        let (code, v) = s.call("GET", "/api/memory/status/vulkan:0", None);
        assert_eq!(code, 200, "{v}");
        v["data"].clone()
    }

    #[test]
    fn the_nvidia_gpu_is_vulkan_0_and_its_status_agrees_with_nvidia_smi() {
        let s = TestServer::start_with(config());
        let d = status(&s);
        println!("vulkan:0 status: {d}");
        let smi_uuid = smi("uuid")[0].clone();
        assert_eq!(d["uuid"], smi_uuid.as_str(), "the same GPU: {d}");
        assert_eq!(d["vendor"], "NVIDIA");
        assert!(d["sameGpuAs"].as_str().is_some_and(|t| t.starts_with("cuda:0")), "linked to cuda:0: {d}");
        assert_eq!(d["source"], "vk-memory-budget", "{d}");
        let (smi_total, smi_used) = (smi_mib("memory.total"), smi_mib("memory.used"));
        let total = d["totalMemory"].as_u64().expect("total");
        let used = total - d["availableMemory"].as_u64().expect("available");
        let one_percent = smi_total / 100;
        println!("total: vulkan {total}, nvidia-smi {smi_total}; used: vulkan {used}, nvidia-smi {smi_used}");
        assert!(total.abs_diff(smi_total) <= one_percent, "total {total} vs nvidia-smi {smi_total}");
        assert!(used.abs_diff(smi_used) <= one_percent, "used {used} vs nvidia-smi {smi_used}");
        // The CUDA id of the same GPU says where it went.
        crate::common::assert_error(
            &s.call("GET", "/api/memory/status/cuda:0", None),
            503,
            "BACKEND_UNAVAILABLE",
            "vulkan",
        );
    }

    #[test]
    fn a_4_gib_allocation_on_vulkan_0_shows_in_nvidia_smi_and_goes_with_clear() {
        let s = TestServer::start_with(config());
        let before = smi_mib("memory.used");
        let id = s.alloc_on("vulkan:0", json!({"sizeBytes": 4 * GIB}));
        let during = smi_mib("memory.used");
        println!("nvidia-smi used: before {before}, with 4 GiB on vulkan:0 {during}");
        let grown = during.saturating_sub(before);
        assert!((4 * GIB - 64 * MIB..=4 * GIB + 512 * MIB).contains(&grown), "nvidia-smi grew by {grown}");
        let used = status(&s)["totalMemory"].as_u64().expect("t") - status(&s)["availableMemory"].as_u64().expect("a");
        assert!(used.abs_diff(during) <= smi_mib("memory.total") / 100, "status used {used} vs nvidia-smi {during}");
        assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
        assert_eq!(s.call("POST", "/api/memory/operations/clear/vulkan:0", None).0, 200);
        let after = smi_mib("memory.used");
        assert!(after <= before + 64 * MIB, "nvidia-smi used {after} after clear, {before} before");
    }

    /// Host → vulkan → host through the imported host pages (the copy engine on the host
    /// block), at offsets off the import alignment; and vulkan → vulkan.
    #[test]
    fn bytes_cross_host_and_vulkan_0_through_imported_host_memory() {
        let mut config = config();
        config.transfer.sync_max_bytes = u64::MAX; // answered when done, not 202
        let s = TestServer::start_with(config);
        let d = status(&s);
        assert_eq!(d["hostAccess"], "imported", "NVIDIA's driver imports host memory: {d}");
        let size = 96 * MIB;
        // Pinned: imported whole on its first copy and kept.
        let host = s.alloc_on("cpu", json!({"sizeBytes": size + 8192, "memoryType": "pinned"}));
        let data = random_bytes(size as usize, 5);
        for (i, chunk) in data.chunks(32 * MIB as usize).enumerate() {
            s.put_data(&host, 4097 + i as u64 * 32 * MIB, chunk);
        }
        let dev = s.alloc_on("vulkan:0", json!({"sizeBytes": size + 4096}));
        let body = json!({"sourceAllocationId": host, "sourceOffset": 4097, "destinationAllocationId": dev,
                          "destinationOffset": 100, "sizeBytes": size});
        let (code, v) = s.call("POST", "/api/memory/copy", Some(&body.to_string()));
        assert_eq!(code, 200, "{v}");
        let other = s.alloc_on("vulkan:0", json!({"sizeBytes": size}));
        let body = json!({"sourceAllocationId": dev, "sourceOffset": 100, "destinationAllocationId": other,
                          "destinationOffset": 0, "sizeBytes": size});
        assert_eq!(s.call("POST", "/api/memory/copy", Some(&body.to_string())).0, 200);
        let body = json!({"sourceAllocationId": other, "targetDeviceId": "cpu", "transferType": "copy"});
        let (code, v) = s.call("POST", "/api/memory/transfer", Some(&body.to_string()));
        assert_eq!(code, 200, "{v}");
        let back = v["data"]["destinationAllocationId"].as_str().expect("id").to_string();
        for i in 0..3u64 {
            let want = &data[(i * 32 * MIB) as usize..((i + 1) * 32 * MIB) as usize];
            assert!(s.get_data(&back, i * 32 * MIB, 32 * MIB) == want, "chunk {i} differs after the round trip");
        }
    }

    #[test]
    fn nvidia_vulkan_memory_exported_over_the_socket_is_mapped_by_another_process() {
        let dir = tempdir("vk-export-nv");
        let socket = dir.join("mw.sock");
        let s = with_socket(config(), &socket);
        export_round_trip(&s, &socket, "vulkan:0", 64 * MIB);
    }
}
