//! The weights store as the protocol's peers see it: `loadWeights`, `releaseWeights` and
//! `resumeWeights` requests, `weightsUsed` events, and a closed connection orphaning what it
//! held.

use super::holder::ConnHolder;
use super::{LoadRequest, WeightStore, WeightsError};
use crate::supervisor::{Conn, PeerRequests};
use futures_util::future::BoxFuture;
use memwarden_core::DeviceId;
use memwarden_protocol::{codes, Action, Event, LoadWeights, ModelRef, Reply, Request, DEFAULT_PRIORITY};
use serde_json::{json, Value};
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// Registered with the supervisor by the server.
pub struct WeightsPeer(pub Arc<WeightStore>);

fn err(id: String, e: &WeightsError) -> (Reply, Vec<OwnedFd>) {
    (Reply::err(id, e.code(), e.to_string()), Vec::new())
}

impl WeightsPeer {
    async fn serve(store: Arc<WeightStore>, conn: Arc<Conn>, r: Request) -> (Reply, Vec<OwnedFd>) {
        let id = r.request_id.clone();
        match r.action {
            Action::LoadWeights => {
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
                match store.load(req, Some(Arc::new(ConnHolder(conn)))).await {
                    Ok(a) => match a.grant {
                        Some((grant, fd)) => (Reply::ok(id, grant), vec![fd]),
                        None => err(id, &WeightsError::Internal("no grant".into())),
                    },
                    Err(e) => err(id, &e),
                }
            }
            Action::ReleaseWeights | Action::ResumeWeights => {
                let m: ModelRef = match r.data_as() {
                    Ok(m) => m,
                    Err(e) => return (Reply::err(id, e.code, e.message), Vec::new()),
                };
                let result = if r.action == Action::ReleaseWeights {
                    store.release(&m.model_id, &conn.worker_id).map(|_| ())
                } else {
                    store.ensure_resident(&m.model_id).await.map(|_| ())
                };
                match result.and_then(|()| store.get(&m.model_id)) {
                    Ok(model) => {
                        let (state, holders) = model.with_held(|h| (h.state, h.holders.len()));
                        (Reply::ok(id, json!({"modelId": m.model_id, "state": state, "holders": holders})), Vec::new())
                    }
                    Err(e) => err(id, &e),
                }
            }
            other => (Reply::err(id, codes::NOT_SUPPORTED, format!("`{other}` is not a weights request")), Vec::new()),
        }
    }
}

impl PeerRequests for WeightsPeer {
    fn handle(&self, conn: Arc<Conn>, request: Request) -> BoxFuture<'static, (Reply, Vec<OwnedFd>)> {
        Box::pin(Self::serve(self.0.clone(), conn, request))
    }

    fn notify(&self, conn: &Arc<Conn>, event: Event, data: &Value) {
        if event == Event::WeightsUsed {
            if let Ok(m) = serde_json::from_value::<ModelRef>(data.clone()) {
                self.0.touch(&m.model_id, &conn.worker_id);
            }
        }
    }

    fn closed(&self, conn: &Arc<Conn>) {
        self.0.holder_gone(&conn.worker_id);
    }
}
