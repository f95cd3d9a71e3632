//! Supervised workers: spawn, handshake, serve stdout as protocol and stderr as logs, health
//! pings, restart with backoff.

use super::conn::{line_reader, read_hello, read_loop, Conn, Writer};
use super::{python, Slot, Supervisor, WorkerState};
use crate::config::WorkerSpec;
use crate::sync::lock;
use memwarden_protocol::{Action, Role};
use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Lines of a worker's stderr kept to explain its exit.
const STDERR_TAIL_LINES: usize = 8;

/// A worker that stayed up this long starts the next backoff from the beginning.
const HEALTHY_RESET: Duration = Duration::from_secs(60);

async fn python_works(python: &str) -> Result<(), String> {
    let out = Command::new(python)
        .args(["-c", "import sys; sys.exit(0 if sys.version_info >= (3, 9) else 3)"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    match out {
        Ok(s) if s.success() => Ok(()),
        Ok(s) if s.code() == Some(3) => Err(format!("{python} is older than Python 3.9")),
        Ok(s) => Err(format!("{python} failed: {s}")),
        Err(e) => Err(format!("{python} not found: {e}")),
    }
}

pub(super) async fn start_workers(sup: &Arc<Supervisor>) {
    let cfg = sup.config().clone();
    if !cfg.enabled {
        *lock(&sup.no_workers_reason) = Some("model workers are disabled (workers.enabled = false)".into());
        return;
    }
    let specs = if cfg.worker.is_empty() {
        if let Err(e) = python_works(&cfg.python).await {
            tracing::warn!("no default model worker: {e}");
            *lock(&sup.no_workers_reason) = Some(format!("no model worker: {e}"));
            return;
        }
        vec![WorkerSpec {
            id: "worker-0".into(),
            devices: sup.devices.clone(),
            command: Vec::new(),
            env: Default::default(),
        }]
    } else {
        cfg.worker.clone()
    };
    // The package: a configured directory, or the embedded copy.
    let python_path = if cfg.python_path.as_os_str().is_empty() {
        match python::Extracted::write(&python::runtime_dir(&cfg.runtime_dir)) {
            Ok(x) => {
                let dir = x.dir.clone();
                *lock(&sup.python) = Some(x);
                Some(dir)
            }
            Err(e) => {
                *lock(&sup.no_workers_reason) = Some(format!("cannot write the worker package: {e}"));
                return;
            }
        }
    } else {
        Some(cfg.python_path.clone())
    };
    for spec in specs {
        let slot = Arc::new(Slot::new(spec.id.clone(), Role::Worker, Some(spec)));
        sup.add_slot(slot.clone());
        let sup = sup.clone();
        let path = python_path.clone();
        tokio::spawn(async move { supervise(sup, slot, path).await });
    }
}

async fn supervise(sup: Arc<Supervisor>, slot: Arc<Slot>, python_path: Option<std::path::PathBuf>) {
    let cfg = sup.config().clone();
    let mut backoff = Duration::from_millis(cfg.restart_backoff_ms);
    let stop = sup.stopping();
    loop {
        if is_set(&stop) {
            break;
        }
        slot.set_state(WorkerState::Starting);
        let started = Instant::now();
        let reason = run_once(&sup, &slot, python_path.as_deref()).await;
        lock(&slot.state).conn = None;
        lock(&slot.state).pid = None;
        if is_set(&stop) {
            break;
        }
        tracing::warn!(worker = %slot.id, "worker ended: {reason}; restarting in {} ms", backoff.as_millis());
        slot.set_error(reason);
        if started.elapsed() > HEALTHY_RESET {
            backoff = Duration::from_millis(cfg.restart_backoff_ms);
        }
        slot.set_state(WorkerState::Restarting);
        lock(&slot.state).restarts += 1;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = super::stopped(stop.clone()) => break,
        }
        backoff = (backoff * 2).min(Duration::from_millis(cfg.restart_backoff_max_ms));
    }
    slot.set_state(WorkerState::Stopped);
}

fn is_set(stop: &tokio::sync::watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

fn command(sup: &Supervisor, spec: &WorkerSpec, python_path: Option<&std::path::Path>) -> Command {
    let cfg = sup.config();
    let mut cmd = if spec.command.is_empty() {
        let mut c = Command::new(&cfg.python);
        c.args(["-m", "memwarden.worker", "--worker-id", &spec.id]);
        if !spec.devices.is_empty() {
            c.args(["--devices", &spec.devices.join(",")]);
        }
        c
    } else {
        let mut c = Command::new(&spec.command[0]);
        c.args(&spec.command[1..]);
        c
    };
    if let Some(p) = python_path {
        let mut pp = p.as_os_str().to_owned();
        if let Some(old) = std::env::var_os("PYTHONPATH").filter(|o| !o.is_empty()) {
            pp.push(":");
            pp.push(old);
        }
        cmd.env("PYTHONPATH", pp);
    }
    cmd.env("PYTHONUNBUFFERED", "1").env("MEMWARDEN_WORKER_ID", &spec.id);
    cmd.envs(&spec.env);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    cmd
}

/// Runs one incarnation of the worker until it exits or is stopped; returns why it ended.
async fn run_once(sup: &Arc<Supervisor>, slot: &Arc<Slot>, python_path: Option<&std::path::Path>) -> String {
    let cfg = sup.config().clone();
    let Some(spec) = slot.spec.clone() else { return "a client slot has no process".into() };
    // The worker's stdin is our end of a socketpair, so requests can carry descriptors (weights
    // the daemon holds); its replies still come on stdout.
    let (ours, theirs) = match memwarden_sys::local::LocalStream::pair_for_child() {
        Ok(p) => p,
        Err(e) => return format!("cannot create the worker's socket: {e}"),
    };
    let mut cmd = command(sup, &spec, python_path);
    cmd.stdin(theirs);
    let spawned = cmd.spawn();
    drop(cmd); // closes our copy of the worker's end
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return format!("cannot start the worker: {e}"),
    };
    let stdin = ours.into_split().1;
    let pid = child.id().unwrap_or(0);
    lock(&slot.state).pid = Some(pid);
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.start_kill();
        return "the worker's pipes were not opened".into();
    };
    let (tail, log_task) = drain_log(slot.id.clone(), stderr);
    let mut reader = line_reader(stdout);
    let stop = sup.stopping();
    let hello = tokio::select! {
        h = tokio::time::timeout(Duration::from_millis(cfg.start_timeout_ms), read_hello(&mut reader)) => h,
        _ = super::stopped(stop.clone()) => {
            let _ = child.start_kill();
            return "stopped".into();
        }
    };
    let hello = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let _ = child.start_kill();
            let status = child.wait().await.map(|s| s.to_string()).unwrap_or_default();
            let _ = log_task.await;
            return format!("{e} ({status}){}", describe_tail(&tail));
        }
        Err(_) => {
            let _ = child.start_kill();
            return format!("no hello within {} ms", cfg.start_timeout_ms);
        }
    };
    let conn = Arc::new(Conn::new(hello, pid, Writer::Socket(stdin), sup.catalog().clone()));
    let reason = serve(sup, slot, &conn, &mut reader, &mut child, stop).await;
    conn.close();
    let _ = child.start_kill();
    let status = match child.wait().await {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    };
    // Only now: the process can no longer touch the weights it mapped or the memory it owned.
    if let Some(p) = sup.conn_requests() {
        p.closed(&conn);
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), log_task).await;
    format!("{reason} ({status}){}", describe_tail(&tail))
}

/// Drains the worker's stderr (its log) into the daemon's log, keeping the last lines for the
/// reason of an exit: always read, so the worker never blocks on a full pipe.
fn drain_log(
    id: String,
    stderr: tokio::process::ChildStderr,
) -> (Arc<Mutex<VecDeque<String>>>, tokio::task::JoinHandle<()>) {
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)));
    let tail_w = tail.clone();
    let task = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(target: "memwarden::worker", worker = %id, "{line}");
            let mut t = lock(&tail_w);
            if t.len() == STDERR_TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    });
    (tail, task)
}

/// A worker that said hello: ready, attached, served until it exits, fails its pings, is
/// restarted or the supervisor stops. Returns why it ended.
async fn serve<R: tokio::io::AsyncRead + Unpin>(
    sup: &Arc<Supervisor>,
    slot: &Arc<Slot>,
    conn: &Arc<Conn>,
    reader: &mut super::conn::LineReader<R>,
    child: &mut tokio::process::Child,
    stop: tokio::sync::watch::Receiver<bool>,
) -> String {
    if let Some(p) = sup.conn_requests() {
        p.opened(conn);
    }
    {
        let mut s = lock(&slot.state);
        s.conn = Some(conn.clone());
        s.failed_pings = 0;
        s.last_error = None;
    }
    slot.set_state(WorkerState::Ready);
    if let Some(p) = sup.conn_requests() {
        p.attached(conn);
    }
    let health = health_pings(sup.clone(), slot.clone(), conn.clone());
    tokio::select! {
        r = read_loop(conn, reader, sup.conn_requests()) => r,
        r = health => r,
        _ = slot.restart.notified() => "restarted by the optimizer: a claimed release did not show up".into(),
        _ = super::stopped(stop) => {
            // The supervisor's shutdown asked the worker to exit; give it a moment.
            let _ = tokio::time::timeout(Duration::from_secs(3), child.wait()).await;
            "stopped".into()
        }
    }
}

fn describe_tail(tail: &Mutex<VecDeque<String>>) -> String {
    let t = lock(tail);
    match t.back() {
        Some(last) => format!("; last log line: {last}"),
        None => String::new(),
    }
}

/// Pings the worker every `health_interval_ms`; returns when it has failed
/// `unhealthy_restart_after` pings in a row (the caller then kills it).
async fn health_pings(sup: Arc<Supervisor>, slot: Arc<Slot>, conn: Arc<Conn>) -> String {
    let cfg = sup.config().clone();
    if cfg.health_interval_ms == 0 {
        return std::future::pending().await;
    }
    let interval = Duration::from_millis(cfg.health_interval_ms);
    loop {
        tokio::time::sleep(interval).await;
        if conn.is_closed() {
            return std::future::pending().await;
        }
        match sup.call(&slot, Action::Ping, serde_json::json!({})).await {
            Ok(_) => lock(&slot.state).failed_pings = 0,
            Err(e) => {
                let failed = {
                    let mut s = lock(&slot.state);
                    s.failed_pings += 1;
                    s.failed_pings
                };
                tracing::warn!(worker = %slot.id, failed, "health ping failed: {e}");
                if failed >= cfg.unhealthy_restart_after.max(1) {
                    return format!("killed after {failed} failed health pings");
                }
            }
        }
    }
}
