//! The socket's requests: what workers and clients connected to the Unix socket ask of the
//! daemon, answered through the same use cases as the HTTP routes: `loadWeights` (a load),
//! `releaseWeights` and `resumeWeights` (residency), `allocate`, `free` and `export` of memory
//! the connection owns (allocations); `weightsUsed` events; and a closed connection orphaning
//! the weights it held and giving back the memory it owned.

use super::error::AppError;
use super::load::{LoadError, Loads};
use super::{allocations, App};
use crate::service::{AllocateRequest, ExportVia, Service, ServiceError};
use crate::supervisor::{Conn, ConnRequests};
use crate::weights::holder::ConnHolder;
use crate::weights::{LoadRequest, WeightHolder, WeightsError};
use futures_util::future::BoxFuture;
use memwarden_core::DeviceId;
use memwarden_protocol::{
    codes, Action, Event, LoadWeights, ModelRef, PeerAllocate, PeerExport, PeerFree, Reply, Request, DEFAULT_PRIORITY,
};
use memwarden_sys::SharedHandle;
use serde_json::{json, Value};
use std::sync::Arc;

/// Registered with the supervisor by [`App::start`]; holds the app weakly (the app holds the
/// supervisor). A request that arrives while the daemon stops is refused.
pub struct SocketRequests(pub std::sync::Weak<App>);

fn err(id: String, e: &WeightsError) -> (Reply, Vec<SharedHandle>) {
    (Reply::err(id, e.code(), e.to_string()), Vec::new())
}

impl SocketRequests {
    async fn serve(app: Arc<App>, conn: Arc<Conn>, r: Request) -> (Reply, Vec<SharedHandle>) {
        let id = r.request_id.clone();
        let store = app.weights.clone();
        match r.action {
            Action::LoadWeights => load_for(&app, conn, &r).await,
            Action::ReleaseWeights | Action::ResumeWeights => {
                let m: ModelRef = match r.data_as() {
                    Ok(m) => m,
                    Err(e) => return (Reply::err(id, e.code, e.message), Vec::new()),
                };
                let result = if r.action == Action::ReleaseWeights {
                    store.release(&m.model_id, &conn.worker_id).map(|_| ())
                } else {
                    resume_for(&app, &m.model_id, &conn).await
                };
                match result.and_then(|()| store.get(&m.model_id)) {
                    Ok(model) => {
                        let (state, holders) = model.with_held(|h| (h.state, h.holders.len()));
                        (Reply::ok(id, json!({"modelId": m.model_id, "state": state, "holders": holders})), Vec::new())
                    }
                    Err(e) => err(id, &e),
                }
            }
            Action::Allocate | Action::Free => {
                let app = app.clone();
                let action = r.action;
                // A new block can take milliseconds per GiB, and a free may wait for a move.
                let answer = tokio::task::spawn_blocking(move || match action {
                    Action::Allocate => allocate_for(&app, &conn, &r),
                    _ => free_for(&app, &conn, &r),
                })
                .await;
                match answer {
                    Ok(Ok(data)) => (Reply::ok(id, data), Vec::new()),
                    Ok(Err((code, message))) => (Reply::err(id, code, message), Vec::new()),
                    Err(e) => (Reply::err(id, codes::INTERNAL, e.to_string()), Vec::new()),
                }
            }
            Action::Export => {
                let app = app.clone();
                // May wait for a defragmentation batch that is moving the allocation.
                let via = if conn.carries_fds { ExportVia::Socket } else { ExportVia::Http };
                match tokio::task::spawn_blocking(move || export_for(&app, &r, via)).await {
                    Ok(Ok((data, fds))) => (Reply::ok(id, data), fds),
                    Ok(Err((code, message))) => (Reply::err(id, code, message), Vec::new()),
                    Err(e) => (Reply::err(id, codes::INTERNAL, e.to_string()), Vec::new()),
                }
            }
            other => (Reply::err(id, codes::NOT_SUPPORTED, format!("`{other}` is not a peer request")), Vec::new()),
        }
    }
}

/// A peer's `loadWeights`: the model loaded (or shared) through admission, mapped by the peer
/// (the grant and its descriptor in the reply).
async fn load_for(app: &App, conn: Arc<Conn>, r: &Request) -> (Reply, Vec<SharedHandle>) {
    let id = r.request_id.clone();
    let body: LoadWeights = match r.data_as() {
        Ok(b) => b,
        Err(e) => return (Reply::err(id, e.code, e.message), Vec::new()),
    };
    let device = match body.device_id.parse::<DeviceId>() {
        Ok(d) => d,
        Err(e) => return (Reply::err(id, codes::INVALID_DATA, format!("deviceId: {e}")), Vec::new()),
    };
    if body.priority.is_some_and(|p| p > 100) {
        return (Reply::err(id, codes::INVALID_DATA, "priority must be 0-100"), Vec::new());
    }
    let req = LoadRequest {
        path: body.path.into(),
        device,
        name: body.name,
        priority: body.priority.unwrap_or(DEFAULT_PRIORITY),
        pinned: body.pinned.unwrap_or(false),
        keep_alive_ms: body.keep_alive_ms,
    };
    let loads = Loads { optimizer: &app.optimizer, weights: &app.weights };
    match loads.held(req, Some(Arc::new(ConnHolder(conn))), None, None).await {
        Ok(a) => match a.grant {
            Some((grant, fds)) => (Reply::ok(id, grant), fds),
            None => err(id, &WeightsError::Internal("no grant".into())),
        },
        Err(LoadError::Admission(e)) => (Reply::err(id, codes::INSUFFICIENT_MEMORY, e.to_string()), Vec::new()),
        Err(LoadError::Weights(e)) => err(id, &e),
    }
}

type PeerResult = Result<Value, (&'static str, String)>;

fn service_error(e: ServiceError) -> (&'static str, String) {
    (e.code(), e.to_string())
}

/// `allocate`: memory owned by this connection (`ownerClient`), charged to `owner` or else the
/// peer's name. Answers the REST API's allocation object.
fn allocate_for(app: &App, conn: &Conn, r: &Request) -> PeerResult {
    let body: PeerAllocate = r.data_as().map_err(|e| (e.code, e.message))?;
    let kind = body
        .memory_type
        .as_deref()
        .map(str::parse::<memwarden_core::MemoryKind>)
        .transpose()
        .map_err(|e| (codes::INVALID_DATA, format!("memoryType: {e}")))?;
    let request = AllocateRequest {
        kind,
        alignment_bytes: body.alignment.unwrap_or(crate::service::DEFAULT_ALIGNMENT_BYTES),
        purpose: body.purpose,
        owner: Some(body.owner.unwrap_or_else(|| conn.worker_id.clone())),
        owner_client: Some(conn.owner_token()),
        movable: body.movable.unwrap_or(false),
        ..AllocateRequest::new(&body.device_id, body.size_bytes)
    };
    let record = allocations::allocate(app, Some(&body.device_id), request).map_err(service_error)?;
    serde_json::to_value(memwarden_protocol::api::allocations::AllocationDto::from(&*record))
        .map_err(|e| (codes::INTERNAL, e.to_string()))
}

/// `free`: only what this connection allocated.
fn free_for(app: &App, conn: &Conn, r: &Request) -> PeerResult {
    let body: PeerFree = r.data_as().map_err(|e| (e.code, e.message))?;
    let owned = allocations::get(app, &body.allocation_id).map_err(service_error)?;
    if owned.owner_client != Some(conn.owner_token()) {
        return Err((
            codes::PERMISSION_DENIED,
            format!("allocation '{}' was not allocated by this connection", body.allocation_id),
        ));
    }
    let freed = allocations::free(app, &body.allocation_id).map_err(service_error)?;
    Ok(json!({"allocationId": body.allocation_id, "freedBytes": freed.allocated_bytes}))
}

/// `export`: the REST route's answer, and the export's descriptor with the reply where it is one
/// (Vulkan memory's opaque fd). A peer whose connection cannot carry descriptors (`via` =
/// `Http`) is refused memory exported as one.
fn export_for(app: &App, r: &Request, via: ExportVia) -> Result<(Value, Vec<SharedHandle>), (&'static str, String)> {
    let body: PeerExport = r.data_as().map_err(|e| (e.code, e.message))?;
    let info = allocations::export(app, &body.allocation_id, via).map_err(service_error)?;
    let data = serde_json::to_value(info.dto(&body.allocation_id)).map_err(|e| (codes::INTERNAL, e.to_string()))?;
    let fds = info.into_fd().into_iter().collect();
    Ok((data, fds))
}

/// Gives back what a closed connection owned (off the runtime: a free may wait for a move);
/// what a copy still uses is freed when the copy is done.
fn reclaim_for(service: Arc<Service>, client: String) {
    tokio::task::spawn_blocking(move || {
        let (count, bytes, deferred) = service.reclaim_client(&client);
        if count > 0 || !deferred.is_empty() {
            tracing::info!(client = %client, count, bytes, deferred = deferred.len(), "reclaimed the memory of a closed connection");
        }
    });
}

impl ConnRequests for SocketRequests {
    fn handle(&self, conn: Arc<Conn>, request: Request) -> BoxFuture<'static, (Reply, Vec<SharedHandle>)> {
        let Some(app) = self.0.upgrade() else {
            let reply = Reply::err(request.request_id, codes::INTERNAL, "the daemon is stopping");
            return Box::pin(async move { (reply, Vec::new()) });
        };
        Box::pin(Self::serve(app, conn, request))
    }

    fn notify(&self, conn: &Arc<Conn>, event: Event, data: &Value) {
        let Some(app) = self.0.upgrade() else { return };
        if event == Event::WeightsUsed {
            if let Ok(m) = serde_json::from_value::<ModelRef>(data.clone()) {
                app.weights.touch(&m.model_id, &conn.worker_id);
            }
        }
    }

    fn opened(&self, conn: &Arc<Conn>) {
        if let Some(app) = self.0.upgrade() {
            app.service.open_client(&conn.owner_token());
        }
    }

    fn closed(&self, conn: &Arc<Conn>) {
        let Some(app) = self.0.upgrade() else { return };
        app.weights.holder_gone(&conn.worker_id);
        reclaim_for(app.service.clone(), conn.owner_token());
    }

    fn attached(&self, conn: &Arc<Conn>) {
        let Some(app) = self.0.upgrade() else { return };
        let orphans = app.weights.orphans_of(&conn.worker_id);
        if orphans.is_empty() || !conn.carries_fds {
            return;
        }
        let (store, conn) = (app.weights.clone(), conn.clone());
        tokio::spawn(async move {
            for model in orphans {
                match super::hand_off::hand_to(&store, &conn, &model).await {
                    Ok(()) => {
                        tracing::info!(model = %model.id, worker = %conn.worker_id, "re-attached after a restart")
                    }
                    Err(e) => tracing::warn!(model = %model.id, worker = %conn.worker_id, "re-attach failed: {e}"),
                }
            }
        });
    }
}

/// A holder's `resumeWeights` (its `use()` of a parked model): without room, placement makes
/// room first (this model excluded; idle held models parked first), as any resume does.
async fn resume_for(app: &App, id: &str, conn: &Arc<Conn>) -> Result<(), WeightsError> {
    let holder = || -> Arc<dyn WeightHolder> { Arc::new(ConnHolder(conn.clone())) };
    match super::residency::resume_for_holder(app, id, holder).await {
        Ok(_) => Ok(()),
        Err(AppError::Weights(e)) => Err(e),
        Err(AppError::InsufficientMemory(message)) => {
            let model = app.weights.get(id)?;
            Err(WeightsError::InsufficientMemory {
                device: model.device().to_string(),
                needed_bytes: model.file.data_bytes,
                message,
            })
        }
        Err(other) => Err(WeightsError::Internal(other.to_string())),
    }
}
