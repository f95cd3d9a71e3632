//! Protocol round trip: `ping` from the daemon's supervisor to a real Python worker over its
//! stdio, and to a real attached client (`memwarden.client`) over the Unix socket. Each sample is
//! one `Supervisor::call`: encode, write, the Python side decodes and replies, the reader task
//! matches the reply. Run: `cargo run --release --example protocol_bench [-- N]`.

use memwarden::config::{WorkerSpec, WorkersSection};
use memwarden::supervisor::{Slot, Supervisor, WorkerState};
use memwarden_protocol::Action;
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn wait_slot(sup: &Supervisor, id: &str) -> Arc<Slot> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = sup.slots().into_iter().find(|s| s.id == id && s.snapshot().state == WorkerState::Ready) {
            return s;
        }
        assert!(Instant::now() < deadline, "{id} never became ready: {}", sup.unavailable_reason());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn measure(sup: &Supervisor, slot: &Slot, n: usize) -> Vec<f64> {
    for _ in 0..n / 10 {
        sup.call(slot, Action::Ping, serde_json::json!({})).await.expect("warm-up ping");
    }
    let mut us = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = sup.call(slot, Action::Ping, serde_json::json!({})).await.expect("ping");
        us.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(r.success);
    }
    us.sort_by(f64::total_cmp);
    us
}

fn report(name: &str, us: &[f64]) {
    let p = |q: f64| us[((us.len() - 1) as f64 * q) as usize];
    let mean = us.iter().sum::<f64>() / us.len() as f64;
    println!(
        "{name:<28} n={:<6} p50 {:>7.1} µs  p90 {:>7.1} µs  p99 {:>7.1} µs  mean {:>7.1} µs",
        us.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        mean
    );
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("mw-protocol-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let socket = dir.join("mw.sock");
        let cfg = WorkersSection {
            socket: socket.display().to_string(),
            health_interval_ms: 0,
            worker: vec![WorkerSpec {
                id: "bench-worker".into(),
                devices: vec!["cpu".into()],
                command: vec![],
                env: Default::default(),
            }],
            ..WorkersSection::default()
        };
        let sup = Supervisor::new(
            cfg,
            vec!["cpu".into()],
            memwarden::models::process::ProcessMeter::new("/proc".into(), None),
        );
        sup.start().await;
        let worker = wait_slot(&sup, "bench-worker").await;
        report("ping over stdio (worker)", &measure(&sup, &worker, n).await);

        let py = sup.python_dir().expect("embedded package");
        let script = "import sys, time\nsys.path.insert(0, sys.argv[2])\nimport memwarden.client as C\n\
                      c = C.connect(sys.argv[1], name='bench-client')\ntime.sleep(3600)\n";
        let mut client = std::process::Command::new("python3")
            .args(["-c", script, &socket.display().to_string(), &py.display().to_string()])
            .spawn()
            .expect("python3 client");
        let slot = wait_slot(&sup, "bench-client").await;
        report("ping over socket (client)", &measure(&sup, &slot, n).await);
        let _ = client.kill();
        let _ = client.wait();
        sup.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}
