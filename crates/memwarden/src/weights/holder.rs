//! The processes that map a model's weights, as the store talks to them: ask one to unmap
//! (once its `use()`s have ended) and to map new memory. A protocol connection is one
//! ([`ConnHolder`]); the store's tests use their own.

use crate::supervisor::{CallError, Conn};
use futures_util::future::{BoxFuture, Either};
use futures_util::FutureExt;
use memwarden_protocol::{codes, Action, UnmapWeights, WeightsGrant};
use memwarden_sys::SharedHandle;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HolderError {
    /// A `use()` stayed open past the bound: nothing was unmapped.
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    Failed(String),
    /// The holder is gone (its connection closed) or no longer maps the model: nothing of it
    /// is left to unmap.
    #[error("{0}")]
    Gone(String),
}

pub trait WeightHolder: Send + Sync {
    fn holder_id(&self) -> String;
    /// Whether the holder can still be reached (a closed connection cannot).
    fn alive(&self) -> bool {
        true
    }
    /// Unmap the model once no `use()` is open (waiting at most `req.timeout_ms`).
    fn unmap(&self, req: UnmapWeights) -> BoxFuture<'static, Result<(), HolderError>>;
    /// The same unmap in two steps ([`Unmapping`]); a holder that cannot say when it is quiet
    /// is quiet once it has unmapped.
    fn unmap_early(&self, req: UnmapWeights) -> Unmapping {
        Unmapping::when_done(self.unmap(req))
    }
    /// Map new memory for the model (same device: at the old address): one descriptor per
    /// piece of the grant.
    fn remap(&self, grant: WeightsGrant, fds: Vec<SharedHandle>) -> BoxFuture<'static, Result<(), HolderError>>;
}

/// An unmap in two steps: `quiesced` once the holder has no `use()` open and lets none start
/// (the memory's content is final: a park may copy it out), `done` once it has unmapped (its
/// mapping no longer keeps the memory alive).
pub struct Unmapping {
    pub quiesced: BoxFuture<'static, Result<(), HolderError>>,
    pub done: BoxFuture<'static, Result<(), HolderError>>,
}

impl Unmapping {
    /// Quiet when done.
    pub fn when_done(done: BoxFuture<'static, Result<(), HolderError>>) -> Unmapping {
        let done = done.shared();
        Unmapping { quiesced: done.clone().boxed(), done: done.boxed() }
    }
}

/// Holders that are quiet, each with its unmap still to come.
pub type Unmaps = Vec<(Arc<dyn WeightHolder>, BoxFuture<'static, Result<(), HolderError>>)>;

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
            Err(match e.code.as_str() {
                codes::IN_USE => HolderError::InUse(message),
                codes::MODEL_NOT_FOUND => HolderError::Gone(message),
                _ => HolderError::Failed(message),
            })
        }
        Err(CallError::Closed) => Err(HolderError::Gone(format!("{worker}: its connection closed"))),
        Err(e) => Err(HolderError::Failed(format!("{worker}: {e:?}"))),
    }
}

impl WeightHolder for ConnHolder {
    fn holder_id(&self) -> String {
        self.0.worker_id.clone()
    }

    fn alive(&self) -> bool {
        !self.0.is_closed()
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

    /// Sent with `confirmEarly`: quiet when the peer's `weightsQuiesced` comes, or (a peer that
    /// does not send it) when it replies.
    fn unmap_early(&self, mut req: UnmapWeights) -> Unmapping {
        let (conn, model_id) = (self.0.clone(), req.model_id.clone());
        let early = conn.expect_quiesced(&model_id);
        req.confirm_early = true;
        let call = self.unmap(req);
        let done = async move {
            let r = call.await;
            conn.forget_quiesced(&model_id);
            r
        }
        .boxed()
        .shared();
        let reply = done.clone();
        let quiesced = async move {
            match futures_util::future::select(early, reply).await {
                Either::Left((Ok(()), _)) => Ok(()),
                Either::Left((Err(_), reply)) => reply.await,
                Either::Right((r, _)) => r,
            }
        };
        Unmapping { quiesced: quiesced.boxed(), done: done.boxed() }
    }

    fn remap(&self, grant: WeightsGrant, fds: Vec<SharedHandle>) -> BoxFuture<'static, Result<(), HolderError>> {
        let conn = self.0.clone();
        Box::pin(async move {
            let data = serde_json::to_value(&grant).unwrap_or_default();
            let r = conn.call_with_fds(Action::RemapWeights, data, fds, REPLY_SLACK * 6).await;
            holder_error(&conn.worker_id, r)
        })
    }
}
