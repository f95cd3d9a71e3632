//! GPU benchmarks through memwarden's Rust API (the service layer the HTTP API calls), for
//! comparison with ../shared/tools/gpu_baseline.cu run in the same job:
//! - pool allocate + free pair on cuda:0 (1 MiB, served from a cached block);
//! - transfers H2D / D2H (pinned and pageable host memory) and D2D, 4 KiB to 4 GiB;
//! - peer copies when there are two GPUs.
//!
//!   cargo run --release --example gpu_bench [MAX_SIZE_BYTES]
//!
//! `MEMWARDEN_BENCH_DEVICE=vulkan:0` measures the Vulkan backend instead (`vulkan.nvidia =
//! "vulkan"`, so an NVIDIA GPU is served by Vulkan); `MEMWARDEN_BENCH_VULKAN_IMPORT=0` then
//! turns host import off (`vulkan.host_import = false`: copies through the staging buffer).
use memwarden::config::Config;
use memwarden::service::{AllocateRequest, Service, TransferRequest, TransferTarget};
use memwarden_core::MemoryKind;
use std::sync::Arc;
use std::time::Instant;

fn req(device: &str, size_bytes: u64, kind: Option<MemoryKind>) -> AllocateRequest {
    AllocateRequest {
        device: device.into(),
        size_bytes,
        kind,
        alignment_bytes: 256,
        purpose: Some("gpu-bench".into()),
        owner: None,
        owner_pid: None,
        owner_client: None,
        persistent: false,
        movable: true,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of one copy of `size` bytes from `src` to `dst`.
fn time_copy(s: &Arc<Service>, src: &str, dst: &str, size: u64) -> f64 {
    let one = || {
        let t = Instant::now();
        s.transfer(TransferRequest {
            source_id: src.into(),
            source_offset: 0,
            target: TransferTarget::Allocation { id: dst.into(), offset: 0 },
            size_bytes: Some(size),
            move_source: false,
        })
        .expect("transfer");
        t.elapsed().as_secs_f64()
    };
    one(); // warm
    let reps = ((0.3 / one().max(1e-6)) as usize).clamp(3, 2000);
    median((0..reps).map(|_| one()).collect())
}

fn main() {
    let max: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(4 << 30);
    let dev = std::env::var("MEMWARDEN_BENCH_DEVICE").unwrap_or_else(|_| "cuda:0".into());
    let dev = dev.as_str();
    let api = dev.split(':').next().unwrap_or("cuda").to_string() + ":";
    let mut config = Config::default();
    config.transfer.sync_max_bytes = u64::MAX;
    if api == "vulkan:" {
        config.vulkan.nvidia = memwarden::config::NvidiaOwner::Vulkan;
        config.vulkan.host_import = std::env::var("MEMWARDEN_BENCH_VULKAN_IMPORT").as_deref() != Ok("0");
    }
    let s = Arc::new(Service::from_config(&config));
    let gpus: Vec<String> = s.device_ids().iter().map(|d| d.to_string()).filter(|d| d.starts_with(&api)).collect();
    assert!(!gpus.is_empty(), "no {api} GPU: {:?}", s.backends());
    let st = s.status(dev.parse().expect("device id")).expect("status");
    let (access, queue) = (st.extra.get("hostAccess"), st.extra.get("blockCopyQueue"));
    println!("device {dev} {} ({} GPU(s)) host access {access:?}, block copies {queue:?}", st.name, gpus.len());

    // Pool allocate + free pair through the service (validation, budget, pool, ledger, id).
    let warm = s.allocate(req(dev, 1 << 20, None)).expect("warm");
    s.free(&warm.id).expect("free");
    let mut batches = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        for _ in 0..2000 {
            let a = s.allocate(req(dev, 1 << 20, None)).expect("allocate");
            s.free(&a.id).expect("free");
        }
        batches.push(t.elapsed().as_secs_f64() / 2000.0);
    }
    println!("service allocate+free 1 MiB on {dev} (pool hit): median {:.3} us per pair", median(batches) * 1e6);

    let pinned = s.allocate(req("cpu", max, Some(MemoryKind::Pinned))).expect("pinned host").id.clone();
    let pageable = s.allocate(req("cpu", 1 << 30, Some(MemoryKind::Host))).expect("pageable host").id.clone();
    let a = s.allocate(req(dev, max, None)).expect("device a").id.clone();
    let b = s.allocate(req(dev, max, None)).expect("device b").id.clone();
    println!("{:>12} {:>14} {:>14} {:>14}", "size", "H2D GB/s", "D2H GB/s", "D2D GB/s");
    let mut size = 4096u64;
    while size <= max {
        let h2d = size as f64 / time_copy(&s, &pinned, &a, size) / 1e9;
        let d2h = size as f64 / time_copy(&s, &a, &pinned, size) / 1e9;
        let d2d = size as f64 / time_copy(&s, &a, &b, size) / 1e9;
        println!("{size:>12} {h2d:>14.2} {d2h:>14.2} {d2d:>14.1}");
        size *= 4;
    }
    let g = 1u64 << 30;
    if max >= g {
        println!(
            "1 GiB pageable host: H2D {:.2} GB/s, D2H {:.2} GB/s",
            g as f64 / time_copy(&s, &pageable, &a, g) / 1e9,
            g as f64 / time_copy(&s, &a, &pageable, g) / 1e9
        );
    }
    if api == "cuda:" && gpus.len() >= 2 && max >= g {
        let c = s.allocate(req("cuda:1", g, None)).expect("device on cuda:1").id.clone();
        println!(
            "1 GiB peer cuda:0 -> cuda:1 {:.1} GB/s, cuda:1 -> cuda:0 {:.1} GB/s (peer access: {:?})",
            g as f64 / time_copy(&s, &a, &c, g) / 1e9,
            g as f64 / time_copy(&s, &c, &a, g) / 1e9,
            s.status(memwarden_core::DeviceId::cuda(0)).map(|st| st.extra).unwrap_or_default()
        );
    }
}
