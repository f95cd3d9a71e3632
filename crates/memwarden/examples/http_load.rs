//! HTTP load: allocate + free pairs over loopback against a running daemon, one keep-alive
//! connection per client thread. Prints latency percentiles of the pair and the throughput.
//!
//!   cargo run --release --example http_load -- [URL] [PAIRS] [THREADS] [SIZE_BYTES]
//!
//! `scripts/bench-http` starts a release daemon on a free port and runs this against it.
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).cloned().unwrap_or_else(|| "http://127.0.0.1:5000".into());
    let pairs: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let threads: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1);
    let size: u64 = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(65536);
    let body = format!(r#"{{"sizeBytes": {size}, "memoryType": "host", "purpose": "http-load"}}"#);

    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                let alloc_url = format!("{url}/api/memory/allocations/allocate/cpu");
                let mut samples = Vec::with_capacity(pairs);
                for i in 0..pairs + pairs / 10 {
                    let t = Instant::now();
                    let mut resp = agent
                        .post(&alloc_url)
                        .header("content-type", "application/json")
                        .send(&body)
                        .expect("allocate request");
                    let v: serde_json::Value = resp.body_mut().read_json().expect("allocate json");
                    let id = v["data"]["allocationId"].as_str().unwrap_or_else(|| panic!("allocate failed: {v}"));
                    let mut resp =
                        agent.delete(&format!("{url}/api/memory/allocations/{id}")).call().expect("free request");
                    assert_eq!(resp.status().as_u16(), 200, "free failed");
                    let _ = resp.body_mut().read_to_string();
                    // The first 10% warm the connection and the pool.
                    if i >= pairs / 10 {
                        samples.push(t.elapsed());
                    }
                }
                samples
            })
        })
        .collect();
    let mut all: Vec<Duration> = handles.into_iter().flat_map(|h| h.join().expect("thread")).collect();
    let wall = started.elapsed();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    println!(
        "http allocate+free pair, {size} B host, {threads} thread(s), {} pairs: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, {:.0} pairs/s",
        all.len(),
        pct(0.50).as_secs_f64() * 1e6,
        pct(0.90).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        (all.len() as f64) / wall.as_secs_f64(),
    );
}
