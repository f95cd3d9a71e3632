//! Does a defragmentation pass stall the other devices? (issue 15, item 7.) One thread
//! allocates and frees 4 KiB on `cpu`, a pair every 100 µs, and times each from when it was
//! due; another thread
//! fragments a second device and defragments it, over and over. Prints the pair's p50, p99 and
//! worst with the passes running and without them.
//!
//!   cargo run --release --example defrag_stall -- [SECONDS] [FRAGMENTED_MIB]
//!
//! The second device is `cuda:0` where this machine has one. Elsewhere it is host memory under
//! a second device id (the testkit's `SimulatedBackend::host_memory`; the dev VM has one device
//! only): its copies are real memcpys, so the passes take real time, and the stall they cause is
//! what the locks make of it.
use memwarden::config::Config;
use memwarden::service::{AllocateRequest, Limits, Service};
use memwarden_backends::{HostBackend, HostStatusReader};
use memwarden_core::defrag::{DefragOptions, DefragStrategy};
use memwarden_core::{DeviceId, GpuApi, PoolConfig};
use memwarden_testkit::SimulatedBackend;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn service() -> (Arc<Service>, DeviceId) {
    let mut config = Config::default();
    config.workers.enabled = false;
    let real = Service::from_config(&config);
    if real.device_ids().contains(&DeviceId::cuda(0)) {
        return (Arc::new(real), DeviceId::cuda(0));
    }
    let id = DeviceId::Gpu(GpuApi::Vulkan, 0);
    let second = SimulatedBackend::host_memory(id).named("host memory under a second id");
    let pool = PoolConfig {
        block_size_bytes: config.pool.block_size_bytes,
        dedicated_threshold_bytes: config.pool.dedicated_threshold_bytes,
        ..PoolConfig::default()
    };
    let host = Arc::new(HostBackend::new(HostStatusReader::default()));
    (Arc::new(Service::with_backends(vec![host, Arc::new(second)], pool, Limits::default())), id)
}

/// `total_mib` of 1 MiB allocations on `device`, every other one freed.
fn fragment(s: &Service, device: DeviceId, total_mib: u64) -> Vec<String> {
    let ids: Vec<String> = (0..total_mib)
        .map(|_| {
            s.allocate(AllocateRequest { movable: true, ..AllocateRequest::new(device, MIB) })
                .expect("allocate on the fragmented device")
                .id
                .clone()
        })
        .collect();
    for id in ids.iter().step_by(2) {
        s.free(id).expect("free");
    }
    ids.into_iter().skip(1).step_by(2).collect()
}

/// Allocate+free pairs of 4 KiB on `cpu`, one due every `INTERVAL`, for `seconds`: each
/// pair's time from when it was due to when it finished, sorted. Timing from the due time
/// (an open loop) counts every pair a stall held back, not only the one caught in it.
fn pairs(s: &Service, seconds: f64) -> Vec<Duration> {
    const INTERVAL: Duration = Duration::from_micros(100);
    let mut times = Vec::new();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut due = start;
    while due < end {
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        let a = s.allocate(AllocateRequest::new("cpu", 4096)).expect("allocate on cpu");
        s.free(&a.id).expect("free on cpu");
        times.push(due.elapsed());
        due += INTERVAL;
    }
    times.sort();
    times
}

fn show(label: &str, times: &[Duration]) {
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)].as_secs_f64() * 1e6;
    println!(
        "{label:<34} pairs {:>9}   p50 {:>8.1} µs   p99 {:>9.1} µs   max {:>10.1} µs",
        times.len(),
        at(0.5),
        at(0.99),
        times.last().map(|d| d.as_secs_f64() * 1e6).unwrap_or(0.0)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = args.get(1).map(|a| a.parse().expect("seconds")).unwrap_or(3.0);
    let fragmented_mib: u64 = args.get(2).map(|a| a.parse().expect("MiB")).unwrap_or(1024);
    let (s, second) = service();
    println!("allocate+free 4 KiB on cpu while {second} is defragmented ({fragmented_mib} MiB fragmented per pass)");
    show("alone", &pairs(&s, seconds));

    let stop = Arc::new(AtomicBool::new(false));
    let passes = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut n, mut moved, mut busy) = (0u32, 0u64, Duration::ZERO);
            let options = DefragOptions {
                strategy: DefragStrategy::Quick,
                max_bytes_to_move: u64::MAX,
                max_allocations_to_move: usize::MAX,
            };
            while !stop.load(Ordering::SeqCst) {
                let live = fragment(&s, second, fragmented_mib);
                let t = Instant::now();
                let report = s.defragment(second, options, None).expect("defragment");
                busy += t.elapsed();
                moved += report.bytes_moved;
                n += 1;
                for id in &live {
                    s.free(id).expect("free");
                }
            }
            (n, moved, busy)
        })
    };
    let during = pairs(&s, seconds);
    stop.store(true, Ordering::SeqCst);
    let (n, moved, busy) = passes.join().expect("passes");
    show("while the other device defragments", &during);
    println!(
        "{n} passes moved {:.1} GiB in {:.2} s of passes ({:.1} ms each)",
        moved as f64 / (1u64 << 30) as f64,
        busy.as_secs_f64(),
        busy.as_secs_f64() * 1e3 / n.max(1) as f64
    );
}
