//! HTTP load: allocate + free pairs over loopback against a running daemon, one keep-alive
//! connection per client thread. Prints latency percentiles of the pair and the throughput.
//!
//!   cargo run --release --example http_load -- [URL] [PAIRS] [THREADS] [SIZE_BYTES] [DEVICE]
//!
//! `scripts/bench-http` starts a release daemon on a free port and runs this against it.
//!
//! The client writes HTTP/1.1 by hand on a `TcpStream` (TCP_NODELAY) rather than using an HTTP
//! client crate: the figure is meant to be the daemon's and the kernel's, and a general client
//! adds 5–20 µs of its own per request, comparable to what is being measured.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(host_port: &str) -> Conn {
        let stream = TcpStream::connect(host_port).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Conn { reader: BufReader::new(stream.try_clone().expect("clone")), writer: stream }
    }

    /// Sends one request and returns (status, body).
    fn request(&mut self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: memwarden\r\n");
        if !body.is_empty() {
            req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        req.push_str(body);
        self.writer.write_all(req.as_bytes()).expect("write");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status");
        let mut length = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header");
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().expect("length");
                }
            }
        }
        let mut buf = vec![0; length];
        self.reader.read_exact(&mut buf).expect("body");
        (status, String::from_utf8(buf).expect("utf8"))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).cloned().unwrap_or_else(|| "http://127.0.0.1:5000".into());
    let pairs: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let threads: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1);
    let size: u64 = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(65536);
    let device = args.get(5).cloned().unwrap_or_else(|| "cpu".into());
    let host_port = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let body = format!(r#"{{"sizeBytes": {size}, "purpose": "http-load"}}"#);
    let alloc_path = format!("/api/memory/allocations/allocate/{device}");

    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (host_port, body, alloc_path) = (host_port.clone(), body.clone(), alloc_path.clone());
            std::thread::spawn(move || {
                let mut conn = Conn::open(&host_port);
                let mut samples = Vec::with_capacity(pairs);
                // The first 10% warm the connection and the pool.
                for i in 0..pairs + pairs / 10 {
                    let t = Instant::now();
                    let (status, text) = conn.request("POST", &alloc_path, &body);
                    assert_eq!(status, 201, "allocate failed: {text}");
                    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
                    let id = v["data"]["allocationId"].as_str().expect("allocationId");
                    let (status, text) = conn.request("DELETE", &format!("/api/memory/allocations/{id}"), "");
                    assert_eq!(status, 200, "free failed: {text}");
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
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e6;
    println!(
        "http allocate+free pair, {size} B on {device}, {threads} thread(s), {} pairs: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, {:.0} pairs/s",
        all.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        (all.len() as f64) / wall.as_secs_f64(),
    );
}
