//! Defragmentation of one device: plan with the core planner, move the bytes with the device's
//! backend, switch each allocation to its new place in the ledger (its `generation` grows),
//! then return emptied blocks to the OS or driver. Also the pool dump and the admission
//! question ("can N bytes be allocated now?"). All of it is [`Device`]'s, given the ledger.

use super::device::{AllocFailure, Device, DeviceState, Fit};
use super::ledger::Ledger;
use super::types::device_fragmentation;
use super::ServiceError;
use crate::sync::lock;
use memwarden_core::defrag::{self, DefragOptions, Movable};
use memwarden_core::units::GIB;
use memwarden_core::{BlockId, DeviceId, MemoryKind, PoolStats};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one defragmentation pass on one device did.
#[derive(Debug, Clone, PartialEq)]
pub struct DefragReport {
    pub device: DeviceId,
    pub strategy: defrag::DefragStrategy,
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

/// How planning and moving one pool ended.
enum PoolPass {
    /// The plan was carried out (or there was nothing to do).
    Done,
    /// The pool or an allocation in the plan changed between batches: plan again. Holds the
    /// planned moves not carried out.
    Stale(usize),
    /// An error or the time limit: the pass ends.
    Stop,
}

/// The allocations a batch marked as moving; dropping it takes the marks off and wakes the
/// requests waiting for them (also when a copy panics, so no request waits forever).
struct MovingMarks<'a> {
    ledger: &'a Ledger,
    ids: Vec<String>,
}

impl Drop for MovingMarks<'_> {
    fn drop(&mut self) {
        self.ledger.unmark_moving(&self.ids);
    }
}

/// The progress hook of a pass and the bytes the plan being carried out has left.
struct PassProgress<'a> {
    hook: &'a mut dyn FnMut(u64, u64),
    left: u64,
}

impl PassProgress<'_> {
    fn report(&mut self, moved: u64) {
        (self.hook)(moved, moved + self.left);
    }
}

/// The device's fragmentation index, by the one formula status, `/metrics` and the advice use.
fn index(st: &DeviceState) -> f64 {
    device_fragmentation(st.pools.iter().map(|p| p.stats()))
}

/// Moves carried out under one hold of the device's lock: the pass lets other requests on the
/// device in between batches, and other devices never wait for it at all.
const BATCH_MOVES: usize = 256;
/// Bytes moved under one hold of the device's lock (a GPU copies this in under 1 ms; a host
/// memcpy is bounded by [`BATCH_TIME`] first).
const BATCH_BYTES: u64 = GIB;
/// Time spent issuing moves under one hold of the device's lock (a host move is its memcpy; a
/// GPU move is queued in microseconds and waited for at the batch's end).
const BATCH_TIME: Duration = Duration::from_millis(2);
/// Records looked up under one hold of the global ledger while collecting a pool's movable
/// allocations.
const LOOKUP_CHUNK: usize = 512;
/// Plans a pool's pass may make: a plan that went stale (a request took a planned destination
/// between batches) is made again from the pool as it is, this many times at most.
const MAX_PLANS: usize = 8;

/// One pass on one device as it goes: what it may still move, its report and its progress.
struct Pass<'a> {
    dev: &'a Device,
    device: DeviceId,
    ledger: &'a Ledger,
    budget: DefragOptions,
    started: Instant,
    max_time: Option<Duration>,
    report: DefragReport,
    progress: PassProgress<'a>,
}

/// One batch of a plan: the moves marked (their allocations' ids are the marks'), carried out
/// and waited for.
struct Batch<'a> {
    marks: MovingMarks<'a>,
    moves: Vec<usize>,
    /// A planned allocation was freed, exported or taken by a transfer since the plan.
    stale: bool,
}

impl Device {
    /// One defragmentation pass on this device (`device`): every pool of it, within the
    /// options' budgets and `max_time` (checked between moves), switching what it moves in
    /// `ledger`. Allocations that are not movable, exported, or in use by a transfer stay where
    /// they are. A requested pass waits for the one running; see `Service::defragment`.
    pub(super) fn defragment(
        &self,
        device: DeviceId,
        ledger: &Ledger,
        options: DefragOptions,
        max_time: Option<Duration>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> DefragReport {
        // One pass per device at a time: a requested one waits for the one running.
        let pass = lock(&self.defrag);
        self.run_pass(device, ledger, options, max_time, progress, pass)
    }

    /// An automatic pass (an allocation that did not fit): none when one is already running on
    /// the device, rather than wait behind it.
    pub(super) fn defragment_if_idle(
        &self,
        device: DeviceId,
        ledger: &Ledger,
        options: DefragOptions,
        max_time: Option<Duration>,
    ) -> Option<DefragReport> {
        let pass = self.defrag.try_lock().ok()?;
        Some(self.run_pass(device, ledger, options, max_time, &mut |_, _| {}, pass))
    }

    fn run_pass(
        &self,
        device: DeviceId,
        ledger: &Ledger,
        options: DefragOptions,
        max_time: Option<Duration>,
        progress: &mut dyn FnMut(u64, u64),
        _pass: std::sync::MutexGuard<'_, ()>,
    ) -> DefragReport {
        // The time limit counts from when the pass holds the device's pass lock.
        let started = Instant::now();
        let (before, fragmentation_before, kinds) = {
            let st = lock(&self.state);
            (st.pool_totals(), index(&st), st.pools.iter().map(|p| p.kind()).collect::<Vec<_>>())
        };
        let report = DefragReport {
            device,
            strategy: options.strategy,
            fragmentation_before,
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
        let progress = PassProgress { hook: progress, left: 0 };
        let mut pass = Pass { dev: self, device, ledger, budget: options, started, max_time, report, progress };
        pass.pools(&kinds);
        pass.release_empty_blocks();
        let Pass { mut report, mut progress, .. } = pass;
        progress.report(report.bytes_moved);
        report.duration = started.elapsed();
        ledger.lock().recorder.defragmented(device, report.bytes_moved, report.bytes_released);
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
        report
    }

    /// The allocations of one pool that may move now, looked up in chunks so the global ledger
    /// is never held for a whole pool's records: `(block, offset)` → id, and what the planner
    /// needs of each. Called with the device's lock held, so the pool cannot change meanwhile;
    /// records that change meanwhile are caught when a batch is marked.
    fn movable_of(
        ledger: &Ledger,
        device: DeviceId,
        kind: MemoryKind,
    ) -> (HashMap<(BlockId, u64), String>, Vec<Movable>) {
        let members = ledger.lock().records.pool_members(device, kind);
        let mut at = HashMap::with_capacity(members.len());
        let mut movable = Vec::with_capacity(members.len());
        for chunk in members.chunks(LOOKUP_CHUNK) {
            let ids: Vec<String> = chunk.iter().map(|u| uuid::Uuid::from_u128(*u).to_string()).collect();
            let ledger = ledger.lock();
            for id in ids {
                let Some(r) = ledger.records.get(&id) else { continue };
                let Some(p) = r.placement else { continue };
                if !r.movable || r.exported || ledger.busy.contains_key(&id) || ledger.moving.contains(&id) {
                    continue;
                }
                movable.push(Movable { placement: p, align_bytes: r.alignment_bytes });
                at.insert((p.block, p.offset_bytes), id);
            }
        }
        (at, movable)
    }

    /// The plan a pass would make for one pool now (tests compare it with what the pass did).
    #[cfg(test)]
    pub(super) fn plan_now(
        &self,
        device: DeviceId,
        ledger: &Ledger,
        kind: MemoryKind,
        options: DefragOptions,
    ) -> defrag::DefragPlan {
        let st = lock(&self.state);
        let pool = st.pool(kind).expect("pool");
        let (_, movable) = Device::movable_of(ledger, device, kind);
        defrag::plan(pool.core(), &movable, options)
    }

    /// Every block of every pool of this device (`device`), with its ranges and the allocation
    /// in each (from `ledger`).
    pub(super) fn pools(&self, device: DeviceId, ledger: &Ledger) -> Vec<PoolDump> {
        let st = lock(&self.state);
        let ids: HashMap<(MemoryKind, BlockId, u64), String> = ledger
            .lock()
            .records
            .values()
            .filter(|r| r.device == device)
            .filter_map(|r| r.placement.map(|p| ((r.kind, p.block, p.offset_bytes), r.id.clone())))
            .collect();
        st.pools
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
            .collect()
    }

    /// Whether `size_bytes` of `kind` fits on this device (`device`) now: in the pool's free
    /// space, in new memory from the OS or driver, or not at all (with the reason). Changes
    /// nothing.
    pub(super) fn can_allocate(
        &self,
        device: DeviceId,
        size_bytes: u64,
        kind: Option<MemoryKind>,
    ) -> Result<CanAllocate, ServiceError> {
        let kind = kind.unwrap_or(device.default_kind());
        let backend = self.backend.as_ref();
        if kind != MemoryKind::Reservation && !backend.kinds().contains(&kind) {
            return Err(ServiceError::invalid("memoryType", format!("{device} does not provide {kind} memory")));
        }
        if size_bytes == 0 {
            return Err(ServiceError::invalid("canAllocate", "must be greater than 0"));
        }
        let mut st = lock(&self.state);
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

    /// The device's fragmentation index (for the automatic pass): see [`device_fragmentation`].
    pub(super) fn fragmentation(&self) -> f64 {
        index(&lock(&self.state))
    }
}

impl<'a> Pass<'a> {
    /// Plans and moves each pool in turn, each planned again (up to [`MAX_PLANS`] times) when
    /// requests change it under the plan.
    fn pools(&mut self, kinds: &[MemoryKind]) {
        'pools: for &kind in kinds {
            let mut left_stale = 0;
            for _ in 0..MAX_PLANS {
                left_stale = 0;
                match self.pool(kind) {
                    PoolPass::Done => break,
                    PoolPass::Stale(left) => left_stale = left,
                    PoolPass::Stop => break 'pools,
                }
            }
            if left_stale > 0 {
                // Requests kept changing the pool under every plan (a busy device): the pass gives
                // way to them, as it does at its time limit, and counts what it left undone. That
                // is not a failure, so not an `error`.
                self.report.moves_skipped += left_stale;
                tracing::debug!(device = %self.device, %kind, left_stale, "the pool changed under every plan; moves left for the next pass");
            }
        }
    }

    /// Returns the blocks the pass emptied to the OS or driver and takes the after figures.
    fn release_empty_blocks(&mut self) {
        let report = &mut self.report;
        let mut st = lock(&self.dev.state);
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
    }

    /// Plans one pool and carries the plan out a batch at a time.
    fn pool(&mut self, kind: MemoryKind) -> PoolPass {
        // A plan made again replaces the one that went stale.
        self.progress.left = 0;
        let (mut at, plan, mut expected) = {
            let st = lock(&self.dev.state);
            if self.budget.max_allocations_to_move == 0 || self.budget.max_bytes_to_move == 0 {
                return PoolPass::Done;
            }
            let Some(pool) = st.pool(kind) else { return PoolPass::Done };
            let (at, movable) = Device::movable_of(self.ledger, self.device, kind);
            (at, defrag::plan(pool.core(), &movable, self.budget), pool.core().changes())
        };
        if plan.moves.is_empty() {
            return PoolPass::Done;
        }
        self.progress.left = plan.moves.iter().map(|m| m.from.size_bytes).sum();
        self.progress.report(self.report.bytes_moved);
        let mut next = 0;
        while next < plan.moves.len() {
            if self.max_time.is_some_and(|t| self.started.elapsed() >= t) {
                self.report.moves_skipped += plan.moves.len() - next;
                return PoolPass::Stop;
            }
            let mut st = lock(&self.dev.state);
            let Some(pool) = st.pool_mut(kind) else { return PoolPass::Done };
            // Requests allocated or freed in this pool between batches: the rest of the plan
            // may name ranges that are no longer free. Plan again from the pool as it is.
            if pool.core().changes() != expected {
                return PoolPass::Stale(plan.moves.len() - next);
            }
            let batch = self.mark_batch(&plan.moves, next, &at);
            let mut moved = Vec::with_capacity(batch.moves.len());
            let mut failure = None;
            let t = Instant::now();
            for (&i, id) in batch.moves.iter().zip(&batch.marks.ids) {
                match pool.apply_move(&plan.moves[i]) {
                    Ok(to) => moved.push((i, to)),
                    Err(e) => {
                        failure = Some((id.clone(), e));
                        break;
                    }
                }
                // A host copy is a memcpy: bound how long this device waits for the batch.
                if t.elapsed() >= BATCH_TIME {
                    break;
                }
            }
            // Moves on a GPU are queued on one stream (in order); wait for them before anyone can
            // look at the allocations again (they are still marked as moving).
            let finished = pool.finish_moves();
            expected = pool.core().changes();
            self.report.moving += t.elapsed();
            // Switch the records while the device is still held: pool and ledger never disagree
            // about where an allocation is.
            self.switch(&plan.moves, &moved, &batch.marks.ids, &mut at);
            let stale = batch.stale;
            drop(batch);
            drop(st);
            self.progress.report(self.report.bytes_moved);
            next += moved.len();
            if let Some(stop) = self.batch_end(finished, failure, plan.moves.len() - next, stale) {
                return stop;
            }
            // Let the requests waiting for this device in before the next batch (std's mutex is
            // not fair: without this the pass could take it straight back).
            std::thread::yield_now();
        }
        PoolPass::Done
    }

    /// The batch from `moves[next..]`: consecutive planned moves whose allocation is still
    /// where the plan put it and free to move, each marked as moving before its bytes are
    /// touched. The marks come off when the batch is dropped, even if a copy panics.
    fn mark_batch(&self, moves: &[defrag::Move], next: usize, at: &HashMap<(BlockId, u64), String>) -> Batch<'a> {
        let mut batch =
            Batch { marks: MovingMarks { ledger: self.ledger, ids: Vec::new() }, moves: Vec::new(), stale: false };
        let mut ledger = self.ledger.lock();
        let mut bytes = 0;
        // Where this batch's moves put their allocations. A plan may move one allocation
        // twice (thorough: compact, then evacuate): its second move starts where the first
        // ends, which the records show only once the batch is switched. The batch ends
        // before it, and the next batch finds the allocation there.
        let mut landing: HashSet<(BlockId, u64)> = HashSet::new();
        for (i, m) in moves.iter().enumerate().skip(next) {
            if batch.moves.len() >= BATCH_MOVES || (bytes > 0 && bytes + m.from.size_bytes > BATCH_BYTES) {
                break;
            }
            if landing.contains(&(m.from.block, m.from.offset_bytes)) {
                break;
            }
            let here = at.get(&(m.from.block, m.from.offset_bytes)).filter(|id| {
                ledger.records.get(id).is_some_and(|r| r.placement == Some(m.from) && !r.exported)
                    && !ledger.busy.contains_key(*id)
            });
            let Some(id) = here.cloned() else {
                // Freed, exported or taken by a transfer since the plan: plan again.
                batch.stale = true;
                break;
            };
            ledger.moving.insert(id.clone());
            batch.marks.ids.push(id);
            bytes += m.from.size_bytes;
            landing.insert((m.to_block, m.to_offset_bytes));
            batch.moves.push(i);
        }
        batch
    }

    /// Switches the records of the moves carried out (`moved`: the plan's index and where the
    /// allocation now is; `ids`: their allocations) to their new places, and counts them.
    fn switch(
        &mut self,
        moves: &[defrag::Move],
        moved: &[(usize, memwarden_backends::PoolAllocation)],
        ids: &[String],
        at: &mut HashMap<(BlockId, u64), String>,
    ) {
        let mut ledger = self.ledger.lock();
        for (&(i, to), id) in moved.iter().zip(ids) {
            let from = moves[i].from;
            if let Some(rec) = ledger.records.get_mut(id) {
                let rec = Arc::make_mut(rec);
                rec.placement = Some(to.placement);
                rec.address = Some(to.address);
                rec.generation += 1;
            }
            if let Some(rec) = ledger.records.get(id).cloned() {
                ledger.recorder.moved(&rec);
            }
            at.remove(&(from.block, from.offset_bytes));
            at.insert((to.placement.block, to.placement.offset_bytes), id.clone());
            self.report.bytes_moved += from.size_bytes;
            self.progress.left = self.progress.left.saturating_sub(from.size_bytes);
            self.report.allocations_moved += 1;
            self.budget.max_bytes_to_move = self.budget.max_bytes_to_move.saturating_sub(from.size_bytes);
            self.budget.max_allocations_to_move = self.budget.max_allocations_to_move.saturating_sub(1);
        }
    }

    /// How a batch ended: `None` to go on with the plan, else how the pool's pass stops.
    /// `left`: the planned moves not carried out.
    fn batch_end(
        &mut self,
        finished: Result<(), memwarden_backends::BackendError>,
        failure: Option<(String, memwarden_backends::BackendError)>,
        left: usize,
        stale: bool,
    ) -> Option<PoolPass> {
        if let Err(e) = finished {
            self.report.error =
                Some(format!("waiting for the moves failed; moved allocations may hold stale bytes: {e}"));
            self.report.moves_skipped += left;
            return Some(PoolPass::Stop);
        }
        if let Some((id, e)) = failure {
            self.report.moves_skipped += left;
            self.report.error = Some(format!("moving allocation {id} failed (it stays where it was): {e}"));
            return Some(PoolPass::Stop);
        }
        stale.then_some(PoolPass::Stale(left))
    }
}
