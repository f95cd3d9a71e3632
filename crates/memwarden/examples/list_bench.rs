//! The cost of listing allocations when many are live: an in-process daemon on a loopback port
//! holds LIVE 4 KiB host allocations (50 owners, 10 purposes), and one keep-alive client times
//! `GET /api/memory/allocations`: its default answer, a page from the middle (when the answer
//! carries `nextCursor`), and a filtered page (one owner: 2% of them).
//!
//!   cargo run --release --example list_bench -- [LIVE] [ROUNDS]      # defaults 50000, 30
//!
//! Prints the median and p90 of each request and the answer's size.
mod support;

use memwarden::service::{AllocationFilter, ListPosition, Service};
use serde_json::Value;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a number")).collect();
    let live = args.first().copied().unwrap_or(50_000);
    let rounds = args.get(1).copied().unwrap_or(30);
    let (config, service) = support::filled_service(live);
    service_pages(&service, rounds);
    let (base, _stop) = support::serve(config, service.clone());
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let get = |path: &str| -> (Duration, usize, Value) {
        let start = Instant::now();
        let mut response = agent.get(format!("{base}{path}")).call().expect("GET");
        let body = response.body_mut().with_config().limit(u64::MAX).read_to_string().expect("body");
        let took = start.elapsed();
        (took, body.len(), serde_json::from_str(&body).expect("json"))
    };
    let time = |label: &str, path: &str| {
        let _ = get(path);
        let mut times = Vec::with_capacity(rounds);
        let mut size = 0;
        let mut items = 0;
        for _ in 0..rounds {
            let (took, len, v) = get(path);
            assert_eq!(v["success"], true, "{path}: {v}");
            times.push(took);
            size = len;
            items = v["data"]["allocations"].as_array().map_or(0, Vec::len);
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{label:<28} {items:>6} items {:>10} bytes   p50 {:>8.3} ms   p90 {:>8.3} ms",
            size,
            ms(times[rounds / 2]),
            ms(times[rounds * 9 / 10])
        );
    };
    println!("{live} live 4 KiB host allocations, {rounds} rounds each");
    time("default answer", "/api/memory/allocations");
    // The cursor 25 pages in, when the daemon pages at all.
    let mut cursor = get("/api/memory/allocations").2["data"]["nextCursor"].as_str().map(String::from);
    for _ in 0..24 {
        let Some(c) = cursor.as_deref() else { break };
        cursor = get(&format!("/api/memory/allocations?cursor={c}")).2["data"]["nextCursor"].as_str().map(String::from);
    }
    if let Some(c) = cursor {
        time("page 26 (cursor)", &format!("/api/memory/allocations?cursor={c}"));
        time("one owner (2%)", "/api/memory/allocations?owner=owner-7");
        time("limit=10000", "/api/memory/allocations?limit=10000");
    }
}

/// The service alone: a page of 1000 from the middle the way paging works (one pass, a bounded
/// heap), against cutting it out of the whole sorted listing (every record shared and sorted).
fn service_pages(service: &Service, rounds: usize) {
    let every = AllocationFilter::default();
    let middle =
        service.allocations(None).get(25_000.min(service.allocations(None).len() / 2)).map(|r| ListPosition::of(r));
    let median = |f: &dyn Fn() -> usize| {
        let mut times: Vec<Duration> = (0..rounds)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(f());
                start.elapsed()
            })
            .collect();
        times.sort();
        times[rounds / 2].as_secs_f64() * 1e3
    };
    let paged = median(&|| service.allocation_page(&every, middle.as_ref(), 1000).allocations.len());
    let sorted = median(&|| {
        let all = service.allocations(None);
        let from =
            middle.as_ref().map_or(0, |p| all.partition_point(|r| (r.allocated_at, &r.id) <= (p.allocated_at, &p.id)));
        all[from..].iter().take(1000).count()
    });
    let owner = AllocationFilter { owner: Some("owner-7".into()), ..AllocationFilter::default() };
    let filtered = median(&|| service.allocation_page(&owner, None, 1000).allocations.len());
    println!("service page of 1000 (middle): {paged:.3} ms; from the sorted whole listing: {sorted:.3} ms; one owner: {filtered:.3} ms (p50)");
}
