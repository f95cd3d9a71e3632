//! The defragmentation planner: which movable allocations to move where, so that free space
//! becomes contiguous and whole blocks empty (and can go back to the OS or driver). Pure: it
//! plans on a copy of the pool; the caller replays the moves in order, copying the bytes.
//!
//! Strategies (the seed's names):
//! - `quick`: only moves that empty a whole shared block (every allocation in it movable and
//!   placeable in a fuller block); blocks are tried from the emptiest.
//! - `balanced`: quick, then moves what fits out of blocks less than half used.
//! - `thorough`: compacts every block downwards (each allocation to the lowest free offset that
//!   holds it), evacuates as quick does, then fills fuller blocks from sparser ones with whatever
//!   fits, and compacts again: of one size class, at most one block is left partly used.
//!
//! Every move places the allocation while its old range is still taken, so a move's source and
//! destination never overlap (safe for device copies, which must not overlap).

use crate::pool::{BlockId, Placement, Pool};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefragStrategy {
    Quick,
    Balanced,
    Thorough,
}

impl std::str::FromStr for DefragStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "quick" => Ok(DefragStrategy::Quick),
            "balanced" => Ok(DefragStrategy::Balanced),
            "thorough" => Ok(DefragStrategy::Thorough),
            _ => Err(format!("'{s}' is not a strategy (quick, balanced or thorough)")),
        }
    }
}

impl DefragStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            DefragStrategy::Quick => "quick",
            DefragStrategy::Balanced => "balanced",
            DefragStrategy::Thorough => "thorough",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefragOptions {
    pub strategy: DefragStrategy,
    /// Stop planning before moving more bytes than this.
    pub max_bytes_to_move: u64,
    /// Stop planning before moving more allocations than this.
    pub max_allocations_to_move: usize,
}

impl Default for DefragOptions {
    fn default() -> Self {
        DefragOptions {
            strategy: DefragStrategy::Balanced,
            max_bytes_to_move: u64::MAX,
            max_allocations_to_move: usize::MAX,
        }
    }
}

/// An allocation the caller allows to move, with the alignment it must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Movable {
    pub placement: Placement,
    pub align_bytes: u64,
}

/// One step: move the allocation now at `from` to `to_offset_bytes` of `to_block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub from: Placement,
    pub to_block: BlockId,
    pub to_offset_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DefragPlan {
    pub moves: Vec<Move>,
    pub bytes_to_move: u64,
    /// Shared blocks that the plan leaves empty.
    pub blocks_emptied: Vec<BlockId>,
}

struct Planner {
    sim: Pool,
    /// (block, offset) of each movable allocation now → its alignment.
    movable: HashMap<(BlockId, u64), u64>,
    plan: DefragPlan,
    options: DefragOptions,
}

impl Planner {
    fn budget_allows(&self, bytes: u64, count: usize) -> bool {
        self.plan.bytes_to_move.saturating_add(bytes) <= self.options.max_bytes_to_move
            && self.plan.moves.len() + count <= self.options.max_allocations_to_move
    }

    /// Applies one move to the simulation and records it.
    fn apply(&mut self, from: Placement, to_block: BlockId, to_offset: u64) -> bool {
        let Some(align) = self.movable.get(&(from.block, from.offset_bytes)).copied() else { return false };
        let Some(to) = self.sim.allocate_at(to_block, to_offset, from.size_bytes) else { return false };
        if self.sim.free(&from).is_err() {
            return false;
        }
        self.movable.remove(&(from.block, from.offset_bytes));
        self.movable.insert((to.block, to.offset_bytes), align);
        self.plan.bytes_to_move += from.size_bytes;
        self.plan.moves.push(Move { from, to_block, to_offset_bytes: to_offset });
        true
    }

    /// Shared (not dedicated) blocks with their used bytes, fullest first.
    fn blocks_by_fullness(&self) -> Vec<(BlockId, u64)> {
        let mut v: Vec<(BlockId, u64)> = self
            .sim
            .blocks()
            .into_iter()
            .filter(|b| !b.dedicated)
            .map(|b| (b.id, b.ranges.iter().filter(|r| !r.free).map(|r| r.size_bytes).sum()))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    fn used_placements(&self, block: BlockId) -> Vec<Placement> {
        self.sim
            .blocks()
            .into_iter()
            .find(|b| b.id == block)
            .map(|b| {
                b.ranges
                    .iter()
                    .filter(|r| !r.free)
                    .filter_map(|r| self.sim.placement_at(block, r.offset_bytes))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Moves allocations out of `source` into fuller blocks. With `all_or_nothing`, only if
    /// every allocation in it can go (the block empties); otherwise what fits goes.
    fn evacuate(&mut self, source: BlockId, fuller: &[BlockId], all_or_nothing: bool) {
        let mut items = self.used_placements(source);
        if items.is_empty() {
            return;
        }
        // Largest first: they are the hardest to place.
        items.sort_by(|a, b| b.size_bytes.cmp(&a.size_bytes).then(a.offset_bytes.cmp(&b.offset_bytes)));
        if all_or_nothing {
            let total: u64 = items.iter().map(|p| p.size_bytes).sum();
            if items.iter().any(|p| !self.movable.contains_key(&(p.block, p.offset_bytes)))
                || !self.budget_allows(total, items.len())
            {
                return;
            }
            // Try on a copy; keep it only if the block empties.
            let saved = (self.sim.clone(), self.movable.clone(), self.plan.clone());
            for p in &items {
                if !self.place_elsewhere(*p, fuller) {
                    (self.sim, self.movable, self.plan) = saved;
                    return;
                }
            }
        } else {
            for p in items {
                if self.movable.contains_key(&(p.block, p.offset_bytes)) && self.budget_allows(p.size_bytes, 1) {
                    self.place_elsewhere(p, fuller);
                }
            }
        }
    }

    /// Puts `p` at the lowest fitting offset of the first (fullest) block of `targets` with room.
    fn place_elsewhere(&mut self, p: Placement, targets: &[BlockId]) -> bool {
        let Some(&align) = self.movable.get(&(p.block, p.offset_bytes)) else { return false };
        for &t in targets {
            if t == p.block {
                continue;
            }
            if let Some(off) = self.sim.lowest_fit(t, p.size_bytes, align) {
                return self.apply(p, t, off);
            }
        }
        false
    }

    /// Moves each movable allocation of `block` to the lowest free offset below it that holds it.
    fn compact(&mut self, block: BlockId) {
        let mut items = self.used_placements(block);
        items.sort_by_key(|p| p.offset_bytes);
        for p in items {
            let Some(&align) = self.movable.get(&(p.block, p.offset_bytes)) else { continue };
            if !self.budget_allows(p.size_bytes, 1) {
                return;
            }
            if let Some(off) = self.sim.lowest_fit(block, p.size_bytes, align) {
                if off < p.offset_bytes {
                    self.apply(p, block, off);
                }
            }
        }
    }

    fn evacuate_all(&mut self, all_or_nothing: bool, max_fill: Option<(u64, u64)>) {
        let order = self.blocks_by_fullness();
        // Sparsest first; each may move into any block fuller than itself.
        for i in (0..order.len()).rev() {
            let (source, used) = order[i];
            if used == 0 {
                continue;
            }
            if let Some((num, den)) = max_fill {
                let size = self.sim.blocks().iter().find(|b| b.id == source).map(|b| b.size_bytes).unwrap_or(0);
                if used * den >= size * num {
                    continue;
                }
            }
            let fuller: Vec<BlockId> = order[..i].iter().map(|(b, _)| *b).collect();
            self.evacuate(source, &fuller, all_or_nothing);
        }
    }
}

/// Plans moves of the `movable` allocations of `pool` under `options`. Allocations not listed
/// never move; dedicated blocks are left alone.
pub fn plan(pool: &Pool, movable: &[Movable], options: DefragOptions) -> DefragPlan {
    let mut p = Planner {
        sim: pool.clone(),
        movable: movable.iter().map(|m| ((m.placement.block, m.placement.offset_bytes), m.align_bytes)).collect(),
        plan: DefragPlan::default(),
        options,
    };
    let before: Vec<BlockId> = p.sim.empty_blocks();
    if options.strategy == DefragStrategy::Thorough {
        for (b, _) in p.blocks_by_fullness() {
            p.compact(b);
        }
    }
    p.evacuate_all(true, None);
    match options.strategy {
        DefragStrategy::Quick => {}
        DefragStrategy::Balanced => p.evacuate_all(false, Some((1, 2))),
        DefragStrategy::Thorough => p.evacuate_all(false, None),
    }
    if options.strategy == DefragStrategy::Thorough {
        for (b, _) in p.blocks_by_fullness() {
            p.compact(b);
        }
    }
    p.plan.blocks_emptied = p.sim.empty_blocks().into_iter().filter(|b| !before.contains(b)).collect();
    p.plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{BlockRequest, PoolConfig};
    use proptest::prelude::{
        any, prop_assert, prop_assert_eq, prop_oneof, proptest, Just, ProptestConfig, TestCaseError,
    };

    const KIB: u64 = 1024;
    use crate::units::MIB;

    fn pool_with_blocks(n: usize, block: u64) -> Pool {
        let mut pool = Pool::new(PoolConfig {
            block_size_bytes: block,
            dedicated_threshold_bytes: block,
            max_alignment_bytes: 2 * MIB,
        });
        for _ in 0..n {
            pool.add_block(BlockRequest { size_bytes: block, dedicated: false });
        }
        pool
    }

    /// Replays `plan` on `pool` the way the executor does, checking each step.
    fn replay(pool: &mut Pool, plan: &DefragPlan, movable: &[Movable]) -> Result<(), String> {
        let mut allowed: HashMap<(BlockId, u64), u64> =
            movable.iter().map(|m| ((m.placement.block, m.placement.offset_bytes), m.align_bytes)).collect();
        for m in &plan.moves {
            let align = allowed.remove(&(m.from.block, m.from.offset_bytes)).ok_or("moved an immovable allocation")?;
            if pool.placement_at(m.from.block, m.from.offset_bytes) != Some(m.from) {
                return Err(format!("move source {:?} is not live", m.from));
            }
            if m.to_offset_bytes % align.max(256) != 0 {
                return Err("alignment lost".into());
            }
            let to =
                pool.allocate_at(m.to_block, m.to_offset_bytes, m.from.size_bytes).ok_or("destination not free")?;
            if to.block == m.from.block
                && to.offset_bytes < m.from.offset_bytes + m.from.size_bytes
                && m.from.offset_bytes < to.offset_bytes + to.size_bytes
            {
                return Err("source and destination overlap".into());
            }
            pool.free(&m.from).map_err(|e| e.to_string())?;
            allowed.insert((to.block, to.offset_bytes), align);
            pool.validate().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    #[test]
    fn quick_empties_the_sparse_block() {
        let mut pool = pool_with_blocks(2, 4 * MIB);
        let a: Vec<_> =
            (0..4).map(|i| pool.allocate_in(BlockId(0), MIB, 256).unwrap_or_else(|| panic!("a{i}"))).collect();
        pool.free(&a[1]).expect("free");
        pool.free(&a[3]).expect("free");
        let b = pool.allocate_in(BlockId(1), MIB, 256).expect("b");
        let movable: Vec<Movable> =
            [a[0], a[2], b].iter().map(|&p| Movable { placement: p, align_bytes: 256 }).collect();
        let plan = plan(&pool, &movable, DefragOptions { strategy: DefragStrategy::Quick, ..Default::default() });
        // Both blocks hold 2 MiB or 1 MiB: the sparser one (block 1) empties into block 0.
        assert_eq!(plan.moves.len(), 1);
        assert_eq!(plan.moves[0].from, b);
        assert_eq!(plan.moves[0].to_block, BlockId(0));
        assert_eq!(plan.blocks_emptied, vec![BlockId(1)]);
        replay(&mut pool, &plan, &movable).expect("replays");
        assert_eq!(pool.empty_blocks(), vec![BlockId(1)]);
    }

    #[test]
    fn immovable_allocations_pin_their_block() {
        let mut pool = pool_with_blocks(2, 4 * MIB);
        let a = pool.allocate_in(BlockId(0), 2 * MIB, 256).expect("a");
        let b = pool.allocate_in(BlockId(1), MIB, 256).expect("b");
        let movable = vec![Movable { placement: a, align_bytes: 256 }];
        for strategy in [DefragStrategy::Quick, DefragStrategy::Balanced, DefragStrategy::Thorough] {
            let plan = plan(&pool, &movable, DefragOptions { strategy, ..Default::default() });
            assert!(plan.moves.iter().all(|m| m.from != b), "{strategy:?} moved an immovable allocation");
            assert!(plan.blocks_emptied.is_empty() || plan.blocks_emptied == vec![BlockId(0)]);
        }
    }

    #[test]
    fn budgets_are_respected() {
        let mut pool = pool_with_blocks(4, 4 * MIB);
        let mut movable = Vec::new();
        for b in 0..4 {
            let p = pool.allocate_in(BlockId(b), 512 * KIB, 256).expect("p");
            movable.push(Movable { placement: p, align_bytes: 256 });
        }
        let plan = plan(
            &pool,
            &movable,
            DefragOptions { strategy: DefragStrategy::Quick, max_bytes_to_move: MIB, max_allocations_to_move: 10 },
        );
        assert!(plan.bytes_to_move <= MIB);
        assert_eq!(plan.moves.len(), 2);
        let plan1 = super::plan(
            &pool,
            &movable,
            DefragOptions { strategy: DefragStrategy::Quick, max_bytes_to_move: u64::MAX, max_allocations_to_move: 1 },
        );
        assert_eq!(plan1.moves.len(), 1);
    }

    #[test]
    fn strategies_parse() {
        assert_eq!("Thorough".parse::<DefragStrategy>(), Ok(DefragStrategy::Thorough));
        assert!("tidy".parse::<DefragStrategy>().is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        /// Any plan replays cleanly: sources live and movable, destinations free and aligned,
        /// no overlap, budgets kept, and afterwards the same allocations exist (immovable ones
        /// where they were) with the same total size.
        #[test]
        fn plans_replay_and_account_for_everything(
            sizes in proptest::collection::vec((1u64..600, 0u32..4), 1..80),
            frees in proptest::collection::vec(any::<bool>(), 80),
            pinned in proptest::collection::vec(any::<bool>(), 80),
            strategy in prop_oneof![Just(DefragStrategy::Quick), Just(DefragStrategy::Balanced), Just(DefragStrategy::Thorough)],
            max_moves in prop_oneof![Just(usize::MAX), 0usize..20],
            max_bytes in prop_oneof![Just(u64::MAX), 0u64..(8 * MIB)],
        ) {
            let mut pool = pool_with_blocks(0, 4 * MIB);
            let mut live = Vec::new();
            for (units, align_log) in sizes {
                let size = units * 4 * KIB;
                let align = 256u64 << (align_log * 2);
                let p = match pool.try_allocate(size, align) {
                    Some(p) => p,
                    None => {
                        let id = pool.add_block(BlockRequest { size_bytes: 4 * MIB, dedicated: false });
                        pool.allocate_in(id, size, align).expect("fresh block")
                    }
                };
                live.push((p, align));
            }
            let mut kept = Vec::new();
            for (i, (p, align)) in live.into_iter().enumerate() {
                if frees[i] { pool.free(&p).expect("free"); } else { kept.push((p, align, pinned[i])); }
            }
            let movable: Vec<Movable> = kept.iter().filter(|k| !k.2).map(|k| Movable { placement: k.0, align_bytes: k.1 }).collect();
            let before = pool.stats();
            let plan = plan(&pool, &movable, DefragOptions { strategy, max_bytes_to_move: max_bytes, max_allocations_to_move: max_moves });
            prop_assert!(plan.bytes_to_move <= max_bytes);
            prop_assert!(plan.moves.len() <= max_moves);
            prop_assert_eq!(plan.bytes_to_move, plan.moves.iter().map(|m| m.from.size_bytes).sum::<u64>());
            replay(&mut pool, &plan, &movable).map_err(TestCaseError::fail)?;
            let after = pool.stats();
            prop_assert_eq!(after.allocated_bytes, before.allocated_bytes);
            prop_assert_eq!(after.allocation_count, before.allocation_count);
            for k in kept.iter().filter(|k| k.2) {
                prop_assert_eq!(pool.placement_at(k.0.block, k.0.offset_bytes), Some(k.0), "immovable allocation moved");
            }
            for b in &plan.blocks_emptied {
                prop_assert!(pool.empty_blocks().contains(b));
            }
        }

        /// One size class, everything movable: a full thorough plan leaves at most one block
        /// that holds allocations and still has room for another of that size.
        #[test]
        fn thorough_packs_a_size_class(
            count in 1usize..120,
            unit_log in 0u32..4,
            frees in proptest::collection::vec(any::<bool>(), 120),
        ) {
            let size = (64 * KIB) << unit_log;
            let mut pool = pool_with_blocks(0, 4 * MIB);
            let mut live = Vec::new();
            for _ in 0..count {
                let p = match pool.try_allocate(size, 256) {
                    Some(p) => p,
                    None => {
                        let id = pool.add_block(BlockRequest { size_bytes: 4 * MIB, dedicated: false });
                        pool.allocate_in(id, size, 256).expect("fresh block")
                    }
                };
                live.push(p);
            }
            let kept: Vec<Placement> = live.into_iter().enumerate().filter_map(|(i, p)| {
                if frees[i] { pool.free(&p).expect("free"); None } else { Some(p) }
            }).collect();
            let movable: Vec<Movable> = kept.iter().map(|&p| Movable { placement: p, align_bytes: 256 }).collect();
            let plan = plan(&pool, &movable, DefragOptions { strategy: DefragStrategy::Thorough, ..Default::default() });
            replay(&mut pool, &plan, &movable).map_err(TestCaseError::fail)?;
            let partial = pool.blocks().into_iter().filter(|b| {
                b.ranges.iter().any(|r| !r.free) && pool.lowest_fit(b.id, size, 256).is_some()
            }).count();
            prop_assert!(partial <= 1, "{} partially used blocks remain", partial);
        }
    }
}
