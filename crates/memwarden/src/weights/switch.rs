//! A switch: park one resident model and resume a parked one on the same GPU in one step, the
//! copy-out and the copy-in overlapped (PCIe is full duplex), the incoming model built from
//! the outgoing one's device memory piece by piece (`DedicatedBlock::switch`). Used when a
//! resume needs the room a park frees: twice the bytes move, in about the time of one way.
//!
//! Both models' `op` locks are held (taken in id order, so two switches over the same pair
//! cannot deadlock). Nothing is half done: the incoming model is resident or still parked, the
//! outgoing one parked or still resident (or, after a broken device context, dropped: its file
//! brings it back), and every pinned chunk goes back to the pool either way.

use super::memory::ParkPool;
use super::ops::{blocking, ms};
use super::{ActionOutcome, HeldModel, Rate, WeightStore, WeightsError};
use crate::sync::lock;
use memwarden_backends::DedicatedMemory;
use memwarden_backends::SwitchLeft;
use memwarden_protocol::api::WeightState;
use std::sync::Arc;
use std::time::Instant;

/// What a switch did: the outgoing model's park and the incoming model's resume.
#[derive(Debug, Clone)]
pub struct SwitchOutcome {
    pub parked: ActionOutcome,
    pub resumed: ActionOutcome,
    /// Whether the two copies overlapped (a GPU whose memory comes in pieces).
    pub overlapped: bool,
}

/// What the copy step of a switch hands back: bytes freed, the resume's rate, the phases and
/// whether the copies overlapped.
type Copied = (u64, Rate, Vec<(&'static str, f64)>, bool);

/// Parks `out_id` and resumes `in_id` in its place (module doc). `in_id` must be parked and
/// `out_id` resident on the same GPU; `NotSupported` otherwise, `InUse` when a holder of
/// `out_id` keeps a `use()` open past the bound (nothing changed then).
pub async fn switch(store: &Arc<WeightStore>, out_id: &str, in_id: &str) -> Result<SwitchOutcome, WeightsError> {
    let (out, inc) = (store.get(out_id)?, store.get(in_id)?);
    if out.id == inc.id {
        return Err(WeightsError::NotSupported(format!("model {out_id} cannot make room for itself")));
    }
    // Id order: a switch the other way round waits instead of deadlocking.
    let (first, second) = if out.id < inc.id { (&out, &inc) } else { (&inc, &out) };
    let _a = first.op.lock().await;
    let _b = second.op.lock().await;
    store.still_held(&out)?;
    store.still_held(&inc)?;
    let device = out.device();
    let arena = store.arena(device)?;
    let ready = out.with_held(|h| matches!(h.state, WeightState::Resident | WeightState::Orphaned))
        && inc.with_held(|h| h.state == WeightState::Parked && h.parked.is_some() && h.device == device);
    if !ready || !arena.can_park() || out.pinned {
        return Err(WeightsError::NotSupported(format!(
            "a switch parks a resident unpinned model and resumes a parked one on the same GPU \
             ({out_id}: {} on {device}{}, {in_id}: {} on {})",
            out.state().as_str(),
            if out.pinned { ", pinned" } else { "" },
            inc.state().as_str(),
            inc.device()
        )));
    }
    let unmap_started = Instant::now();
    store.unmap_holders(&out, false).await?;
    let unmap_ms = ms(unmap_started);
    let (pool, o, i) = (store.park_pool.clone(), out.clone(), inc.clone());
    match blocking(move || copy(&pool, &*arena, &o, &i)).await {
        Ok((freed_bytes, rate, mut phases, overlapped)) => {
            phases.insert(0, ("unmapHolders", unmap_ms));
            let holders = inc.with_held(|h| h.holders.values().map(|e| e.holder.clone()).collect());
            let t = Instant::now();
            store.remap_holders(&inc, holders).await;
            phases.push(("remapHolders", ms(t)));
            let park_rate = out.with_held(|h| h.park.clone());
            Ok(SwitchOutcome {
                parked: ActionOutcome { action: "park", freed_bytes, rate: park_rate, phases: Vec::new() },
                resumed: ActionOutcome { action: "resume", freed_bytes: 0, rate: Some(rate), phases },
                overlapped,
            })
        }
        Err(e) => {
            if out.with_held(|h| h.block.is_some()) {
                let holders = out.with_held(|h| h.holders.values().map(|e| e.holder.clone()).collect());
                store.remap_holders(&out, holders).await;
            }
            Err(e)
        }
    }
}

/// The copy step, on a blocking thread: pinned chunks for `o`, the block's switch, and each
/// model's state after it, whole either way (module doc).
fn copy(
    pool: &Arc<ParkPool>,
    arena: &dyn DedicatedMemory,
    o: &HeldModel,
    i: &HeldModel,
) -> Result<Copied, WeightsError> {
    let Some(block) = lock(&o.held).block.take() else {
        return Err(WeightsError::Internal(format!("model {} has no resident memory", o.id)));
    };
    let t = Instant::now();
    let buf = match pool.take(o.file.data_bytes) {
        Ok(buf) => buf,
        Err(e) => {
            lock(&o.held).block = Some(block);
            return Err(e);
        }
    };
    let take_ms = ms(t);
    let Some(parked) = lock(&i.held).parked.take() else {
        lock(&o.held).block = Some(block);
        return Err(WeightsError::Internal(format!("model {} has no parked copy", i.id)));
    };
    let copy_started = Instant::now();
    let switched =
        block.switch(arena, &buf.pieces(o.file.data_bytes), i.file.data_bytes, &parked.pieces(i.file.data_bytes));
    let elapsed = copy_started.elapsed();
    let sw = match switched {
        Ok(sw) => sw,
        Err(f) => {
            lock(&i.held).parked = Some(parked);
            let mut h = lock(&o.held);
            match f.left {
                SwitchLeft::Resident(block) => h.block = Some(block),
                SwitchLeft::Saved => {
                    h.parked = Some(buf);
                    h.set_state(WeightState::Parked);
                }
                SwitchLeft::Lost => {
                    tracing::error!(model = %o.id, "a failed switch lost the model's device copy: dropped");
                    h.set_state(WeightState::Dropped);
                }
            }
            return Err(WeightsError::from(f.error));
        }
    };
    let t = Instant::now();
    drop(parked);
    let release_ms = ms(t);
    let out_ms: f64 = sw.phases.iter().filter(|(p, _)| !p.starts_with("copyIn")).map(|(_, ms)| *ms).sum();
    {
        let mut h = lock(&o.held);
        h.parked = Some(buf);
        h.set_state(WeightState::Parked);
        h.park = Some(Rate::now(o.file.data_bytes, std::time::Duration::from_secs_f64(out_ms / 1e3)));
    }
    let rate = Rate::now(i.file.data_bytes, elapsed);
    {
        let mut h = lock(&i.held);
        h.block = Some(sw.block);
        h.set_state(WeightState::Resident);
        h.resume = Some(rate.clone());
        h.touch();
    }
    let mut phases = vec![("takePinned", take_ms)];
    phases.extend(sw.phases.iter().copied());
    phases.push(("releasePinned", release_ms));
    Ok((o.file.data_bytes, rate, phases, sw.overlapped))
}

/// The resident models a switch to `inc` could park, least valuable first: unpinned, on its
/// device, each big enough that its memory plus `available_bytes` holds `inc`.
pub fn switch_partners(store: &WeightStore, inc: &HeldModel, available_bytes: u64) -> Vec<Arc<HeldModel>> {
    store
        .park_candidates(inc.device())
        .into_iter()
        .filter(|m| m.id != inc.id)
        .filter(|m| {
            m.with_held(|h| h.block.as_ref().map_or(0, |b| b.size_bytes())) + available_bytes >= inc.file.data_bytes
        })
        .collect()
}
