//! The ladder's rungs for weights memwarden holds. On a GPU, after the caches: idle resident
//! held models and the worker and client models are **ranked together** by one score
//! (`eviction_score`: priority, time since last use, and the reload rate, which for a held model
//! is the resume a park would cost, from the measured rates), and released in that order: a held
//! model is parked (or, while the host is at `high` or above, dropped: a parked copy would add to
//! the host's pressure), a worker or client model offloaded or unloaded as `eviction::plan`
//! says. At equal priority and idle time a held model goes first, because a park comes back at
//! PCIe speed and a reload reads a file. On the host: drop parked copies, then (unless the
//! strategy never unloads) the models resident on `cpu`, before any worker model. None of the
//! held steps needs a worker. A model it could not release (a holder's `use()` outlasted the
//! bound) is skipped with the reason, noted for a refusal's message, and the next one is tried.

use super::room::{HeldBack, HoldReason};
use super::{ms, OptimizeRequest, Optimizer};
use crate::weights::{HeldModel, WeightsError};
use memwarden_core::eviction::{self, Candidate};
use memwarden_core::pressure::Level;
use memwarden_core::DeviceId;
use memwarden_protocol::api::{OptimizeOutcome, SkippedRung, StepRecord, WeightState};
use std::sync::Arc;
use std::time::Instant;

/// The `workerId` of the steps memwarden takes itself (parks and drops of held weights).
const HELD: &str = "memwarden";

/// The host's held rung, before any worker model: parked copies, then (where the strategy may
/// unload) models resident on `cpu` itself (there is nowhere to park them: a drop keeps the
/// file), until `target` bytes are free above `base`; returns whether the time limit stopped it.
pub(super) async fn release_on_host(
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
    let action = "drop";
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
    for m in models {
        if let Some(by_time) = stop(optimizer, req, target, base, deadline, out) {
            return by_time;
        }
        if req.exclude.contains(&m.id) || (!req.only.is_empty() && !req.only.contains(&m.id)) {
            continue;
        }
        release_one(optimizer, device, &m.id, action, out, held_back).await;
    }
    false
}

/// Whether a rung stops before its next model: `Some(false)` when `target` bytes are free above
/// `base` or `maxModelsToUnload` models were touched, `Some(true)` when the time is up.
fn stop(
    optimizer: &Optimizer,
    req: &OptimizeRequest,
    target: u64,
    base: i64,
    deadline: Instant,
    out: &OptimizeOutcome,
) -> Option<bool> {
    if (optimizer.measure(req.device) - base).max(0) as u64 >= target {
        return Some(false);
    }
    if Instant::now() >= deadline {
        return Some(true);
    }
    let touched = out.models_offloaded.len() + out.models_unloaded.len();
    req.max_models.is_some_and(|max| touched >= max).then_some(false)
}

/// Parks (`action` "park") or drops one held model, re-measured on `device`, as one step of
/// `out`; a refusal is noted in `held_back` with its reason.
async fn release_one(
    optimizer: &Optimizer,
    device: DeviceId,
    id: &str,
    action: &str,
    out: &mut OptimizeOutcome,
    held_back: &mut Vec<HeldBack>,
) {
    let Some(store) = optimizer.weights.as_ref() else { return };
    let t = Instant::now();
    let before = optimizer.measure(device);
    let result = if action == "park" { store.park(id).await } else { store.drop_copy(id).await };
    let (claimed, error) = match result {
        Ok(o) => (o.freed_bytes, None),
        // Skipped with the reason (e.g. a holder still inside `use()`); the ladder goes on.
        Err(e) => {
            held_back.push(HeldBack { model_id: id.to_string(), reason: reason(&e, store.config().use_bound_ms) });
            (0, Some(e.to_string()))
        }
    };
    let (gained, verified) = optimizer.verify(device, before, claimed).await;
    if error.is_none() {
        // A parked model is back at PCIe speed; a dropped one needs its file read again.
        if action == "park" {
            out.models_offloaded.push(id.to_string());
        } else {
            out.models_unloaded.push(id.to_string());
        }
    }
    out.steps.push(StepRecord {
        action: action.into(),
        target: id.to_string(),
        worker_id: Some(HELD.into()),
        claimed_bytes: claimed,
        measured_bytes: gained,
        duration_ms: ms(t),
        verified: verified && error.is_none(),
        error,
    });
}

/// The GPU rungs after the caches: idle held models and (unless no worker or client can be
/// reached) worker and client models, ranked together (module doc), released until `target`
/// bytes are free above `base`; returns whether the time limit stopped it.
pub(super) async fn release_ranked(
    optimizer: &Optimizer,
    req: &OptimizeRequest,
    target: u64,
    base: i64,
    deadline: Instant,
    out: &mut OptimizeOutcome,
    held_back: &mut Vec<HeldBack>,
) -> bool {
    let device = req.device;
    let host_high = optimizer.level(optimizer.read(DeviceId::Cpu)).1 >= Level::High;
    let action = if host_high { "drop" } else { "park" };
    let only = |c: &Candidate| req.only.is_empty() || req.only.contains(&c.model_id);
    let held: Vec<Candidate> = candidates(optimizer, device, host_high).into_iter().filter(only).collect();
    let workers = if super::out_of_reach(optimizer) { Vec::new() } else { optimizer.candidates(device) };
    let worker_cands: Vec<Candidate> = workers.iter().map(|(c, _)| c.clone()).filter(only).collect();
    let freed_so_far = (optimizer.measure(device) - base).max(0) as u64;
    // What each worker or client model's step would be (offload or unload), or none (the
    // strategy never unloads and it cannot be offloaded).
    let host_room = optimizer.host_room();
    let planned =
        eviction::plan(&worker_cands, &req.exclude, target.saturating_sub(freed_so_far), req.strategy, host_room, None);
    let all: Vec<Candidate> = held.iter().chain(worker_cands.iter()).cloned().collect();
    for c in eviction::rank(&all, &req.exclude) {
        if let Some(by_time) = stop(optimizer, req, target, base, deadline, out) {
            return by_time;
        }
        if c.worker_id == HELD && held.iter().any(|h| h.model_id == c.model_id) {
            release_one(optimizer, device, &c.model_id, action, out, held_back).await;
        } else if let Some(p) = planned.iter().find(|p| p.model_id == c.model_id && p.worker_id == c.worker_id) {
            if let Some((_, slot)) =
                workers.iter().find(|(w, _)| w.model_id == p.model_id && w.worker_id == p.worker_id)
            {
                optimizer.release_planned(device, slot, p, out, held_back).await;
            }
        }
    }
    false
}

/// Idle resident held models on `device` (unpinned) as candidates of the ranking: a park is
/// priced as the resume it would cost (a drop, while the host is `high`, as a read of the file).
fn candidates(optimizer: &Optimizer, device: DeviceId, host_high: bool) -> Vec<Candidate> {
    let Some(store) = optimizer.weights.as_ref() else { return Vec::new() };
    let back_from = if host_high { WeightState::Dropped } else { WeightState::Parked };
    let candidate = |m: &Arc<HeldModel>| {
        let bytes = m.file.data_bytes;
        let (idle, back_ms) = m.with_held(|h| (h.last_used.elapsed(), h.resume_estimate_ms_as(back_from, bytes)));
        priced(&m.id, bytes, m.priority, idle.as_secs_f64(), back_ms as f64)
    };
    store.park_candidates(device).iter().map(candidate).collect()
}

/// A held model as a candidate: its reload cost is `back_ms`, what bringing it back would take.
fn priced(id: &str, bytes: u64, priority: u8, idle_secs: f64, back_ms: f64) -> Candidate {
    Candidate {
        model_id: id.to_string(),
        worker_id: HELD.into(),
        size_bytes: bytes,
        priority,
        pinned: false,
        idle_secs,
        load_time_ms: back_ms,
        offloadable: true,
        reloadable: true,
    }
}

/// Why a park or drop of a held model was refused, for a refusal's message.
fn reason(e: &WeightsError, use_bound_ms: u64) -> HoldReason {
    match e {
        WeightsError::InUse(_) => HoldReason::InUse { bound_ms: use_bound_ms },
        WeightsError::NotSupported(why) => HoldReason::NotReleasable(why.clone()),
        other => HoldReason::Failed(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn worker(id: &str, priority: u8, idle_secs: f64, load_ms: f64) -> Candidate {
        Candidate {
            model_id: id.into(),
            worker_id: "worker-1".into(),
            size_bytes: 8 * GIB,
            priority,
            idle_secs,
            load_time_ms: load_ms,
            offloadable: true,
            reloadable: true,
            ..Candidate::default()
        }
    }

    fn order(c: &[Candidate]) -> Vec<&str> {
        eviction::rank(c, &[]).iter().map(|c| c.model_id.as_str()).collect()
    }

    /// One ranking: a held model goes first at equal priority and idle time (a park comes back
    /// at PCIe speed: 8 GiB in 160 ms; the worker's model reloads its file in 4 s), but a
    /// held model of high priority stays while a worker's low-priority model goes, and a
    /// worker model idle for an hour goes before a held model used a second ago.
    #[test]
    fn held_and_worker_models_are_ranked_together() {
        let held = |priority, idle| priced("held", 8 * GIB, priority, idle, 160.0);
        assert_eq!(order(&[worker("w", 50, 60.0, 4000.0), held(50, 60.0)]), ["held", "w"]);
        assert_eq!(order(&[worker("w", 10, 60.0, 4000.0), held(90, 60.0)]), ["w", "held"]);
        assert_eq!(order(&[worker("w", 50, 3600.0, 4000.0), held(50, 1.0)]), ["w", "held"]);
        // A drop (the host is high) is priced as a read of the file: behind a worker model
        // that reloads faster.
        assert_eq!(order(&[worker("w", 50, 60.0, 1000.0), priced("held", 8 * GIB, 50, 60.0, 4000.0)]), ["w", "held"]);
    }
}
