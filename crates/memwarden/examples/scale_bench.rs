//! How the read routes' cost grows with the number of live allocations (issue 15, item 7): an
//! in-process daemon on a loopback port holds LIVE 4 KiB host allocations (50 owners, 10
//! purposes); one keep-alive client times `GET /api/memory/status`, `GET /api/memory/analytics`,
//! `GET /metrics` and an allocate+free pair, at each size given.
//!
//!   cargo run --release --example scale_bench -- [LIVE...]      # default 1000 10000 100000
//!
//! Prints the median and p90 of each, over 30 rounds.
mod support;

use std::time::{Duration, Instant};

const ROUNDS: usize = 30;

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a number")).collect();
    let sizes = if sizes.is_empty() { vec![1_000, 10_000, 100_000] } else { sizes };
    for live in sizes {
        run(live);
    }
}

fn run(live: usize) {
    let (config, service) = support::filled_service(live);
    let (base, stop) = support::serve(config, service);
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let request = |method: &str, path: &str| -> (u16, String) {
        let url = format!("{base}{path}");
        let mut response = match method {
            "GET" => agent.get(&url).call(),
            "DELETE" => agent.delete(&url).call(),
            _ => agent.post(&url).header("content-type", "application/json").send(r#"{"sizeBytes": 4096}"#),
        }
        .expect("request");
        let status = response.status().as_u16();
        (status, response.body_mut().with_config().limit(u64::MAX).read_to_string().expect("body"))
    };
    let report = |label: &str, f: &dyn Fn()| {
        f();
        let mut times: Vec<Duration> = (0..ROUNDS)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect();
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{live:>7} live  {label:<22} p50 {:>8.3} ms   p90 {:>8.3} ms",
            ms(times[ROUNDS / 2]),
            ms(times[ROUNDS * 9 / 10])
        );
    };
    for (label, path) in
        [("status", "/api/memory/status"), ("analytics", "/api/memory/analytics"), ("metrics", "/metrics")]
    {
        report(label, &|| assert_eq!(request("GET", path).0, 200, "{path}"));
    }
    report("allocate + free", &|| {
        let (status, body) = request("POST", "/api/memory/allocations/allocate/cpu");
        assert_eq!(status, 201, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let id = v["data"]["allocationId"].as_str().expect("id").to_string();
        assert_eq!(request("DELETE", &format!("/api/memory/allocations/{id}")).0, 200);
    });
    stop();
}
