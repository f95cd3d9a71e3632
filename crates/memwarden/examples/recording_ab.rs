//! A/B of the allocation path with recording on and off, interleaved so that machine noise hits
//! both alike: `cargo run --release -p memwarden --example recording_ab [rounds]`. Prints the
//! median time per allocate + free pair of each, over rounds of 200 000 pairs. (Criterion's
//! `benches/service.rs` measures each alone; on a noisy VM their medians drift by more than the
//! difference this looks for.) `LOG=N` sets the recording side's `analytics.event_log_size`
//! (0: counters and peaks only); `ONLY=on|off` runs one side, for profiling.
use memwarden::config::Config;
use memwarden::service::{AllocateRequest, Service};
use memwarden_core::MemoryKind;
use std::hint::black_box;
use std::time::Instant;

fn request(owner: bool) -> AllocateRequest {
    AllocateRequest {
        device: "cpu".into(),
        size_bytes: 65536,
        kind: Some(MemoryKind::Host),
        alignment_bytes: 256,
        purpose: Some("bench".into()),
        owner: owner.then(|| "bench-owner".to_string()),
        owner_pid: None,
        owner_client: None,
        persistent: false,
        movable: true,
    }
}

fn round(s: &Service, owner: bool, n: u32) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        let r = s.allocate(black_box(request(owner))).expect("allocate");
        s.free(&r.id).expect("free");
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(15);
    let mut c = Config::default();
    if let Some(n) = std::env::var("LOG").ok().and_then(|n| n.parse().ok()) {
        c.analytics.event_log_size = n;
    }
    let on = Service::from_config(&c);
    let mut config = Config::default();
    config.analytics.enabled = false;
    let off = Service::from_config(&config);
    for s in [&on, &off] {
        round(s, false, 50_000);
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    // ONLY=on or ONLY=off runs one side (for profiling).
    let only = std::env::var("ONLY").unwrap_or_default();
    for _ in 0..rounds {
        a.push(if only == "off" { 0.0 } else { round(&on, false, 200_000) });
        b.push(if only == "on" { 0.0 } else { round(&off, false, 200_000) });
    }
    let (on_ns, off_ns) = (median(a), median(b));
    println!(
        "allocate+free 64 KiB host pool hit: recording on {on_ns:.1} ns, off {off_ns:.1} ns, overhead {:.1} ns ({:.1} %)",
        on_ns - off_ns,
        (on_ns / off_ns - 1.0) * 100.0
    );
}
