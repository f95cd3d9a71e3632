//! Handing a model memwarden holds to a supervised worker, which maps it (`loadModel` with the
//! grant and its descriptor): after a load over HTTP, and when a restarted worker re-attaches
//! what it held.

use crate::placement::Placement;
use crate::supervisor::Conn;
use crate::weights::holder::ConnHolder;
use crate::weights::{HeldModel, WeightStore};
use memwarden_protocol::Action;
use std::sync::Arc;

/// Has a supervised worker map a held model: `loadModel` with the grant and its descriptor.
pub async fn hand_to(store: &Arc<WeightStore>, conn: &Arc<Conn>, model: &Arc<HeldModel>) -> Result<(), String> {
    let holder = Arc::new(ConnHolder(conn.clone()));
    let (grant, fds) = store.attach_holder(model, holder).await.map_err(|e| e.to_string())?;
    let req = memwarden_protocol::LoadModel {
        path: model.file.path.display().to_string(),
        name: Some(model.name.clone()),
        device_id: grant.device_id.clone(),
        priority: model.priority,
        pinned: model.pinned,
        model_id: Some(model.id.clone()),
        weights: Some(grant),
    };
    let data = serde_json::to_value(&req).map_err(|e| e.to_string())?;
    let timeout = std::time::Duration::from_secs(60);
    let result = conn.call_with_fds(Action::LoadModel, data.clone(), fds, timeout).await;
    match result {
        Ok(reply) if reply.success => {
            conn.apply_reply(Action::LoadModel, &data, &reply);
            Ok(())
        }
        other => {
            store.detach(model, &conn.worker_id);
            Err(match other {
                Ok(reply) => reply.error.map(|e| format!("{}: {}", e.code, e.message)).unwrap_or_default(),
                Err(e) => format!("{e:?}"),
            })
        }
    }
}

/// Hands a freshly loaded model to the least loaded ready worker that serves its device and
/// can take descriptors; none: the model stays held by memwarden alone (for clients to map).
pub async fn hand_to_worker(store: &Arc<WeightStore>, placement: &Placement, model: &Arc<HeldModel>) {
    let device = model.device().to_string();
    let conn = placement.worker_for(&device, |c| c.carries_fds).and_then(|s| s.conn());
    if let Some(conn) = conn {
        if let Err(e) = hand_to(store, &conn, model).await {
            tracing::warn!(model = %model.id, worker = %conn.worker_id, "the worker did not map the weights: {e}");
        }
    }
}
