//! Real host memory pressure: thresholds just above the machine's utilization, memory taken
//! through the daemon and by an outside process, level changes arriving on the event stream.
//! It must not share the machine with tests that allocate GiBs: it holds
//! [`machine_memory`](crate::common::machine_memory), so no other test of this binary runs a
//! daemon meanwhile.

use crate::common::{assert_error, TestServer};
use memwarden::config::Config;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Reads `/api/memory/events` on a thread; each event arrives with the instant it was read.
fn subscribe(s: &TestServer) -> mpsc::Receiver<(Instant, Value)> {
    let (tx, rx) = mpsc::channel();
    let url = s.url("/api/memory/events");
    std::thread::spawn(move || {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(60))).build().into();
        let Ok(resp) = agent.get(&url).call() else { return };
        for line in BufReader::new(resp.into_body().into_reader()).lines() {
            let Ok(line) = line else { return };
            if let Some(data) = line.strip_prefix("data:") {
                let v: Value = serde_json::from_str(data.trim()).expect("event JSON");
                if tx.send((Instant::now(), v)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

fn next_event(rx: &mpsc::Receiver<(Instant, Value)>, new_level: &str) -> (Instant, Value) {
    loop {
        let (t, e) =
            rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("no event to {new_level} within 10 s"));
        assert_eq!(e["type"], "pressure");
        assert_eq!(e["deviceId"], "cpu");
        if e["newLevel"] == new_level {
            return (t, e);
        }
    }
}

#[test]
fn host_pressure_follows_real_memory_with_hysteresis() {
    let _alone = crate::common::machine_memory();
    // The machine now, and thresholds 4 % of its memory above that (MemAvailable drifts by a
    // few hundred MiB on a busy machine as caches come and go).
    let probe = TestServer::start();
    let (_, st) = probe.call("GET", "/api/memory/pressure/cpu", None);
    let total = st["data"]["totalMemory"].as_u64().expect("total");
    let u0 = st["data"]["utilizationPercentage"].as_f64().expect("utilization") / 100.0;
    drop(probe);
    let margin = 0.04;
    let mut config = Config::default();
    config.pressure.host_interval_ms = 20;
    config.pressure.thresholds.moderate = u0 + margin;
    config.pressure.thresholds.high = (u0 + 0.5).min(0.99);
    config.pressure.thresholds.critical = (u0 + 0.55).min(0.995);
    config.pressure.thresholds.hysteresis = margin / 4.0;
    let s = TestServer::start_with(config);
    let events = subscribe(&s);
    std::thread::sleep(Duration::from_millis(200));
    let (_, p) = s.call("GET", "/api/memory/pressure/cpu", None);
    assert_eq!(p["data"]["pressureCategory"], "low", "{p}");
    assert!((p["data"]["thresholds"]["moderate"].as_f64().expect("t") - (u0 + margin)).abs() < 1e-9);
    assert!(p["data"]["psiSome10"].is_number() == std::path::Path::new("/proc/pressure/memory").exists());
    let trigger = p["data"]["psiTrigger"].as_str().expect("host reports its PSI trigger");
    assert!(trigger == "active" || trigger.starts_with("unavailable: "), "{trigger}");
    if std::path::Path::new("/proc/pressure/memory").exists() && trigger == "active" {
        assert!(p["data"]["psiTriggerFired"].is_u64());
    }

    // 1. Memory taken through the daemon: two and a half margins' worth.
    let take = (2.5 * margin * total as f64) as u64;
    let t0 = Instant::now();
    let (status, a) =
        s.call("POST", "/api/memory/allocations/allocate/cpu", Some(&json!({"sizeBytes": take}).to_string()));
    assert_eq!(status, 201, "{a}");
    let held = Instant::now();
    let (t, e) = next_event(&events, "moderate");
    assert_eq!(e["oldLevel"], "low");
    assert!(e["utilizationPercentage"].as_f64().expect("u") / 100.0 >= u0 + margin);
    eprintln!(
        "daemon allocation of {take} bytes: event {:.1} ms after the allocation returned ({:.1} ms after the request)",
        t.saturating_duration_since(held).as_secs_f64() * 1e3,
        t.saturating_duration_since(t0).as_secs_f64() * 1e3
    );
    let (_, p) = s.call("GET", "/api/memory/pressure/cpu", None);
    assert_eq!(p["data"]["pressureCategory"], "moderate");
    let id = a["data"]["allocationId"].as_str().expect("id");
    assert_eq!(s.call("DELETE", &format!("/api/memory/allocations/{id}"), None).0, 200);
    let released = Instant::now();
    let (t, e) = next_event(&events, "low");
    assert_eq!(e["oldLevel"], "moderate");
    eprintln!("freed: back to low {:.1} ms later", t.saturating_duration_since(released).as_secs_f64() * 1e3);

    // 2. Memory taken by an outside process (written, so the pages are real).
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(format!("import sys\nb = b'\\x01' * {take}\nprint('held', flush=True)\nsys.stdin.read()\n"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("held line");
    let held = Instant::now();
    assert_eq!(line.trim(), "held");
    let (t, _) = next_event(&events, "moderate");
    eprintln!(
        "outside process holding {take} bytes: event {:.1} ms after it said so",
        t.saturating_duration_since(held).as_secs_f64() * 1e3
    );
    drop(child.stdin.take());
    child.wait().expect("exit");
    let (_, p) = s.call("GET", "/api/memory/pressure/cpu", None);
    eprintln!("after the outside process exited: {}", p["data"]);
    next_event(&events, "low");

    // The history kept all four changes, oldest first.
    let (_, h) = s.call("GET", "/api/memory/pressure/history", None);
    let levels: Vec<&str> =
        h["data"]["events"].as_array().expect("events").iter().map(|e| e["newLevel"].as_str().unwrap_or("")).collect();
    assert_eq!(levels, vec!["moderate", "low", "moderate", "low"]);
    let (_, all) = s.call("GET", "/api/memory/pressure", None);
    assert_eq!(all["data"]["devices"][0]["deviceId"], "cpu");
    assert_error(&s.call("GET", "/api/memory/pressure/tpu:99", None), 404, "DEVICE_NOT_FOUND", "cpu");
}
