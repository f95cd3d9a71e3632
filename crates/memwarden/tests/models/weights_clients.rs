//! Processes mapping memwarden-held weights on cpu (no GPU needed), through the real socket and
//! protocol version 2 (`helpers/weights_holder.py`): two processes map one copy (their
//! proportional share of the shared memory shows it), and after a SIGKILL the weights are
//! orphaned and re-attached by the next process with the same bytes, without a second load.

use crate::common::{tempdir, write_model, TestServer};
use memwarden::config::Config;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

fn holder(socket: &std::path::Path, model: &std::path::Path, name: &str) -> (Child, Value) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/models/helpers/weights_holder.py");
    let mut child = Command::new("python3")
        .args([script, &socket.display().to_string(), &model.display().to_string(), name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{name} printed {line:?}: {e}"));
    (child, v)
}

fn weights(s: &TestServer) -> Vec<Value> {
    let (code, body) = s.call("GET", "/api/memory/models", None);
    assert_eq!(code, 200, "{body}");
    body["data"]["weights"].as_array().expect("weights").clone()
}

fn server(dir: &std::path::Path) -> (TestServer, std::path::PathBuf) {
    let socket = dir.join("mw.sock");
    let mut config = Config::default();
    config.workers.enabled = false;
    config.workers.socket = socket.display().to_string();
    config.weights.orphan_grace_ms = 60_000;
    (TestServer::start_with_workers(config), socket)
}

#[test]
fn two_processes_map_one_copy_of_the_weights() {
    let dir = tempdir("weights-share");
    let (s, socket) = server(&dir);
    let (path, bytes) = write_model(&dir, "shared", 64);
    let (mut a, va) = holder(&socket, &path, "a");
    let (mut b, vb) = holder(&socket, &path, "b");
    assert_eq!(va["modelId"], vb["modelId"], "one model");
    assert_eq!(va["shared"], false);
    assert_eq!(vb["shared"], true);
    assert_eq!(va["digest"], vb["digest"], "both see the same bytes");
    assert!(va["bytes"].as_u64().expect("bytes") >= bytes);
    // Three processes map the file (the daemon and two holders): each is charged about a third.
    for v in [&va, &vb] {
        let pss = v["pssShmem"].as_u64().expect("Pss_Shmem");
        assert!(pss < bytes * 6 / 10, "a holder is charged {pss} of {bytes}: not a shared copy");
    }
    let w = weights(&s);
    assert_eq!(w.len(), 1, "listed once");
    assert_eq!(w[0]["holders"].as_array().expect("holders").len(), 2);
    drop(a.stdin.take());
    drop(b.stdin.take());
    a.wait().expect("a");
    b.wait().expect("b");
}

#[test]
fn a_killed_holders_weights_are_orphaned_and_reattached_with_the_same_bytes() {
    let dir = tempdir("weights-orphan");
    let (s, socket) = server(&dir);
    let (path, _) = write_model(&dir, "orphan", 16);
    let (mut doomed, first) = holder(&socket, &path, "doomed");
    let load = weights(&s)[0]["load"].clone();
    doomed.kill().expect("SIGKILL");
    doomed.wait().expect("reaped");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while weights(&s)[0]["state"] != "orphaned" {
        assert!(std::time::Instant::now() < deadline, "not orphaned: {:?}", weights(&s));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(weights(&s)[0]["orphanedUntil"].is_string());
    let (mut again, second) = holder(&socket, &path, "restarted");
    assert_eq!(second["modelId"], first["modelId"]);
    assert_eq!(second["digest"], first["digest"], "the bytes survived the holder");
    let w = weights(&s);
    assert_eq!(w[0]["state"], "resident");
    assert_eq!(w[0]["load"], load, "re-attached without reading the file again");
    drop(again.stdin.take());
    again.wait().expect("exit");
}

fn ready_worker(s: &TestServer, not_pid: Option<u64>) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (code, body) = s.call("GET", "/api/memory/models", None);
        if code == 200 {
            let w = &body["data"]["coordinationStatus"]["workers"][0];
            if w["state"] == "ready" && w["pid"].as_u64().is_some() && w["pid"].as_u64() != not_pid {
                return w["pid"].as_u64().expect("pid");
            }
        }
        assert!(std::time::Instant::now() < deadline, "worker not ready: {body}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_supervised_worker_maps_held_weights_and_after_sigkill_its_restart_reattaches_them() {
    let dir = tempdir("weights-worker");
    let mut config = Config::default();
    config.workers.socket = "none".into();
    config.workers.restart_backoff_ms = 200;
    config.workers.health_interval_ms = 0;
    config.pressure.enabled = false;
    let s = TestServer::start_with_workers(config);
    let pid = ready_worker(&s, None);
    let (path, bytes) = write_model(&dir, "worker-held", 8);
    let (code, body) = s.call("POST", "/api/memory/models/load", Some(&serde_json::json!({"path": path}).to_string()));
    assert_eq!(code, 200, "{body}");
    let id = body["data"]["modelId"].as_str().expect("id").to_string();
    assert_eq!(body["data"]["holders"], serde_json::json!(["worker-0"]), "the worker maps it: {body}");
    let (_, list) = s.call("GET", "/api/memory/models", None);
    let mine = list["data"]["devices"][0]["modelMemory"]["loadedModels"].as_array().expect("models").clone();
    let m = mine.iter().find(|m| m["modelId"] == id.as_str()).expect("the worker lists it");
    assert_eq!(m["backend"], "memwarden");
    assert_eq!(m["sizeBytes"], bytes);
    let load = weights(&s)[0]["load"].clone();
    // SIGKILL: the weights stay, orphaned; the restarted worker (same id) maps them again.
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let new_pid = ready_worker(&s, Some(pid));
    assert_ne!(new_pid, pid);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let w = weights(&s);
        if w[0]["state"] == "resident" && w[0]["holders"] == serde_json::json!(["worker-0"]) {
            assert_eq!(w[0]["load"], load, "re-attached without reading the file");
            assert_eq!(w[0]["modelId"], id.as_str());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not re-attached: {w:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Unload tells the worker to unmap for good; it forgets the model.
    let (code, body) = s.call("DELETE", &format!("/api/memory/models/{id}"), None);
    assert_eq!(code, 200, "{body}");
    let (_, list) = s.call("GET", "/api/memory/models", None);
    assert!(list["data"]["weights"].as_array().expect("weights").is_empty());
}

/// A worker that maps a held model is not charged for it: the model counts once, as memwarden's
/// (`heldModelMemory`), the worker's `mappedBytes` names it, and what the worker holds beyond
/// its own models (`unattributedBytes`) is never negative, on the worker's row and the device's.
#[test]
fn held_weights_a_worker_maps_are_counted_once_and_unattributed_bytes_stay_positive() {
    let dir = tempdir("weights-attribution");
    let mut config = Config::default();
    config.workers.socket = "none".into();
    config.workers.health_interval_ms = 0;
    config.pressure.enabled = false;
    let s = TestServer::start_with_workers(config);
    ready_worker(&s, None);
    let (path, bytes) = write_model(&dir, "mapped", 64);
    let (code, body) = s.call("POST", "/api/memory/models/load", Some(&serde_json::json!({"path": path}).to_string()));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["holders"], serde_json::json!(["worker-0"]), "the worker maps it: {body}");
    let resident = body["data"]["residentBytes"].as_u64().expect("resident");
    let (_, list) = s.call("GET", "/api/memory/models", None);
    let data = &list["data"];
    let worker = &data["coordinationStatus"]["workers"][0];
    assert_eq!(worker["mappedBytes"]["cpu"], bytes, "{worker}");
    assert_eq!(
        worker["modelBytes"].get("cpu").and_then(Value::as_u64).unwrap_or(0),
        0,
        "not the worker's own: {worker}"
    );
    let process = worker["processBytes"]["cpu"].as_u64().expect("measured");
    assert!(process < bytes, "the mapping is not the worker's own memory: {worker}");
    let unattributed = worker["unattributedBytes"]["cpu"].as_i64().expect("unattributed");
    assert_eq!(unattributed, process as i64, "the worker holds no model of its own: {worker}");
    let cpu = &data["devices"].as_array().expect("devices").iter().find(|d| d["deviceId"] == "cpu").expect("cpu")
        ["modelMemory"];
    assert_eq!(cpu["heldModelMemory"], resident, "{cpu}");
    assert_eq!(cpu["totalModelMemory"], resident, "counted once: {cpu}");
    let unattributed = cpu["unattributedBytes"].as_i64().expect("unattributed");
    assert!(unattributed >= 0, "{cpu}");
    assert_eq!(unattributed, cpu["processBytes"].as_i64().expect("process"), "{cpu}");
}
