//! One live protocol connection (a worker's stdio or a client's socket): requests out, replies
//! matched to them by id, notifications applied to the connection's model list.

use super::devices::DeviceCatalog;
use crate::sync::lock;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use memwarden_protocol::{
    codes, decode, encode, Action, ErrorNotice, Event, Hello, MemoryReport, Message, ModelInfo, ModelUnloaded,
    Notification, Released, Reply, Request, Role, MAX_LINE_BYTES,
};
use memwarden_sys::local::LocalWriteHalf;
use memwarden_sys::SharedHandle;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead};

/// Where a connection's lines go: a worker's stdin (a pipe: no descriptors can travel) or a
/// local socket (version 2 lines may carry handles: descriptors over a Unix socket, `SCM_RIGHTS`).
pub enum Writer {
    Pipe(Box<dyn AsyncWrite + Send + Unpin>),
    Socket(LocalWriteHalf),
}

impl Writer {
    /// Writes `line`; with descriptors, they ride on the `sendmsg` of its first byte.
    async fn write_line(&mut self, line: &[u8], fds: &[SharedHandle]) -> std::io::Result<()> {
        match self {
            Writer::Pipe(w) if fds.is_empty() => {
                w.write_all(line).await?;
                w.flush().await
            }
            Writer::Pipe(_) => {
                Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "file descriptors cannot travel over a pipe"))
            }
            Writer::Socket(w) if fds.is_empty() => {
                w.write_all(line).await?;
                w.flush().await
            }
            Writer::Socket(w) => {
                let sent = w.send_with_handles(line, fds).await?;
                w.write_all(&line[sent..]).await?;
                w.flush().await
            }
        }
    }
}

/// What a connected worker or client asks of the daemon (protocol version 2) and what happens
/// to its connection, answered outside the supervisor (by the application layer's
/// `app::socket`): `loadWeights` and its kin, `allocate`, `export`. Registered once at start.
pub trait ConnRequests: Send + Sync {
    /// Answers one request; the reply may carry descriptors.
    fn handle(&self, conn: Arc<Conn>, request: Request) -> BoxFuture<'static, (Reply, Vec<SharedHandle>)>;
    /// A notification this module does not apply itself (`weightsUsed`).
    fn notify(&self, conn: &Arc<Conn>, event: Event, data: &Value);
    /// A connection said hello (every role), before any of its requests is served.
    fn opened(&self, _conn: &Arc<Conn>) {}
    /// The connection closed; for a supervised worker, once its process is gone too.
    fn closed(&self, conn: &Arc<Conn>);
    /// A supervised worker said hello (after a restart, it re-attaches what it held).
    fn attached(&self, conn: &Arc<Conn>);
}

/// Lines of at most `MAX_LINE_BYTES`, not required to be UTF-8 (a bad line is answered, not
/// fatal); tokio-util's `LinesCodec` would end the stream on invalid UTF-8.
pub type LineReader<R> = FramedRead<R, AnyDelimiterCodec>;

pub fn line_reader<R: AsyncRead>(r: R) -> LineReader<R> {
    FramedRead::new(r, AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), MAX_LINE_BYTES))
}

#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    Timeout,
    /// The connection closed before the reply came.
    Closed,
    Io(String),
}

/// Numbers connections over the daemon's life (a name comes back when a peer reconnects; this
/// does not).
static CONNECTIONS: AtomicU64 = AtomicU64::new(1);

pub struct Conn {
    pub worker_id: String,
    /// This connection's number, unique for the daemon's life.
    pub serial: u64,
    pub role: Role,
    pub pid: u32,
    pub protocol_version: u32,
    /// Lines to this peer can carry descriptors (a version 2 peer on a socket).
    pub carries_fds: bool,
    pub devices: Vec<String>,
    pub frameworks: BTreeMap<String, Option<String>>,
    pub connected_at: OffsetDateTime,
    writer: tokio::sync::Mutex<Writer>,
    pending: Mutex<HashMap<String, oneshot::Sender<Reply>>>,
    /// Unmaps sent with `confirmEarly`, by model id: told when the peer's `weightsQuiesced` comes.
    quiesce: Mutex<HashMap<String, oneshot::Sender<()>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// The models this peer holds, as it last reported them.
    pub models: Mutex<BTreeMap<String, ModelInfo>>,
    /// The peer's last `memory` figures (torch allocated/reserved per device).
    pub memory: Mutex<MemoryReport>,
    /// The daemon's devices: every model the peer reports is kept under their canonical ids.
    catalog: Arc<DeviceCatalog>,
}

impl Conn {
    pub fn new(hello: Hello, pid: u32, writer: Writer, catalog: Arc<DeviceCatalog>) -> Conn {
        Conn {
            worker_id: hello.worker_id,
            serial: CONNECTIONS.fetch_add(1, Ordering::Relaxed),
            role: hello.role,
            protocol_version: hello.protocol_version,
            carries_fds: hello.protocol_version >= 2 && matches!(writer, Writer::Socket(_)),
            pid,
            devices: hello.devices,
            frameworks: hello.frameworks,
            connected_at: OffsetDateTime::now_utc(),
            writer: tokio::sync::Mutex::new(writer),
            pending: Mutex::new(HashMap::new()),
            quiesce: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            models: Mutex::new(BTreeMap::new()),
            memory: Mutex::new(MemoryReport::default()),
            catalog,
        }
    }

    /// Who owns the memory this connection allocates (`ownerClient`): its peer's id and the
    /// connection's number, so a peer that reconnects under the same name never inherits it.
    pub fn owner_token(&self) -> String {
        format!("{}@{}", self.worker_id, self.serial)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub async fn send(&self, message: &Message) -> std::io::Result<()> {
        self.send_with_fds(message, &[]).await
    }

    /// Sends a line with descriptors (its `fds` must say how many).
    pub async fn send_with_fds(&self, message: &Message, fds: &[SharedHandle]) -> std::io::Result<()> {
        let mut line = encode(message);
        line.push('\n');
        self.writer.lock().await.write_line(line.as_bytes(), fds).await
    }

    /// One request, one reply (no retry: the supervisor decides that).
    pub async fn call(&self, action: Action, data: Value, timeout: Duration) -> Result<Reply, CallError> {
        self.call_with_fds(action, data, Vec::new(), timeout).await
    }

    /// A request that carries descriptors (version 2 peers on a socket only).
    pub async fn call_with_fds(
        &self,
        action: Action,
        data: Value,
        fds: Vec<SharedHandle>,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        if self.is_closed() {
            return Err(CallError::Closed);
        }
        let id = format!("d{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id.clone(), tx);
        let request = Message::Request(Request { request_id: id.clone(), action, data, fds: fds.len() as u32 });
        // The line goes out whole, outside the timeout: a write cut off half-way would glue the
        // next line (and its descriptors) onto this one.
        if let Err(e) = self.send_with_fds(&request, &fds).await {
            lock(&self.pending).remove(&id);
            return Err(CallError::Io(e.to_string()));
        }
        let result = tokio::time::timeout(timeout, async { rx.await.map_err(|_| CallError::Closed) }).await;
        lock(&self.pending).remove(&id);
        match result {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        }
    }

    fn on_reply(&self, reply: Reply) {
        match lock(&self.pending).remove(&reply.request_id) {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            // A reply after its timeout: the caller has given up already.
            None => tracing::debug!(worker = %self.worker_id, id = %reply.request_id, "reply to no pending request"),
        }
    }

    /// Marks the connection closed; every pending call fails with `Closed`.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        lock(&self.pending).clear();
        lock(&self.quiesce).clear();
    }

    /// Resolves when the peer's `weightsQuiesced` of `model_id` comes (an unmap sent with
    /// `confirmEarly`); an error when it never will (the connection closed, or
    /// [`Self::forget_quiesced`] after the reply).
    pub fn expect_quiesced(&self, model_id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        lock(&self.quiesce).insert(model_id.to_string(), tx);
        rx
    }

    pub fn forget_quiesced(&self, model_id: &str) {
        lock(&self.quiesce).remove(model_id);
    }

    /// Applies a peer's notification; a refused `modelLoaded` returns the notice that tells the
    /// peer why (it has no reply to carry the error).
    fn apply_notification(&self, event: Event, data: &Value) -> Option<ErrorNotice> {
        match event {
            Event::ModelLoaded => match serde_json::from_value::<ModelInfo>(data.clone()) {
                Ok(m) => match self.accept_model(m) {
                    Ok(m) => {
                        lock(&self.models).insert(m.model_id.clone(), m);
                    }
                    Err(notice) => {
                        tracing::warn!(worker = %self.worker_id, "modelLoaded refused: {}", notice.message);
                        return Some(notice);
                    }
                },
                Err(e) => {
                    tracing::warn!(worker = %self.worker_id, "modelLoaded refused: {e}");
                    let model_id = data.get("modelId").and_then(Value::as_str).map(String::from);
                    let message = format!("modelLoaded: {e}");
                    return Some(ErrorNotice { code: codes::INVALID_DATA.into(), message, model_id });
                }
            },
            Event::ModelUnloaded => match serde_json::from_value::<ModelUnloaded>(data.clone()) {
                Ok(u) => {
                    lock(&self.models).remove(&u.model_id);
                }
                Err(e) => tracing::warn!(worker = %self.worker_id, "modelUnloaded refused: {e}"),
            },
            Event::MemoryReport => match serde_json::from_value::<MemoryReport>(data.clone()) {
                Ok(r) => self.apply_report(r),
                Err(e) => tracing::warn!(worker = %self.worker_id, "memoryReport refused: {e}"),
            },
            // Applied by the weights store (read_loop hands it over); nothing to keep here.
            Event::WeightsUsed => {}
            Event::WeightsQuiesced => match serde_json::from_value::<memwarden_protocol::ModelRef>(data.clone()) {
                Ok(r) => {
                    if let Some(tx) = lock(&self.quiesce).remove(&r.model_id) {
                        let _ = tx.send(());
                    }
                }
                Err(e) => tracing::warn!(worker = %self.worker_id, "bad weightsQuiesced: {e}"),
            },
            Event::Error => match serde_json::from_value::<ErrorNotice>(data.clone()) {
                Ok(n) => tracing::warn!(worker = %self.worker_id, code = %n.code, "peer's error notice: {}", n.message),
                Err(e) => tracing::warn!(worker = %self.worker_id, "error notice unreadable: {e}"),
            },
        }
        None
    }

    /// A model the peer says it holds, as the daemon keeps it: valid, on devices of this host,
    /// under their canonical ids. Refused: the notice (or reply) that says why.
    fn accept_model(&self, m: ModelInfo) -> Result<ModelInfo, ErrorNotice> {
        let model_id = Some(m.model_id.clone());
        if let Err(e) = m.validate() {
            return Err(ErrorNotice { code: codes::INVALID_DATA.into(), message: e.to_string(), model_id });
        }
        self.catalog.model(m).map_err(|e| ErrorNotice {
            code: e.code().into(),
            message: format!("model {}: {e}", model_id.as_deref().unwrap_or_default()),
            model_id,
        })
    }

    /// Replaces the model list with a full report (models on devices this host lacks left out).
    pub fn apply_report(&self, report: MemoryReport) {
        let report = self.catalog.report(&self.worker_id, report);
        let models = report.models.iter().filter(|m| m.validate().is_ok()).map(|m| (m.model_id.clone(), m.clone()));
        *lock(&self.models) = models.collect();
        *lock(&self.memory) = MemoryReport { models: Vec::new(), ..report };
    }

    /// Keeps the model list in step with a successful reply.
    pub fn apply_reply(&self, action: Action, request: &Value, reply: &Reply) {
        if !reply.success {
            return;
        }
        match action {
            Action::GetModelInfo if request.get("deviceId").is_none_or(Value::is_null) => {
                if let Ok(r) = reply.data_as::<MemoryReport>() {
                    self.apply_report(r);
                }
            }
            Action::LoadModel => {
                if let Ok(m) = reply.data_as::<ModelInfo>() {
                    match self.accept_model(m) {
                        Ok(m) => {
                            lock(&self.models).insert(m.model_id.clone(), m);
                        }
                        Err(n) => tracing::warn!(worker = %self.worker_id, "loaded model left out: {}", n.message),
                    }
                }
            }
            Action::UnloadModel => {
                if let Some(id) = request.get("modelId").and_then(Value::as_str) {
                    lock(&self.models).remove(id);
                }
            }
            Action::OffloadModel | Action::OptimizeMemory | Action::TrimCache => {
                if let Ok(r) = reply.data_as::<Released>() {
                    let mut models = lock(&self.models);
                    for a in &r.actions {
                        if let Some(id) = a.strip_prefix("unload:") {
                            models.remove(id);
                        }
                    }
                    if let Some(m) = r.model {
                        match self.accept_model(m) {
                            Ok(m) => {
                                models.insert(m.model_id.clone(), m);
                            }
                            Err(n) => {
                                tracing::warn!(worker = %self.worker_id, "released model left out: {}", n.message)
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// The peer's own allocator figures per device, from its last report.
    pub fn allocator_memory(&self) -> BTreeMap<String, memwarden_protocol::DeviceMemory> {
        lock(&self.memory).memory.clone()
    }

    pub fn model_list(&self) -> Vec<ModelInfo> {
        lock(&self.models).values().cloned().collect()
    }
}

/// Answers one request from the peer on its own task: `ping` and `register` here, the rest by
/// `peer`; a version 1 peer gets `NOT_SUPPORTED`.
fn serve_request(conn: &Arc<Conn>, r: Request, peer: Option<Arc<dyn ConnRequests>>) {
    let conn = conn.clone();
    tokio::spawn(async move {
        let (reply, fds) = match (r.action, peer) {
            _ if conn.protocol_version < 2 => (
                Reply::err(r.request_id, codes::NOT_SUPPORTED, "the daemon takes requests from protocol 2 peers only"),
                Vec::new(),
            ),
            _ if r.fds > 0 => {
                (Reply::err(r.request_id, codes::INVALID_DATA, "the daemon takes no descriptors"), Vec::new())
            }
            (Action::Ping, _) => (Reply::ok(r.request_id, serde_json::json!({"pong": true})), Vec::new()),
            (Action::Register, _) => (conn.register(&r), Vec::new()),
            (
                Action::LoadWeights
                | Action::ReleaseWeights
                | Action::ResumeWeights
                | Action::Allocate
                | Action::Free
                | Action::Export,
                Some(p),
            ) => p.handle(conn.clone(), r).await,
            (action, _) => (
                Reply::err(r.request_id, codes::NOT_SUPPORTED, format!("the daemon does not serve `{action}`")),
                Vec::new(),
            ),
        };
        let reply = Reply { fds: fds.len() as u32, ..reply };
        if let Err(e) = conn.send_with_fds(&Message::Reply(reply), &fds).await {
            tracing::warn!(worker = %conn.worker_id, "reply not sent: {e}");
        }
    });
}

impl Conn {
    /// `register`: a model the peer holds in its own framework. The reply names its canonical
    /// device (`gpu-0` → `cuda:0`), which the peer uses from then on; a device this host lacks
    /// is `DEVICE_NOT_FOUND` or `BACKEND_UNAVAILABLE`, and nothing is counted.
    fn register(&self, r: &Request) -> Reply {
        let m = match r.data_as::<ModelInfo>() {
            Ok(m) => m,
            Err(e) => return Reply::err(r.request_id.clone(), e.code, e.message),
        };
        match self.accept_model(m) {
            Ok(m) => {
                let data = serde_json::json!({ "modelId": m.model_id, "deviceId": m.device_id });
                lock(&self.models).insert(m.model_id.clone(), m);
                Reply::ok(r.request_id.clone(), data)
            }
            Err(n) => Reply::err(r.request_id.clone(), &n.code, format!("register: {}", n.message)),
        }
    }
}

/// Tells the peer that a notification of its was refused (an `error` event): a peer that knows
/// it raises the error on its next call, one that does not logs the line.
async fn send_notice(conn: &Conn, notice: ErrorNotice) {
    let data = match serde_json::to_value(&notice) {
        Ok(d) => d,
        Err(e) => return tracing::warn!(worker = %conn.worker_id, "error notice not serializable: {e}"),
    };
    if let Err(e) = conn.send(&Message::Notification(Notification { event: Event::Error, data })).await {
        tracing::warn!(worker = %conn.worker_id, "error notice not sent: {e}");
    }
}

/// Reads the first line, which must be a `hello`.
pub async fn read_hello<R: AsyncRead + Unpin>(reader: &mut LineReader<R>) -> Result<Hello, String> {
    loop {
        match reader.next().await {
            None => return Err("closed before its hello".into()),
            Some(Err(e)) => return Err(format!("reading its hello: {e}")),
            Some(Ok(bytes)) => {
                let line = String::from_utf8_lossy(&bytes);
                if line.trim().is_empty() {
                    continue;
                }
                return match decode(line.trim_end()) {
                    Ok(Message::Hello(h)) => {
                        memwarden_protocol::check_hello(&h).map_err(|e| format!("hello refused: {e}"))?;
                        Ok(h)
                    }
                    Ok(other) => Err(format!("first line was not a hello: {}", encode(&other))),
                    Err(e) => Err(format!("first line was not a hello: {e}")),
                };
            }
        }
    }
}

/// Serves the connection's input until it ends; returns why it ended. Requests from the peer go
/// to `peer` (each on its own task, so a slow one never holds up replies to the daemon's calls).
pub async fn read_loop<R: AsyncRead + Unpin>(
    conn: &Arc<Conn>,
    reader: &mut LineReader<R>,
    peer: Option<Arc<dyn ConnRequests>>,
) -> String {
    while let Some(item) = reader.next().await {
        let bytes = match item {
            Ok(b) => b,
            Err(AnyDelimiterCodecError::MaxChunkLengthExceeded) => {
                tracing::warn!(worker = %conn.worker_id, "dropped a line longer than {MAX_LINE_BYTES} bytes");
                continue;
            }
            Err(AnyDelimiterCodecError::Io(e)) => return format!("read error: {e}"),
        };
        let line = String::from_utf8_lossy(&bytes);
        if line.trim().is_empty() {
            continue;
        }
        match decode(line.trim_end()) {
            Ok(Message::Reply(r)) => conn.on_reply(r),
            Ok(Message::Notification(n)) => match (n.event, &peer) {
                (Event::WeightsUsed, Some(p)) => p.notify(conn, n.event, &n.data),
                _ => {
                    if let Some(notice) = conn.apply_notification(n.event, &n.data) {
                        send_notice(conn, notice).await;
                    }
                }
            },
            Ok(Message::Request(r)) => serve_request(conn, r, peer.clone()),
            Ok(Message::Hello(_)) => tracing::warn!(worker = %conn.worker_id, "ignored a second hello"),
            Err(e) => {
                tracing::warn!(worker = %conn.worker_id, "bad line: {e}");
                if let Some(reply) = e.reply() {
                    let _ = conn.send(&Message::Reply(reply)).await;
                }
            }
        }
    }
    "closed its output".into()
}
