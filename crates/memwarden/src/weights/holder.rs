//! The processes that map a model's weights, as the store talks to them: ask one to unmap
//! (once its `use()`s have ended) and to map new memory. A protocol connection is one
//! ([`ConnHolder`]); the store's tests use their own.

use crate::supervisor::{CallError, Conn};
use futures_util::future::BoxFuture;
use memwarden_protocol::{codes, Action, UnmapWeights, WeightsGrant};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HolderError {
    /// A `use()` stayed open past the bound: nothing was unmapped.
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    Failed(String),
}

pub trait WeightHolder: Send + Sync {
    fn holder_id(&self) -> String;
    /// Unmap the model once no `use()` is open (waiting at most `req.timeout_ms`).
    fn unmap(&self, req: UnmapWeights) -> BoxFuture<'static, Result<(), HolderError>>;
    /// Map new memory for the model (same device: at the old address).
    fn remap(&self, grant: WeightsGrant, fd: OwnedFd) -> BoxFuture<'static, Result<(), HolderError>>;
}

/// A worker or client on a protocol connection.
pub struct ConnHolder(pub Arc<Conn>);

/// Slack on top of the holder's own bound for the reply to arrive.
const REPLY_SLACK: Duration = Duration::from_secs(5);

fn holder_error(worker: &str, r: Result<memwarden_protocol::Reply, CallError>) -> Result<(), HolderError> {
    match r {
        Ok(reply) if reply.success => Ok(()),
        Ok(reply) => {
            let e = reply.error.unwrap_or(memwarden_protocol::ErrorInfo {
                code: codes::INTERNAL.into(),
                message: "failed without a reason".into(),
            });
            let message = format!("{worker}: {}: {}", e.code, e.message);
            Err(if e.code == codes::IN_USE { HolderError::InUse(message) } else { HolderError::Failed(message) })
        }
        Err(e) => Err(HolderError::Failed(format!("{worker}: {e:?}"))),
    }
}

impl WeightHolder for ConnHolder {
    fn holder_id(&self) -> String {
        self.0.worker_id.clone()
    }

    fn unmap(&self, req: UnmapWeights) -> BoxFuture<'static, Result<(), HolderError>> {
        let conn = self.0.clone();
        Box::pin(async move {
            let timeout = Duration::from_millis(req.timeout_ms) + REPLY_SLACK;
            let data = serde_json::to_value(&req).unwrap_or_default();
            let r = conn.call_with_fds(Action::UnmapWeights, data, Vec::new(), timeout).await;
            holder_error(&conn.worker_id, r)
        })
    }

    fn remap(&self, grant: WeightsGrant, fd: OwnedFd) -> BoxFuture<'static, Result<(), HolderError>> {
        let conn = self.0.clone();
        Box::pin(async move {
            let data = serde_json::to_value(&grant).unwrap_or_default();
            let r = conn.call_with_fds(Action::RemapWeights, data, vec![fd], REPLY_SLACK * 6).await;
            holder_error(&conn.worker_id, r)
        })
    }
}
