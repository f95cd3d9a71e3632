//! Time-driven policy for held weights, run once a second: orphans past their grace period and
//! models idle past their `keepAlive` are parked (on cpu: dropped); parked copies older than
//! `weights.drop_after_ms` are dropped. Models whose holders never mark `use()` are not parked
//! by keep-alive (nothing would tell them apart from a model in constant use).

use super::{HeldModel, WeightStore};
use memwarden_protocol::api::WeightState;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    Park,
    Drop,
}

/// What the policy would do to `model` now (`can_park`: its device has a park path).
pub fn due(store: &WeightStore, model: &HeldModel, can_park: bool) -> Option<Due> {
    let cfg = store.config();
    let rest = if can_park { Due::Park } else { Due::Drop };
    model.with_held(|h| match h.state {
        WeightState::Orphaned => {
            h.orphaned_since.filter(|s| s.elapsed() >= Duration::from_millis(cfg.orphan_grace_ms)).map(|_| rest)
        }
        WeightState::Resident if !model.pinned => {
            let keep = model.keep_alive_ms?;
            let idle = h.last_used.elapsed() >= Duration::from_millis(keep);
            let unwatched = h.holders.values().all(|e| e.marks_use);
            (idle && unwatched).then_some(rest)
        }
        WeightState::Parked if cfg.drop_after_ms > 0 && !model.pinned => {
            (h.state_since.elapsed() >= Duration::from_millis(cfg.drop_after_ms)).then_some(Due::Drop)
        }
        _ => None,
    })
}

/// The keep-alive policy: applies [`due`] to every held model once a second, parking (on cpu:
/// dropping) what is due. Holds the store weakly: it ends with the store.
pub struct KeepAlive;

impl KeepAlive {
    /// Applies the policy once; returns what it did (`(model, action)`), failures logged.
    pub async fn tick(store: &Arc<WeightStore>) -> Vec<(String, Due)> {
        let mut done = Vec::new();
        for model in store.models() {
            let can_park = store.arena(model.device()).map(|a| a.can_park()).unwrap_or(false);
            let Some(what) = due(store, &model, can_park) else { continue };
            let result = match what {
                Due::Park => store.park(&model.id).await,
                Due::Drop => store.drop_copy(&model.id).await,
            };
            match result {
                Ok(o) if o.action != "none" => {
                    tracing::info!(model = %model.id, action = o.action, "weights policy");
                    done.push((model.id.clone(), what));
                }
                Ok(_) => {}
                Err(e) => tracing::info!(model = %model.id, "weights policy skipped {what:?}: {e}"),
            }
        }
        done
    }

    /// Runs the policy over `store` every second until the store is gone.
    pub fn start(store: &Arc<WeightStore>) {
        let store = Arc::downgrade(store);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(store) = store.upgrade() else { break };
                KeepAlive::tick(&store).await;
            }
        });
    }
}
