//! The ladder's rung for weights memwarden holds, after the caches and before any worker model
//! is offloaded or unloaded: on a GPU, park resident models (least valuable first), or, while the
//! host is at `high` or above, drop them instead (a parked copy would add to the host's
//! pressure); on the host, drop parked copies, then (unless the strategy never unloads) the
//! models resident on `cpu`. None of it needs a worker. A model it could not release (a
//! holder's `use()` outlasted the bound) is skipped with the reason, noted for a refusal's
//! message, and the next one is tried. Why this rung comes before any worker model: `room.rs`.

use super::room::{HeldBack, HoldReason};
use super::{ms, OptimizeRequest, Optimizer};
use crate::weights::WeightsError;
use memwarden_core::pressure::Level;
use memwarden_core::DeviceId;
use memwarden_protocol::api::{OptimizeOutcome, SkippedRung, StepRecord};
use std::time::Instant;

/// Runs the rung on `optimizer`'s device for `req`, until `target` bytes are free above
/// `base`; returns whether the time limit stopped it.
pub(super) async fn release(
    optimizer: &Optimizer,
    req: &OptimizeRequest,
    target: u64,
    base: i64,
    deadline: Instant,
    out: &mut OptimizeOutcome,
    held_back: &mut Vec<HeldBack>,
) -> bool {
    let Some(store) = optimizer.weights.as_ref() else { return false };
    let device = req.device;
    let host_high = optimizer.level(optimizer.read(DeviceId::Cpu)).1 >= Level::High;
    let (models, action) = if device.is_gpu() {
        (store.park_candidates(device), if host_high { "drop" } else { "park" })
    } else {
        // On the host: parked copies first; then, where the strategy may unload, models
        // resident on `cpu` itself (there is nowhere to park them: a drop keeps the file).
        let mut models = store.drop_candidates();
        let resident = store.park_candidates(DeviceId::Cpu);
        if req.strategy.may_unload() {
            models.extend(resident);
        } else if !resident.is_empty() {
            out.rungs_skipped.push(SkippedRung {
                rung: "drop".into(),
                reason: format!(
                    "{} held model(s) resident on cpu can only be dropped, and the {} strategy never unloads",
                    resident.len(),
                    req.strategy.name()
                ),
            });
        }
        (models, "drop")
    };
    for m in models {
        if (optimizer.measure(device) - base).max(0) as u64 >= target {
            break;
        }
        if Instant::now() >= deadline {
            return true;
        }
        if req.max_models.is_some_and(|max| out.models_offloaded.len() + out.models_unloaded.len() >= max) {
            break;
        }
        if req.exclude.contains(&m.id) || (!req.only.is_empty() && !req.only.contains(&m.id)) {
            continue;
        }
        let t = Instant::now();
        let before = optimizer.measure(device);
        let result = if action == "park" { store.park(&m.id).await } else { store.drop_copy(&m.id).await };
        let (claimed, error) = match result {
            Ok(o) => (o.freed_bytes, None),
            // Skipped with the reason (e.g. a holder still inside `use()`); the ladder goes on.
            Err(e) => {
                held_back.push(HeldBack { model_id: m.id.clone(), reason: reason(&e, store.config().use_bound_ms) });
                (0, Some(e.to_string()))
            }
        };
        let (gained, verified) = optimizer.verify(device, before, claimed).await;
        if error.is_none() {
            // A parked model is back at PCIe speed; a dropped one needs its file read again.
            if action == "park" {
                out.models_offloaded.push(m.id.clone());
            } else {
                out.models_unloaded.push(m.id.clone());
            }
        }
        out.steps.push(StepRecord {
            action: action.into(),
            target: m.id.clone(),
            worker_id: Some("memwarden".into()),
            claimed_bytes: claimed,
            measured_bytes: gained,
            duration_ms: ms(t),
            verified: verified && error.is_none(),
            error,
        });
    }
    false
}

/// Why a park or drop of a held model was refused, for a refusal's message.
fn reason(e: &WeightsError, use_bound_ms: u64) -> HoldReason {
    match e {
        WeightsError::InUse(_) => HoldReason::InUse { bound_ms: use_bound_ms },
        WeightsError::NotSupported(why) => HoldReason::NotReleasable(why.clone()),
        other => HoldReason::Failed(other.to_string()),
    }
}
