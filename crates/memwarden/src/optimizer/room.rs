//! Making room on a device for a model that needs it (a load, a resume, a move, a holder's
//! `use()` of a parked model): what could be released there ([`room`], the one
//! figure both admission's pre-check and its refusal use), the models held back and why
//! ([`HeldBack`]), the ladder run for the shortfall ([`make_room`]), and the
//! per-device lock that serializes "make room, then take it" sections ([`room_lock`]),
//! so two requests racing for the same room are served one after the other: the second
//! re-checks after the first has taken its share, and makes room of its own when none is left.
//!
//! Order of release: the ladder's rungs (`mod.rs`): caches, then, on a GPU, memwarden's idle
//! held weights and the worker and client models **ranked together** by one score
//! (`memwarden_core::eviction::eviction_score`: priority, time since last use, reload rate;
//! `held.rs`). A held model's reload rate is the resume a park would cost, from the measured
//! rates, so at equal priority and idle time it goes first: a park is the cheapest release
//! there is (the bytes move to pinned host memory at PCIe speed, the model keeps its id and its
//! holders' addresses, and a resume is a copy, no file read, no process involved), where
//! offloading or unloading a worker's model costs a reload from its file or its process's
//! cooperation. A held model of high priority, or used a moment ago, still stays while a
//! worker's low-priority model long idle goes. On the host, parked copies are dropped first.

use super::{OptimizeRequest, Optimizer};
use crate::sync::lock;
use memwarden_core::eviction::EvictionStrategy;
use memwarden_core::{DeviceId, MemoryKind};
use memwarden_protocol::api::WeightState;
use std::fmt;
use std::sync::Arc;

/// The owner of admission's reservations (a quota may limit it like any owner): a load
/// admitted and still running holds one.
pub(super) const ADMISSION_OWNER: &str = "memwarden-admission";

/// Why the ladder cannot release a model on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldReason {
    /// The model is pinned: nothing releases it but an explicit unload.
    Pinned,
    /// A holder's `use()` outlasted the bound when asked to unmap (`IN_USE`).
    InUse { bound_ms: u64 },
    /// The model cannot be parked, offloaded or unloaded here; why.
    NotReleasable(String),
    /// Releasing it was tried and failed; the error.
    Failed(String),
}

/// A model left on a device that the ladder did not (or could not) release, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldBack {
    pub model_id: String,
    pub reason: HoldReason,
}

impl fmt::Display for HeldBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            HoldReason::Pinned => write!(f, "{} (pinned)", self.model_id),
            HoldReason::InUse { bound_ms } => write!(f, "{} (in use past {bound_ms} ms)", self.model_id),
            HoldReason::NotReleasable(why) => write!(f, "{} (not releasable: {why})", self.model_id),
            HoldReason::Failed(why) => write!(f, "{} (release failed: {why})", self.model_id),
        }
    }
}

/// `w-3 (pinned), w-5 (in use past 2000 ms)`: the models held back, for a refusal's message;
/// empty when there are none.
pub fn names(held_back: &[HeldBack]) -> String {
    held_back.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// `; held back: …` for a message, or nothing when no model was held back.
pub(crate) fn held_back_note(held_back: &[HeldBack]) -> String {
    if held_back.is_empty() {
        String::new()
    } else {
        format!("; held back: {}", names(held_back))
    }
}

/// Adds `more` to `into`, one entry per model (the first reason found stays).
pub(crate) fn merge(into: &mut Vec<HeldBack>, more: Vec<HeldBack>) {
    for h in more {
        if !into.iter().any(|x| x.model_id == h.model_id) {
            into.push(h);
        }
    }
}

/// What the ladder could release on a device now, and the models it would leave there.
#[derive(Debug, Clone, Default)]
pub struct Room {
    /// Idle held models (resident or orphaned, unpinned: parked on a GPU, dropped on `cpu`),
    /// parked copies (on `cpu`), unpinned worker and client models, and cached empty pool
    /// blocks, in bytes.
    pub releasable_bytes: u64,
    /// Models on the device the ladder may not release (pinned), with the reason. The
    /// caller's excluded models are not listed: the model asking for room is not in the way.
    pub held_back: Vec<HeldBack>,
}

/// What the ladder could release on `device`, never counting the models in `exclude` (the
/// one that needs the room), and the models it would leave there and why. Both admission's
/// pre-check and its refusal read this one figure.
pub fn room(o: &Optimizer, device: DeviceId, exclude: &[String]) -> Room {
    let mut room = Room::default();
    for (c, _) in o.candidates(device) {
        if exclude.contains(&c.model_id) {
            continue;
        }
        if c.pinned {
            room.held_back.push(HeldBack { model_id: c.model_id.clone(), reason: HoldReason::Pinned });
        } else {
            room.releasable_bytes += c.size_bytes;
        }
    }
    if let Some(store) = o.weights.as_ref() {
        for m in store.models() {
            if exclude.contains(&m.id) {
                continue;
            }
            let (state, on, resident, parked) = m.with_held(|h| {
                let resident = h.block.as_ref().map_or(0, |b| b.size_bytes());
                (h.state, h.device, resident, h.parked.as_ref().map_or(0, |p| p.bytes()))
            });
            let occupies = match state {
                WeightState::Resident | WeightState::Orphaned if on == device => resident,
                // A parked copy is host memory: on `cpu` the ladder drops it.
                WeightState::Parked if device == DeviceId::Cpu => parked,
                _ => 0,
            };
            if occupies == 0 {
                continue;
            }
            if m.pinned {
                room.held_back.push(HeldBack { model_id: m.id.clone(), reason: HoldReason::Pinned });
            } else {
                room.releasable_bytes += occupies;
            }
        }
    }
    room.releasable_bytes +=
        o.service.status(device).map(|s| s.pools.iter().map(|(_, p)| p.empty_block_bytes).sum()).unwrap_or(0);
    room
}

/// The lock that serializes "make room on `device`, then take it" sections: admission's
/// retry after its run, and a resume's or move's make-room and retry
/// ([`crate::placement::Placement::room_lock`]). Take it only after the first, unlocked
/// attempt failed for want of memory, and never while holding a model's operation lock.
pub async fn room_lock(o: &Optimizer, device: DeviceId) -> tokio::sync::OwnedMutexGuard<()> {
    let room = lock(&o.rooms).entry(device).or_insert_with(|| Arc::new(tokio::sync::Mutex::new(()))).clone();
    room.lock_owned().await
}

/// Bytes reserved on `device` (loads in progress, through admission, and any other
/// reservation): memory the driver still shows free that is already spoken for.
fn reserved_bytes(o: &Optimizer, device: DeviceId) -> u64 {
    o.service.allocations(Some(device)).iter().filter(|a| a.kind == MemoryKind::Reservation).map(|a| a.size_bytes).sum()
}

/// Whether loads admitted on `device` are still running (their admission tickets are out).
pub(super) fn loads_in_flight(o: &Optimizer, device: DeviceId) -> bool {
    o.service
        .allocations(Some(device))
        .iter()
        .any(|a| a.kind == MemoryKind::Reservation && a.owner.as_deref() == Some(ADMISSION_OWNER))
}

/// Runs the ladder until `bytes` fit on `device` beside what loads in progress reserved,
/// never touching `exclude` (the model that needs the room). Nothing runs when they fit
/// already (the loser of a race, after the winner); nothing is touched when even releasing
/// everything allowed would not make room. `Err` names the bytes needed and available, and
/// the models left and why. Callers hold [`room_lock`] across this and the attempt that takes
/// the room.
pub async fn make_room(o: &Optimizer, device: DeviceId, bytes: u64, exclude: &str) -> Result<(), String> {
    let exclude = vec![exclude.to_string()];
    let available = o.read(device).1;
    let need = bytes.saturating_add(reserved_bytes(o, device)).saturating_sub(available);
    if need == 0 {
        return Ok(());
    }
    let room = room(o, device, &exclude);
    // When even releasing everything allowed would not make room, touch nothing.
    let missing = bytes.saturating_sub(available);
    if missing > room.releasable_bytes {
        return Err(format!(
            "{bytes} bytes needed on {device}, {available} available, and only {} could be released (idle held \
             models, unpinned worker and client models, cached pool blocks); nothing was released{}",
            room.releasable_bytes,
            held_back_note(&room.held_back)
        ));
    }
    let mut req = OptimizeRequest::new(device, EvictionStrategy::Balanced, "admission", &o.config);
    req.min_memory_to_free = need;
    req.exclude = exclude;
    let (report, mut held_back) = o.run_noting(req).await;
    let available = o.read(device).1;
    if available < bytes {
        merge(&mut held_back, room.held_back);
        return Err(format!(
            "{bytes} bytes needed on {device}, {available} available after the ladder freed {} bytes \
             (it could release at most {}){}",
            report.memory_freed,
            room.releasable_bytes,
            held_back_note(&held_back)
        ));
    }
    Ok(())
}
