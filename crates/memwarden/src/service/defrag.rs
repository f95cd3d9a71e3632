//! Defragmentation executed by the service: plan with the core planner, move the bytes with the
//! device's backend, switch each allocation to its new place (its `generation` grows), then
//! return emptied blocks to the OS or driver. Also the pool dump and the admission question
//! ("can N bytes be allocated now?").

use super::device::{AllocFailure, DeviceState, Fit};
use super::types::device_fragmentation;
use super::{Service, ServiceError};
use crate::util::lock;
use memwarden_core::defrag::{self, DefragOptions, Movable};
use memwarden_core::{BlockId, DeviceId, MemoryKind, PoolStats};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one defragmentation pass on one device did.
#[derive(Debug, Clone, PartialEq)]
pub struct DefragReport {
    pub device: DeviceId,
    pub strategy: defrag::Strategy,
    pub fragmentation_before: f64,
    pub fragmentation_after: f64,
    pub largest_free_block_before: u64,
    pub largest_free_block_after: u64,
    pub bytes_moved: u64,
    pub allocations_moved: usize,
    pub blocks_released: usize,
    pub bytes_released: u64,
    pub duration: Duration,
    /// Time spent copying bytes (the moves alone).
    pub moving: Duration,
    pub passes: u32,
    /// Moves planned but not carried out (time limit reached, or a copy failed).
    pub moves_skipped: usize,
    pub error: Option<String>,
}

/// One range of a block in the pool dump.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeView {
    pub offset_bytes: u64,
    pub size_bytes: u64,
    pub free: bool,
    pub allocation_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockDump {
    pub id: BlockId,
    pub size_bytes: u64,
    pub dedicated: bool,
    pub address: u64,
    pub ranges: Vec<RangeView>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolDump {
    pub kind: MemoryKind,
    pub stats: PoolStats,
    pub blocks: Vec<BlockDump>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CanAllocate {
    pub size_bytes: u64,
    pub kind: MemoryKind,
    pub fit: Fit,
    pub reason: Option<String>,
}

/// The device's fragmentation index, by the one formula status, `/metrics` and the advice use.
fn index(st: &DeviceState) -> f64 {
    device_fragmentation(st.pools.iter().map(|p| p.stats()))
}

impl Service {
    /// One defragmentation pass on `device`: every pool of it, within the options' budgets and
    /// `max_time` (checked between moves). Allocations that are not movable, exported, or in use
    /// by a transfer stay where they are. Holds the device and the ledger for the pass, so no
    /// request ever sees an allocation half-moved: they wait.
    pub fn defragment(
        &self,
        device: DeviceId,
        options: DefragOptions,
        max_time: Option<Duration>,
    ) -> Result<DefragReport, ServiceError> {
        let started = Instant::now();
        let dev = self.device_or_404(device)?;
        let mut st = lock(&dev.state);
        let mut ledger = lock(&self.ledger);
        let before = st.pool_totals();
        let mut report = DefragReport {
            device,
            strategy: options.strategy,
            fragmentation_before: index(&st),
            fragmentation_after: 0.0,
            largest_free_block_before: before.largest_free_block_bytes,
            largest_free_block_after: 0,
            bytes_moved: 0,
            allocations_moved: 0,
            blocks_released: 0,
            bytes_released: 0,
            duration: Duration::ZERO,
            moving: Duration::ZERO,
            passes: 1,
            moves_skipped: 0,
            error: None,
        };
        let mut budget = options;
        for pool in st.pools.iter_mut() {
            let kind = pool.kind();
            // (block, offset) → allocation id, for the allocations allowed to move.
            let mut at: HashMap<(BlockId, u64), String> = HashMap::new();
            let mut movable = Vec::new();
            for r in ledger.records.values() {
                let Some(p) = r.placement else { continue };
                if r.device != device || r.kind != kind || !r.movable || r.exported || ledger.busy.contains_key(&r.id) {
                    continue;
                }
                at.insert((p.block, p.offset_bytes), r.id.clone());
                movable.push(Movable { placement: p, align_bytes: r.alignment_bytes });
            }
            let plan = defrag::plan(pool.core(), &movable, budget);
            for (i, m) in plan.moves.iter().enumerate() {
                if max_time.is_some_and(|t| started.elapsed() >= t) {
                    report.moves_skipped += plan.moves.len() - i;
                    break;
                }
                let Some(id) = at.remove(&(m.from.block, m.from.offset_bytes)) else {
                    report.moves_skipped += plan.moves.len() - i;
                    report.error = Some("the plan names an allocation the ledger does not hold".into());
                    break;
                };
                let t = Instant::now();
                let moved = pool.apply_move(m);
                report.moving += t.elapsed();
                match moved {
                    Ok(moved) => {
                        if let Some(rec) = ledger.records.get_mut(&id) {
                            let rec = Arc::make_mut(rec);
                            rec.placement = Some(moved.placement);
                            rec.address = Some(moved.address);
                            rec.generation += 1;
                        }
                        if let Some(rec) = ledger.records.get(&id).cloned() {
                            ledger.recorder.moved(&rec);
                        }
                        at.insert((moved.placement.block, moved.placement.offset_bytes), id);
                        report.bytes_moved += m.from.size_bytes;
                        report.allocations_moved += 1;
                    }
                    Err(e) => {
                        report.moves_skipped += plan.moves.len() - i;
                        report.error = Some(format!("moving allocation {id} failed (it stays where it was): {e}"));
                        break;
                    }
                }
            }
            // Moves on a GPU are queued on one stream (in order); wait for them before anyone can
            // look at the allocations again (the locks are still held).
            let t = Instant::now();
            if let Err(e) = pool.finish_moves() {
                report.error =
                    Some(format!("waiting for the moves failed; moved allocations may hold stale bytes: {e}"));
            }
            report.moving += t.elapsed();
            budget.max_bytes_to_move = budget.max_bytes_to_move.saturating_sub(plan.bytes_to_move);
            budget.max_allocations_to_move = budget.max_allocations_to_move.saturating_sub(plan.moves.len());
            if report.error.is_some() {
                break;
            }
        }
        drop(ledger);
        for pool in st.pools.iter_mut() {
            match pool.clear() {
                Ok((n, bytes)) => {
                    report.blocks_released += n;
                    report.bytes_released += bytes;
                }
                Err(e) => report.error = Some(format!("releasing empty blocks failed: {e}")),
            }
        }
        st.invalidate_sample();
        let after = st.pool_totals();
        report.fragmentation_after = index(&st);
        report.largest_free_block_after = after.largest_free_block_bytes;
        report.duration = started.elapsed();
        lock(&self.ledger).recorder.defragmented(device, report.bytes_moved, report.bytes_released);
        if report.allocations_moved > 0 || report.blocks_released > 0 {
            tracing::info!(
                device = %device,
                strategy = options.strategy.as_str(),
                moved = report.allocations_moved,
                bytes_moved = report.bytes_moved,
                released = report.bytes_released,
                "defragmented"
            );
        }
        Ok(report)
    }

    /// Every block of every pool of `device`, with its ranges and the allocation in each.
    pub fn pools(&self, device: DeviceId) -> Result<Vec<PoolDump>, ServiceError> {
        let dev = self.device_or_404(device)?;
        let st = lock(&dev.state);
        let ids: HashMap<(MemoryKind, BlockId, u64), String> = lock(&self.ledger)
            .records
            .values()
            .filter(|r| r.device == device)
            .filter_map(|r| r.placement.map(|p| ((r.kind, p.block, p.offset_bytes), r.id.clone())))
            .collect();
        Ok(st
            .pools
            .iter()
            .map(|pool| PoolDump {
                kind: pool.kind(),
                stats: pool.stats(),
                blocks: pool
                    .core()
                    .blocks()
                    .into_iter()
                    .map(|b| BlockDump {
                        id: b.id,
                        size_bytes: b.size_bytes,
                        dedicated: b.dedicated,
                        address: pool.block(b.id).map(|m| m.address()).unwrap_or(0),
                        ranges: b
                            .ranges
                            .iter()
                            .map(|r| RangeView {
                                offset_bytes: r.offset_bytes,
                                size_bytes: r.size_bytes,
                                free: r.free,
                                allocation_id: (!r.free)
                                    .then(|| ids.get(&(pool.kind(), b.id, r.offset_bytes)).cloned())
                                    .flatten(),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect())
    }

    /// Whether `size_bytes` of `kind` fits on `device` now: in the pool's free space, in new
    /// memory from the OS or driver, or not at all (with the reason). Changes nothing.
    pub fn can_allocate(
        &self,
        device: DeviceId,
        size_bytes: u64,
        kind: Option<MemoryKind>,
    ) -> Result<CanAllocate, ServiceError> {
        let dev = self.device_or_404(device)?;
        let kind = kind.unwrap_or(device.default_kind());
        let backend = dev.backend.as_ref();
        if kind != MemoryKind::Reservation && !backend.kinds().contains(&kind) {
            return Err(ServiceError::invalid("memoryType", format!("{device} does not provide {kind} memory")));
        }
        if size_bytes == 0 {
            return Err(ServiceError::invalid("canAllocate", "must be greater than 0"));
        }
        let mut st = lock(&dev.state);
        let (fit, failure) = st.probe(backend, kind, size_bytes);
        Ok(CanAllocate {
            size_bytes,
            kind,
            fit,
            reason: failure.map(|f| match f {
                AllocFailure::OverBudget { requested_bytes, available_bytes, detail } => {
                    format!("requested {requested_bytes} bytes, available {available_bytes} bytes ({detail})")
                }
                AllocFailure::Backend(e) => e.to_string(),
                AllocFailure::WouldBlock => "would need a new block".into(),
            }),
        })
    }

    /// A device's fragmentation index (for the automatic pass): see [`device_fragmentation`].
    pub(super) fn fragmentation(&self, device: DeviceId) -> f64 {
        self.device(device).map(|d| index(&lock(&d.state))).unwrap_or(0.0)
    }
}
