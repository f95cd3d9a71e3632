//! Memory an attached client allocates over its connection (issue 15, item 3): owned by the
//! connection, freed and logged as `reclaimed` within a second of the connection closing, whether
//! the client closed it or its process died. A client frees only its own.

use crate::common::{tempdir, TestServer};
use memwarden::config::Config;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// `helpers/client_memory.py`: one command line in, one JSON line out.
struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    fn start(socket: &std::path::Path, name: &str) -> Client {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/models/helpers/client_memory.py");
        let mut child = Command::new("python3")
            .args([script, &socket.display().to_string(), name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut c = Client { child, stdin, stdout };
        assert_eq!(c.read()["ready"], true);
        c
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("the client printed {line:?}: {e}"))
    }

    fn ask(&mut self, cmd: Value) -> Value {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{cmd}").expect("write");
        stdin.flush().expect("flush");
        self.read()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server(dir: &std::path::Path) -> (TestServer, std::path::PathBuf) {
    let socket = dir.join("mw.sock");
    let mut config = Config::default();
    config.workers.enabled = false;
    config.workers.socket = socket.display().to_string();
    (TestServer::start_with_workers(config), socket)
}

fn live(s: &TestServer) -> Vec<String> {
    let (_, l) = s.call("GET", "/api/memory/allocations", None);
    l["data"]["allocations"]
        .as_array()
        .expect("list")
        .iter()
        .map(|a| a["allocationId"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Waits until none of `ids` is live; how long that took from `since`.
fn gone_within(s: &TestServer, ids: &[&str], since: Instant, limit: Duration) -> Duration {
    loop {
        let now = live(s);
        if ids.iter().all(|id| !now.iter().any(|l| l == id)) {
            return since.elapsed();
        }
        assert!(since.elapsed() < limit, "still live after {limit:?}: {now:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn reclaimed_ids(s: &TestServer) -> Vec<String> {
    let (_, events) = s.call("GET", "/api/memory/analytics/events?limit=100", None);
    events["data"]["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["event"] == "reclaimed")
        .filter_map(|e| e["allocationId"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_clients_memory_is_reclaimed_when_its_connection_closes_or_its_process_dies() {
    let dir = tempdir("client-memory");
    let (s, socket) = server(&dir);
    let kept = s.alloc_on("cpu", json!({"sizeBytes": 4096, "owner": "app"}));

    let mut a = Client::start(&socket, "app");
    let host = a.ask(json!({"op": "allocate", "size_bytes": 1 << 20, "purpose": "kv-cache"}));
    let host_id = host["allocationId"].as_str().unwrap_or_else(|| panic!("{host}")).to_string();
    let token = host["ownerClient"].as_str().unwrap_or_else(|| panic!("{host}")).to_string();
    assert!(token.starts_with("app@"), "the client's id and its connection's number: {host}");
    assert_eq!(host["owner"], "app", "the quota owner defaults to the client's name: {host}");
    assert_eq!(host["purpose"], "kv-cache");
    let budget = a.ask(json!({"op": "allocate", "size_bytes": 64 << 20, "memory_type": "reservation"}));
    let budget_id = budget["allocationId"].as_str().unwrap_or_else(|| panic!("{budget}")).to_string();
    let freed_early = a.ask(json!({"op": "allocate", "size_bytes": 4096}));
    let freed_early_id = freed_early["allocationId"].as_str().expect("id").to_string();
    // The REST API shows who owns them.
    let (_, one) = s.call("GET", &format!("/api/memory/allocation/{host_id}"), None);
    assert_eq!(one["data"]["ownerClient"], token.as_str(), "{one}");

    // Bad requests get the service's codes, and nothing is allocated.
    let before = live(&s).len();
    assert_eq!(a.ask(json!({"op": "allocate", "size_bytes": 0}))["error"], "INVALID_ARGUMENT");
    assert_eq!(a.ask(json!({"op": "allocate", "size_bytes": 4096, "device": "tpu:3"}))["error"], "DEVICE_NOT_FOUND");
    assert_eq!(a.ask(json!({"op": "allocate", "size_bytes": 4096, "memory_type": "vram2"}))["error"], "INVALID_DATA");
    assert_eq!(live(&s).len(), before, "a refused allocate leaves nothing behind");

    // A client frees its own, not another's.
    let f = a.ask(json!({"op": "free", "id": freed_early_id}));
    assert_eq!(f["allocationId"], freed_early_id.as_str(), "{f}");
    assert!(f["freedBytes"].as_u64().expect("freedBytes") >= 4096);
    let refused = a.ask(json!({"op": "free", "id": kept}));
    assert_eq!(refused["error"], "PERMISSION_DENIED", "{refused}");
    assert_eq!(a.ask(json!({"op": "free", "id": "no-such-id"}))["error"], "ALLOCATION_NOT_FOUND");

    // Closing the connection gives everything it owned back within a second; the process lives on.
    let closed = Instant::now();
    assert_eq!(a.ask(json!({"op": "close"}))["closed"], true);
    let took = gone_within(&s, &[&host_id, &budget_id], closed, Duration::from_secs(1));
    eprintln!("reclaimed {took:?} after close");
    assert!(a.child.try_wait().expect("wait").is_none(), "the client process is still running");

    // A process killed while connected: the same, through the socket the kernel closes.
    let mut b = Client::start(&socket, "doomed");
    let doomed = b.ask(json!({"op": "allocate", "size_bytes": 2 << 20}));
    let doomed_id = doomed["allocationId"].as_str().unwrap_or_else(|| panic!("{doomed}")).to_string();
    b.child.kill().expect("SIGKILL");
    let killed = Instant::now();
    b.child.wait().expect("reap");
    let took = gone_within(&s, &[&doomed_id], killed, Duration::from_secs(1));
    eprintln!("reclaimed {took:?} after SIGKILL");

    // Only the allocation without an owning connection stays; the others are logged and counted.
    assert_eq!(live(&s), vec![kept.clone()]);
    let mut reclaimed = reclaimed_ids(&s);
    reclaimed.sort();
    let mut want = vec![host_id, budget_id, doomed_id];
    want.sort();
    assert_eq!(reclaimed, want);
    let (_, an) = s.call("GET", "/api/memory/analytics", None);
    let cpu = an["data"]["devices"].as_array().expect("devices").iter().find(|d| d["deviceId"] == "cpu").expect("cpu");
    assert_eq!(cpu["activity"]["reclaims"], 3, "{cpu}");
    // Reservations commit no bytes: 1 MiB and 2 MiB came back.
    assert_eq!(cpu["activity"]["reclaimedBytes"], 3u64 << 20, "{cpu}");
    s.service.validate().expect("ledger = pools = running totals");
}

#[test]
fn a_clients_allocations_count_against_its_quota() {
    let dir = tempdir("client-quota");
    let socket = dir.join("mw.sock");
    let mut config = Config::default();
    config.workers.enabled = false;
    config.workers.socket = socket.display().to_string();
    config.quotas = vec![toml::from_str("owner = \"capped\"\nmax_bytes = 2097152").expect("quota")];
    let s = TestServer::start_with_workers(config);
    let mut c = Client::start(&socket, "capped");
    assert!(c.ask(json!({"op": "allocate", "size_bytes": 1 << 20}))["allocationId"].is_string());
    let over = c.ask(json!({"op": "allocate", "size_bytes": 2 << 20}));
    assert_eq!(over["error"], "QUOTA_EXCEEDED", "{over}");
    assert!(over["message"].as_str().expect("message").contains("capped"), "{over}");
    drop(c);
    let started = Instant::now();
    while !live(&s).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(2), "not reclaimed: {:?}", live(&s));
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_client_reconnecting_under_the_same_name_neither_inherits_nor_loses_memory() {
    let dir = tempdir("client-same-name");
    let (s, socket) = server(&dir);
    let mut first = Client::start(&socket, "w");
    let mut second = Client::start(&socket, "w");
    let a = first.ask(json!({"op": "allocate", "size_bytes": 1 << 20}));
    let b = second.ask(json!({"op": "allocate", "size_bytes": 1 << 20}));
    let (a_id, b_id) =
        (a["allocationId"].as_str().expect("a").to_string(), b["allocationId"].as_str().expect("b").to_string());
    assert_ne!(a["ownerClient"], b["ownerClient"], "two connections, two owners: {a} {b}");
    assert_eq!(second.ask(json!({"op": "free", "id": a_id}))["error"], "PERMISSION_DENIED");
    // The first goes: only its memory comes back, and a newcomer under the name gets none of it.
    let closed = Instant::now();
    assert_eq!(first.ask(json!({"op": "close"}))["closed"], true);
    gone_within(&s, &[&a_id], closed, Duration::from_secs(1));
    let mut third = Client::start(&socket, "w");
    assert_eq!(third.ask(json!({"op": "free", "id": b_id}))["error"], "PERMISSION_DENIED");
    assert_eq!(live(&s), vec![b_id.clone()]);
    drop(second);
    let closed = Instant::now();
    gone_within(&s, &[&b_id], closed, Duration::from_secs(1));
    drop(third);
    s.service.validate().expect("ledger = pools");
}
