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

impl WeightStore {
    /// Applies the policy once; returns what it did (`(model, action)`), failures logged.
    pub async fn policy_tick(self: &Arc<Self>) -> Vec<(String, Due)> {
        let mut done = Vec::new();
        for model in self.models() {
            let can_park = self.arena(model.device()).map(|a| a.can_park()).unwrap_or(false);
            let Some(what) = due(self, &model, can_park) else { continue };
            let result = match what {
                Due::Park => self.park(&model.id).await,
                Due::Drop => self.drop_copy(&model.id).await,
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

    /// Runs the policy every second until the daemon stops.
    pub fn start_policy(self: &Arc<Self>) {
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(store) = store.upgrade() else { break };
                store.policy_tick().await;
            }
        });
    }

    /// Resident models on `device` the optimizer may park (on `cpu`: drop), least valuable
    /// first (priority, then least recently used).
    pub fn park_candidates(&self, device: memwarden_core::DeviceId) -> Vec<Arc<HeldModel>> {
        let mut out: Vec<Arc<HeldModel>> = self
            .models()
            .into_iter()
            .filter(|m| !m.pinned && m.device() == device)
            .filter(|m| matches!(m.state(), WeightState::Resident | WeightState::Orphaned))
            .collect();
        out.sort_by_key(|m| (m.priority, m.with_held(|h| h.last_used)));
        out
    }

    /// Host memory the held weights take: models resident on `cpu` and every parked copy.
    pub fn host_bytes(&self) -> u64 {
        self.models()
            .iter()
            .map(|m| {
                m.with_held(|h| {
                    let resident = if h.device.is_gpu() { 0 } else { h.block.as_ref().map_or(0, |b| b.size_bytes()) };
                    resident + h.parked.as_ref().map_or(0, |p| p.bytes())
                })
            })
            .sum()
    }

    /// Parked copies the optimizer may drop under host pressure, least valuable first.
    pub fn drop_candidates(&self) -> Vec<Arc<HeldModel>> {
        let mut out: Vec<Arc<HeldModel>> =
            self.models().into_iter().filter(|m| !m.pinned && m.state() == WeightState::Parked).collect();
        out.sort_by_key(|m| (m.priority, m.with_held(|h| h.last_used)));
        out
    }
}
