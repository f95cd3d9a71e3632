//! The model-worker supervisor: starts and restarts the configured Python workers, accepts
//! attached clients on a Unix socket, and makes protocol calls to both with timeouts, one retry
//! for idempotent actions, and per-worker state (`starting`, `ready`, `unhealthy`,
//! `restarting`, `stopped`) with the last error. The protocol itself is `memwarden-protocol`.

mod conn;
mod devices;
mod process;
pub mod python;
mod socket;

use crate::sync::lock;
pub use conn::{CallError, Conn, ConnRequests, Writer};
pub use devices::{DeviceCatalog, DeviceError};
pub use memwarden_protocol::api::WorkerState;
use memwarden_protocol::{codes, Action, LoadModel, ModelInfo, Released, Reply, Role};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

use crate::config::{WorkerSpec, WorkersSection};

/// Resolves when the supervisor stops (the watch guard never lives across an await).
async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// A worker slot: one configured worker (across its restarts) or one attached client.
pub struct Slot {
    pub id: String,
    pub role: Role,
    pub spec: Option<WorkerSpec>,
    state: Mutex<SlotState>,
    /// Kills the worker's process so the supervisor restarts it (optimizer escalation).
    restart: tokio::sync::Notify,
}

#[derive(Clone)]
pub struct SlotState {
    pub state: WorkerState,
    pub last_error: Option<String>,
    pub restarts: u32,
    pub pid: Option<u32>,
    pub conn: Option<Arc<Conn>>,
    pub since: OffsetDateTime,
    pub failed_pings: u32,
    /// Releases it claimed that the measurement did not confirm.
    pub unverified_releases: u32,
}

impl Slot {
    fn new(id: String, role: Role, spec: Option<WorkerSpec>) -> Slot {
        Slot {
            id,
            role,
            spec,
            state: Mutex::new(SlotState {
                state: WorkerState::Starting,
                last_error: None,
                restarts: 0,
                pid: None,
                conn: None,
                since: OffsetDateTime::now_utc(),
                failed_pings: 0,
                unverified_releases: 0,
            }),
            restart: tokio::sync::Notify::new(),
        }
    }

    /// Records a release the measurement did not confirm.
    pub fn note_unverified(&self, message: String) {
        let mut s = lock(&self.state);
        s.unverified_releases += 1;
        s.last_error = Some(message);
    }

    /// Asks the supervisor to kill and restart this worker.
    pub fn request_restart(&self) {
        self.restart.notify_one();
    }

    pub fn snapshot(&self) -> SlotState {
        lock(&self.state).clone()
    }

    fn set_state(&self, state: WorkerState) {
        let mut s = lock(&self.state);
        if s.state != state {
            tracing::info!(worker = %self.id, from = ?s.state, to = ?state, "worker state");
            s.state = state;
            s.since = OffsetDateTime::now_utc();
        }
    }

    fn set_error(&self, error: impl Into<String>) {
        lock(&self.state).last_error = Some(error.into());
    }

    /// The connection, when the slot can take calls (`ready` or `unhealthy`).
    pub fn conn(&self) -> Option<Arc<Conn>> {
        let s = lock(&self.state);
        match s.state {
            WorkerState::Ready | WorkerState::Unhealthy => s.conn.clone().filter(|c| !c.is_closed()),
            _ => None,
        }
    }

    /// Devices this slot places models on (its hello's list, narrowed by its config).
    pub fn serves(&self, device: &str) -> bool {
        let Some(conn) = self.conn() else { return false };
        let configured = self.spec.as_ref().map(|s| s.devices.as_slice()).unwrap_or(&[]);
        conn.devices.iter().any(|d| d == device) && (configured.is_empty() || configured.iter().any(|d| d == device))
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SupervisorError {
    #[error("{0}")]
    Unavailable(String),
    #[error("worker {worker} did not answer {action} within {timeout_ms} ms")]
    Timeout { worker: String, action: &'static str, timeout_ms: u64 },
    /// The worker answered with an error.
    #[error("worker {worker}: {code}: {message}")]
    Worker { worker: String, code: String, message: String },
    #[error("no model {0} is loaded")]
    ModelNotFound(String),
    #[error("{0}")]
    Invalid(String),
}

/// The worker supervisor. Owns the worker slots (each worker process or attached client, its
/// models and its state, behind one lock), the workers' settings, the devices they serve, the
/// extracted Python runtime, the socket they attach on and the last sync with them; it
/// spawns, restarts and stops the worker processes and measures what each holds. Who answers
/// the peers' own requests is given to it once (`peer`); it owns no memory of its own.
pub struct Supervisor {
    cfg: WorkersSection,
    /// Every device the daemon has (`cpu`, `cuda:0`, …): the default worker serves them all.
    devices: Vec<String>,
    /// The same devices, for canonicalizing the ids peers report.
    catalog: Arc<DeviceCatalog>,
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Why no worker runs at all (no python, workers disabled), for the 503 message.
    no_workers_reason: Mutex<Option<String>>,
    socket_path: Mutex<Option<PathBuf>>,
    last_sync: Mutex<Option<OffsetDateTime>>,
    stop: tokio::sync::watch::Sender<bool>,
    python: Mutex<Option<python::Extracted>>,
    model_counter: AtomicU64,
    /// What the OS says a worker's process holds (procfs root, memwarden's shared dir).
    meter: crate::models::process::ProcessMeter,
    /// Who answers the peers' own requests (the weights store), once the daemon has one.
    peer: std::sync::OnceLock<Arc<dyn ConnRequests>>,
}

impl Supervisor {
    pub fn new(
        cfg: WorkersSection,
        devices: Vec<String>,
        meter: crate::models::process::ProcessMeter,
    ) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            cfg,
            catalog: Arc::new(DeviceCatalog::new(&devices)),
            devices,
            slots: Mutex::new(Vec::new()),
            no_workers_reason: Mutex::new(None),
            socket_path: Mutex::new(None),
            last_sync: Mutex::new(None),
            stop: tokio::sync::watch::channel(false).0,
            python: Mutex::new(None),
            model_counter: AtomicU64::new(1),
            meter,
            peer: std::sync::OnceLock::new(),
        })
    }

    /// Registers who answers peers' requests (protocol 2); set once, before workers start.
    pub fn set_conn_requests(&self, peer: Arc<dyn ConnRequests>) {
        let _ = self.peer.set(peer);
    }

    pub(crate) fn conn_requests(&self) -> Option<Arc<dyn ConnRequests>> {
        self.peer.get().cloned()
    }

    pub fn config(&self) -> &WorkersSection {
        &self.cfg
    }

    pub fn proc_root(&self) -> &std::path::Path {
        &self.meter.proc_root
    }

    pub fn meter(&self) -> &crate::models::process::ProcessMeter {
        &self.meter
    }

    pub fn catalog(&self) -> &Arc<DeviceCatalog> {
        &self.catalog
    }

    /// Waits, at most `workers.ready_wait_ms`, while some supervised worker is `starting` and
    /// no slot that `usable` accepts can take calls: a request right after start (or a restart)
    /// waits for the worker's hello instead of answering 503. Returns at once when none is
    /// starting (`restarting` and the rest are not waited for).
    pub async fn wait_while_starting(&self, usable: impl Fn(&Slot) -> bool) {
        // State changes are few and the wait is short: polling needs no wake-up plumbing
        // through the slots.
        const POLL: Duration = Duration::from_millis(10);
        let deadline = Instant::now() + Duration::from_millis(self.cfg.ready_wait_ms);
        loop {
            let slots = self.slots();
            let starting = slots.iter().any(|s| s.role == Role::Worker && s.snapshot().state == WorkerState::Starting);
            if !starting || slots.iter().any(|s| s.conn().is_some() && usable(s)) || Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts the workers and the client socket. Never fails: what cannot start is reported in
    /// the workers' states and in `coordinationStatus`.
    pub async fn start(self: &Arc<Self>) {
        process::start_workers(self).await;
        if let Err(e) = socket::start(self).await {
            tracing::warn!("client socket not available: {e}");
        }
    }

    /// Asks each worker to shut down (2 s), then kills what is left; removes the socket and the
    /// embedded package's directory.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let calls = self.slots().into_iter().filter(|s| s.role == Role::Worker).filter_map(|s| s.conn());
        let calls = calls.map(|c| async move {
            let _ = c.call(Action::Shutdown, Value::Object(Default::default()), Duration::from_secs(2)).await;
        });
        futures_util::future::join_all(calls).await;
        if let Some(p) = lock(&self.socket_path).take() {
            let _ = std::fs::remove_file(p);
        }
        // Background tasks keep the supervisor alive until the process exits, so the package
        // would never be dropped (and its directory never removed) otherwise.
        drop(lock(&self.python).take());
    }

    fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
    }

    pub fn slots(&self) -> Vec<Arc<Slot>> {
        lock(&self.slots).clone()
    }

    /// Where the embedded `memwarden` package was written (on workers' `PYTHONPATH`).
    pub fn python_dir(&self) -> Option<PathBuf> {
        lock(&self.python).as_ref().map(|x| x.dir.clone())
    }

    pub fn socket_path(&self) -> Option<PathBuf> {
        lock(&self.socket_path).clone()
    }

    pub fn last_sync(&self) -> Option<OffsetDateTime> {
        *lock(&self.last_sync)
    }

    pub fn no_workers_reason(&self) -> Option<String> {
        lock(&self.no_workers_reason).clone()
    }

    fn add_slot(&self, slot: Arc<Slot>) {
        lock(&self.slots).push(slot);
    }

    fn remove_slot(&self, slot: &Arc<Slot>) {
        lock(&self.slots).retain(|s| !Arc::ptr_eq(s, slot));
    }

    /// Why no slot can take a call: for the 503 body.
    pub fn unavailable_reason(&self) -> String {
        let slots = self.slots();
        if slots.is_empty() {
            return self.no_workers_reason().unwrap_or_else(|| "no model worker is configured or attached".into());
        }
        let parts: Vec<String> = slots
            .iter()
            .map(|s| {
                let st = s.snapshot();
                let state = serde_json::to_value(st.state).ok().and_then(|v| v.as_str().map(String::from));
                match st.last_error {
                    Some(e) => format!("{} is {} ({e})", s.id, state.unwrap_or_default()),
                    None => format!("{} is {}", s.id, state.unwrap_or_default()),
                }
            })
            .collect();
        format!("no model worker is ready: {}", parts.join("; "))
    }

    fn timeout_for(&self, action: Action) -> Duration {
        Duration::from_millis(match action {
            Action::LoadModel => self.cfg.load_timeout_ms,
            _ => self.cfg.call_timeout_ms,
        })
    }

    /// One call to a slot: the action's timeout, one retry when idempotent, the slot's state
    /// updated (a timeout makes it `unhealthy`, an answer `ready`), its model list kept in step.
    pub async fn call(&self, slot: &Slot, action: Action, data: Value) -> Result<Reply, SupervisorError> {
        let timeout = self.timeout_for(action);
        let attempts = if action.is_idempotent() { 2 } else { 1 };
        let mut last = CallError::Closed;
        for attempt in 0..attempts {
            let Some(conn) = slot.conn() else {
                return Err(SupervisorError::Unavailable(self.unavailable_reason()));
            };
            match conn.call(action, data.clone(), timeout).await {
                Ok(reply) => {
                    {
                        let mut s = lock(&slot.state);
                        s.failed_pings = 0;
                    }
                    if slot.snapshot().state == WorkerState::Unhealthy {
                        slot.set_state(WorkerState::Ready);
                    }
                    conn.apply_reply(action, &data, &reply);
                    return Ok(reply);
                }
                Err(e) => {
                    if e == CallError::Timeout {
                        slot.set_error(format!("{action} timed out after {} ms", timeout.as_millis()));
                        slot.set_state(WorkerState::Unhealthy);
                    }
                    tracing::warn!(worker = %slot.id, %action, attempt, "call failed: {e:?}");
                    last = e;
                }
            }
        }
        Err(match last {
            CallError::Timeout => SupervisorError::Timeout {
                worker: slot.id.clone(),
                action: action.name(),
                timeout_ms: timeout.as_millis() as u64,
            },
            CallError::Closed => SupervisorError::Unavailable(format!("worker {} went away during {action}", slot.id)),
            CallError::Io(e) => SupervisorError::Unavailable(format!("worker {}: {e}", slot.id)),
        })
    }

    /// Like `call`, but a worker's error reply is an `Err` too.
    pub async fn call_ok(&self, slot: &Slot, action: Action, data: Value) -> Result<Value, SupervisorError> {
        let reply = self.call(slot, action, data).await?;
        if reply.success {
            return Ok(reply.data);
        }
        let e = reply.error.unwrap_or(memwarden_protocol::ErrorInfo {
            code: codes::INTERNAL.into(),
            message: "failed without an error".into(),
        });
        Err(SupervisorError::Worker { worker: slot.id.clone(), code: e.code, message: e.message })
    }

    /// A typed request: its action comes with its data.
    pub async fn request<R: memwarden_protocol::ActionData>(
        &self,
        slot: &Slot,
        data: &R,
    ) -> Result<Value, SupervisorError> {
        let data = serde_json::to_value(data)
            .map_err(|e| SupervisorError::Invalid(format!("{} request not serializable: {e}", R::ACTION)))?;
        self.call_ok(slot, R::ACTION, data).await
    }

    /// Asks every connected slot for its models (in parallel). Returns per slot the error, if
    /// any; `lastSync` moves when all answered.
    pub async fn sync(&self) -> Vec<(Arc<Slot>, Option<SupervisorError>)> {
        let slots: Vec<Arc<Slot>> = self.slots().into_iter().filter(|s| s.conn().is_some()).collect();
        let calls = slots.iter().map(|s| self.call_ok(s, Action::GetModelInfo, serde_json::json!({})));
        let results = futures_util::future::join_all(calls).await;
        let out: Vec<_> = slots.into_iter().zip(results).map(|(s, r)| (s, r.err())).collect();
        if !out.is_empty() && out.iter().all(|(_, e)| e.is_none()) {
            *lock(&self.last_sync) = Some(OffsetDateTime::now_utc());
        }
        out
    }

    /// Loads a model on `slot` (the worker placement picked: [`crate::placement`]).
    pub async fn load_on(&self, slot: &Arc<Slot>, mut req: LoadModel) -> Result<ModelInfo, SupervisorError> {
        if req.model_id.is_none() {
            req.model_id = Some(format!("m-{}", self.model_counter.fetch_add(1, Ordering::Relaxed)));
        }
        let data = serde_json::to_value(&req).map_err(|e| SupervisorError::Invalid(e.to_string()))?;
        let value = self.call_ok(slot, Action::LoadModel, data).await?;
        serde_json::from_value(value)
            .map_err(|e| SupervisorError::Invalid(format!("worker {} sent a bad model info: {e}", slot.id)))
    }

    /// The slot holding `model_id` (from the last reports; a sync runs first when unknown).
    pub async fn find_model(&self, model_id: &str) -> Result<(Arc<Slot>, ModelInfo), SupervisorError> {
        let lookup = |sup: &Supervisor| {
            sup.slots().into_iter().find_map(|s| {
                let m = s.conn()?.model_list().into_iter().find(|m| m.model_id == model_id)?;
                Some((s, m))
            })
        };
        if let Some(found) = lookup(self) {
            return Ok(found);
        }
        if self.slots().iter().all(|s| s.conn().is_none()) {
            return Err(SupervisorError::Unavailable(self.unavailable_reason()));
        }
        self.sync().await;
        lookup(self).ok_or_else(|| SupervisorError::ModelNotFound(model_id.to_string()))
    }

    pub async fn unload(&self, model_id: &str) -> Result<(Released, Arc<Slot>, ModelInfo), SupervisorError> {
        let (slot, info) = self.find_model(model_id).await?;
        let value = self.call_ok(&slot, Action::UnloadModel, serde_json::json!({ "modelId": model_id })).await?;
        let released: Released = serde_json::from_value(value).unwrap_or_default();
        Ok((released, slot, info))
    }
}
