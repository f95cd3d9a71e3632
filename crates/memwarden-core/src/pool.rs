//! The block pool: which block and offset each allocation gets, when a new block is needed and
//! how large, which blocks are empty and can go back to the OS or driver.
//!
//! This is the one copy of the pool logic. It never creates memory: the caller (the backends
//! crate's `MemoryPool`) asks for a [`BlockRequest`], creates the block with its backend and
//! hands it over with [`Pool::add_block`]. Tests drive it with no memory behind it at all.

use crate::tlsf::{Range, Tlsf, TlsfHandle, TlsfInvariantError, GRANULARITY_BYTES};
use crate::units::align_up;
use crate::units::MIB;

/// Pool tuning. Sizes in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Size of a shared block, from which requests below `dedicated_threshold_bytes` are carved.
    pub block_size_bytes: u64,
    /// Requests of at least this size get a block of their own, released as soon as they are freed.
    pub dedicated_threshold_bytes: u64,
    /// Largest alignment an allocation may ask for: the alignment every block base has.
    pub max_alignment_bytes: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig { block_size_bytes: 64 * MIB, dedicated_threshold_bytes: 32 * MIB, max_alignment_bytes: 2 * MIB }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("alignment {0} is not a power of two")]
    AlignmentNotPowerOfTwo(u64),
    #[error("alignment {requested} exceeds the largest supported alignment {max}")]
    AlignmentTooLarge { requested: u64, max: u64 },
    #[error("size must be greater than zero")]
    ZeroSize,
    #[error("block {0:?} does not exist")]
    UnknownBlock(BlockId),
    #[error("block {0:?} still holds allocations")]
    BlockNotEmpty(BlockId),
    #[error("placement does not name a live allocation")]
    NotAllocated,
}

/// The first broken invariant [`Pool::validate`] finds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolInvariantError {
    #[error("block {}: {source}", block.0)]
    Block { block: BlockId, source: TlsfInvariantError },
    #[error("dedicated block {} holds {allocations} allocations", block.0)]
    SharedDedicated { block: BlockId, allocations: usize },
    #[error("reserved counter {counter} != {in_blocks} bytes in blocks")]
    ReservedBytes { counter: u64, in_blocks: u64 },
    #[error("allocated counter {counter} != {in_blocks} bytes in blocks")]
    AllocatedBytes { counter: u64, in_blocks: u64 },
    #[error("allocation counter {counter} != {in_blocks} allocations in blocks")]
    AllocationCount { counter: usize, in_blocks: usize },
    #[error("free slot {slot} is not an empty slot")]
    FreeSlot { slot: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// Where an allocation lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub block: BlockId,
    pub offset_bytes: u64,
    /// The size the allocation occupies (the request rounded up to the granularity).
    pub size_bytes: u64,
    pub handle: TlsfHandle,
}

/// What the caller must create when [`Pool::try_allocate`] finds no room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRequest {
    pub size_bytes: u64,
    pub dedicated: bool,
}

/// Cheap counters over the whole pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes held from the OS or driver (sum of block sizes).
    pub reserved_bytes: u64,
    /// Bytes handed out to live allocations.
    pub allocated_bytes: u64,
    /// `reserved_bytes - allocated_bytes`.
    pub free_in_pool_bytes: u64,
    pub largest_free_block_bytes: u64,
    pub block_count: usize,
    pub allocation_count: usize,
    /// Bytes in blocks that hold no allocation (what `clear` would return).
    pub empty_block_bytes: u64,
    /// Number of separate free ranges over all blocks.
    pub free_range_count: usize,
}

impl PoolStats {
    /// `1 − largest free range / free bytes`: 0 when free space is one range (or none), near 1
    /// when it is scattered in small pieces.
    pub fn fragmentation_index(&self) -> f64 {
        if self.free_in_pool_bytes == 0 {
            0.0
        } else {
            1.0 - self.largest_free_block_bytes as f64 / self.free_in_pool_bytes as f64
        }
    }
}

#[derive(Debug, Clone)]
struct PoolBlock {
    tlsf: Tlsf,
    dedicated: bool,
}

/// A block as listed by [`Pool::blocks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockView {
    pub id: BlockId,
    pub size_bytes: u64,
    pub dedicated: bool,
    pub ranges: Vec<Range>,
}

#[derive(Debug, Clone)]
pub struct Pool {
    config: PoolConfig,
    blocks: Vec<Option<PoolBlock>>,
    free_slots: Vec<u32>,
    reserved_bytes: u64,
    allocated_bytes: u64,
    allocation_count: usize,
    /// Counts every change of the pool's layout (an allocation, a free, a block added or
    /// removed): a plan made against one count is stale once it differs.
    changes: u64,
}

/// What freeing an allocation left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeOutcome {
    pub freed_bytes: u64,
    /// The block now holds nothing.
    pub block_empty: bool,
    /// The block was dedicated to this allocation (the caller releases it at once).
    pub dedicated: bool,
}

impl Pool {
    pub fn new(config: PoolConfig) -> Self {
        Pool {
            config,
            blocks: Vec::new(),
            free_slots: Vec::new(),
            reserved_bytes: 0,
            allocated_bytes: 0,
            allocation_count: 0,
            changes: 0,
        }
    }

    /// How many times the layout has changed: equal counts mean an unchanged layout.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Checks a request before anything is done for it.
    pub fn check_request(&self, size_bytes: u64, align_bytes: u64) -> Result<(), PoolError> {
        if size_bytes == 0 {
            return Err(PoolError::ZeroSize);
        }
        if !align_bytes.is_power_of_two() {
            return Err(PoolError::AlignmentNotPowerOfTwo(align_bytes));
        }
        if align_bytes > self.config.max_alignment_bytes {
            return Err(PoolError::AlignmentTooLarge { requested: align_bytes, max: self.config.max_alignment_bytes });
        }
        Ok(())
    }

    /// Places the request in an existing shared block, if one has room.
    pub fn try_allocate(&mut self, size_bytes: u64, align_bytes: u64) -> Option<Placement> {
        if size_bytes >= self.config.dedicated_threshold_bytes {
            return None;
        }
        for index in 0..self.blocks.len() {
            let shared = matches!(&self.blocks[index], Some(b) if !b.dedicated);
            if shared {
                if let Some(p) = self.allocate_in(BlockId(index as u32), size_bytes, align_bytes) {
                    return Some(p);
                }
            }
        }
        None
    }

    /// The block to create when [`Pool::try_allocate`] found no room.
    pub fn block_request(&self, size_bytes: u64, align_bytes: u64) -> BlockRequest {
        let rounded = align_up(size_bytes, GRANULARITY_BYTES).unwrap_or(u64::MAX);
        if size_bytes >= self.config.dedicated_threshold_bytes {
            // Block bases are aligned to max_alignment_bytes, so offset 0 satisfies any alignment.
            BlockRequest { size_bytes: rounded, dedicated: true }
        } else {
            let needed = rounded.saturating_add(align_bytes.max(GRANULARITY_BYTES) - GRANULARITY_BYTES);
            BlockRequest { size_bytes: self.config.block_size_bytes.max(needed), dedicated: false }
        }
    }

    /// Registers a block the caller created for a [`BlockRequest`].
    pub fn add_block(&mut self, request: BlockRequest) -> BlockId {
        let block = PoolBlock { tlsf: Tlsf::new(request.size_bytes), dedicated: request.dedicated };
        self.reserved_bytes += block.tlsf.capacity_bytes();
        self.changes += 1;
        match self.free_slots.pop() {
            Some(slot) => {
                self.blocks[slot as usize] = Some(block);
                BlockId(slot)
            }
            None => {
                self.blocks.push(Some(block));
                BlockId((self.blocks.len() - 1) as u32)
            }
        }
    }

    /// Places the request in one given block.
    pub fn allocate_in(&mut self, block: BlockId, size_bytes: u64, align_bytes: u64) -> Option<Placement> {
        let b = self.blocks.get_mut(block.0 as usize)?.as_mut()?;
        let (offset_bytes, handle) = b.tlsf.allocate(size_bytes, align_bytes)?;
        let (_, size_bytes) = b.tlsf.range_of(handle)?;
        self.allocated_bytes += size_bytes;
        self.allocation_count += 1;
        self.changes += 1;
        Some(Placement { block, offset_bytes, size_bytes, handle })
    }

    /// Places an allocation exactly at `offset_bytes` of `block`, if that range is free (the
    /// defragmentation executor replays the planner's moves with it).
    pub fn allocate_at(&mut self, block: BlockId, offset_bytes: u64, size_bytes: u64) -> Option<Placement> {
        let b = self.blocks.get_mut(block.0 as usize)?.as_mut()?;
        let handle = b.tlsf.allocate_at(offset_bytes, size_bytes)?;
        let (offset_bytes, size_bytes) = b.tlsf.range_of(handle)?;
        self.allocated_bytes += size_bytes;
        self.allocation_count += 1;
        self.changes += 1;
        Some(Placement { block, offset_bytes, size_bytes, handle })
    }

    /// The lowest offset in `block` where `size_bytes` aligned to `align_bytes` fits.
    pub fn lowest_fit(&self, block: BlockId, size_bytes: u64, align_bytes: u64) -> Option<u64> {
        self.blocks.get(block.0 as usize)?.as_ref()?.tlsf.lowest_fit(size_bytes, align_bytes)
    }

    /// The live placement at `offset_bytes` of `block`, if one starts there.
    pub fn placement_at(&self, block: BlockId, offset_bytes: u64) -> Option<Placement> {
        let b = self.blocks.get(block.0 as usize)?.as_ref()?;
        b.tlsf.handle_at(offset_bytes).and_then(|handle| {
            let (offset_bytes, size_bytes) = b.tlsf.range_of(handle)?;
            Some(Placement { block, offset_bytes, size_bytes, handle })
        })
    }

    pub fn free(&mut self, placement: &Placement) -> Result<FreeOutcome, PoolError> {
        let b = self
            .blocks
            .get_mut(placement.block.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(PoolError::UnknownBlock(placement.block))?;
        if b.tlsf.range_of(placement.handle) != Some((placement.offset_bytes, placement.size_bytes)) {
            return Err(PoolError::NotAllocated);
        }
        let freed_bytes = b.tlsf.free(placement.handle).map_err(|_| PoolError::NotAllocated)?;
        self.allocated_bytes -= freed_bytes;
        self.allocation_count -= 1;
        self.changes += 1;
        Ok(FreeOutcome { freed_bytes, block_empty: b.tlsf.is_empty(), dedicated: b.dedicated })
    }

    /// Forgets an empty block; the caller then releases its memory. Returns its size.
    pub fn remove_block(&mut self, id: BlockId) -> Result<u64, PoolError> {
        let slot = self.blocks.get_mut(id.0 as usize).ok_or(PoolError::UnknownBlock(id))?;
        match slot {
            None => Err(PoolError::UnknownBlock(id)),
            Some(b) if !b.tlsf.is_empty() => Err(PoolError::BlockNotEmpty(id)),
            Some(b) => {
                let size = b.tlsf.capacity_bytes();
                *slot = None;
                self.free_slots.push(id.0);
                self.reserved_bytes -= size;
                self.changes += 1;
                Ok(size)
            }
        }
    }

    /// Blocks that hold no allocation.
    pub fn empty_blocks(&self) -> Vec<BlockId> {
        self.live_blocks().filter(|(_, b)| b.tlsf.is_empty()).map(|(id, _)| id).collect()
    }

    /// Bytes held from the OS or driver (O(1)).
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved_bytes
    }

    /// Bytes handed out (O(1)).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_bytes
    }

    pub fn stats(&self) -> PoolStats {
        let mut largest = 0;
        let mut empty = 0;
        let mut count = 0;
        let mut free_ranges = 0;
        for (_, b) in self.live_blocks() {
            count += 1;
            free_ranges += b.tlsf.free_range_count();
            largest = largest.max(b.tlsf.largest_free_bytes());
            if b.tlsf.is_empty() {
                empty += b.tlsf.capacity_bytes();
            }
        }
        PoolStats {
            reserved_bytes: self.reserved_bytes,
            allocated_bytes: self.allocated_bytes,
            free_in_pool_bytes: self.reserved_bytes - self.allocated_bytes,
            largest_free_block_bytes: largest,
            block_count: count,
            allocation_count: self.allocation_count,
            empty_block_bytes: empty,
            free_range_count: free_ranges,
        }
    }

    /// Every block with its ranges, in id order (for dumps and, later, the defragmentation planner).
    pub fn blocks(&self) -> Vec<BlockView> {
        self.live_blocks()
            .map(|(id, b)| BlockView {
                id,
                size_bytes: b.tlsf.capacity_bytes(),
                dedicated: b.dedicated,
                ranges: b.tlsf.ranges().collect(),
            })
            .collect()
    }

    /// Checks the pool's invariants and every block's.
    pub fn validate(&self) -> Result<(), PoolInvariantError> {
        let (mut reserved, mut allocated, mut count) = (0, 0, 0);
        for (id, b) in self.live_blocks() {
            b.tlsf.validate().map_err(|source| PoolInvariantError::Block { block: id, source })?;
            reserved += b.tlsf.capacity_bytes();
            allocated += b.tlsf.used_bytes();
            count += b.tlsf.allocation_count();
            if b.dedicated && b.tlsf.allocation_count() > 1 {
                return Err(PoolInvariantError::SharedDedicated { block: id, allocations: b.tlsf.allocation_count() });
            }
        }
        if reserved != self.reserved_bytes {
            return Err(PoolInvariantError::ReservedBytes { counter: self.reserved_bytes, in_blocks: reserved });
        }
        if allocated != self.allocated_bytes {
            return Err(PoolInvariantError::AllocatedBytes { counter: self.allocated_bytes, in_blocks: allocated });
        }
        if count != self.allocation_count {
            return Err(PoolInvariantError::AllocationCount { counter: self.allocation_count, in_blocks: count });
        }
        for &slot in &self.free_slots {
            if self.blocks.get(slot as usize).is_none_or(Option::is_some) {
                return Err(PoolInvariantError::FreeSlot { slot });
            }
        }
        Ok(())
    }

    fn live_blocks(&self) -> impl Iterator<Item = (BlockId, &PoolBlock)> {
        self.blocks.iter().enumerate().filter_map(|(i, b)| b.as_ref().map(|b| (BlockId(i as u32), b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::units::MIB;

    fn small_pool() -> Pool {
        Pool::new(PoolConfig {
            block_size_bytes: 4 * MIB,
            dedicated_threshold_bytes: 2 * MIB,
            max_alignment_bytes: 2 * MIB,
        })
    }

    /// Allocates the way the backends' MemoryPool does, with no memory behind the blocks.
    fn alloc(pool: &mut Pool, size: u64, align: u64) -> Placement {
        if let Some(p) = pool.try_allocate(size, align) {
            return p;
        }
        let req = pool.block_request(size, align);
        let id = pool.add_block(req);
        pool.allocate_in(id, size, align).expect("a fresh block fits its request")
    }

    #[test]
    fn every_layout_change_is_counted_and_nothing_else() {
        let mut pool = small_pool();
        let mut seen = pool.changes();
        let mut changed = |pool: &Pool, expect: bool, what: &str| {
            assert_eq!(pool.changes() != seen, expect, "{what}");
            seen = pool.changes();
        };
        let a = alloc(&mut pool, MIB, 256);
        changed(&pool, true, "a block added and an allocation");
        let _ = pool.stats();
        let _ = pool.blocks();
        changed(&pool, false, "reading changes nothing");
        let b = pool.allocate_at(a.block, 2 * MIB, MIB).expect("free range");
        changed(&pool, true, "allocate_at");
        pool.free(&b).expect("free");
        changed(&pool, true, "free");
        pool.free(&a).expect("free");
        let empty = pool.empty_blocks()[0];
        changed(&pool, true, "free");
        pool.remove_block(empty).expect("remove");
        changed(&pool, true, "remove_block");
        assert!(pool.remove_block(empty).is_err());
        changed(&pool, false, "a refused removal");
    }

    #[test]
    fn validate_names_the_block_and_the_broken_invariant() {
        let mut pool = small_pool();
        let a = alloc(&mut pool, MIB, 256);
        pool.allocated_bytes += 1;
        assert_eq!(
            pool.validate(),
            Err(PoolInvariantError::AllocatedBytes { counter: MIB + 1, in_blocks: MIB }),
            "{a:?}"
        );
    }

    #[test]
    fn small_requests_share_a_block() {
        let mut pool = small_pool();
        let a = alloc(&mut pool, 1000, 256);
        let b = alloc(&mut pool, 1000, 256);
        assert_eq!(a.block, b.block);
        assert_eq!(a.size_bytes, 1024);
        let s = pool.stats();
        assert_eq!((s.block_count, s.reserved_bytes, s.allocated_bytes), (1, 4 * MIB, 2048));
        assert_eq!(s.empty_block_bytes, 0);
        pool.validate().expect("valid");
    }

    #[test]
    fn large_requests_get_dedicated_blocks() {
        let mut pool = small_pool();
        let a = alloc(&mut pool, 3 * MIB, 256);
        assert!(pool.try_allocate(100, 256).is_none(), "dedicated blocks are not shared");
        let out = pool.free(&a).expect("free");
        assert!(out.dedicated && out.block_empty);
        assert_eq!(pool.remove_block(a.block), Ok(3 * MIB));
        assert_eq!(pool.stats(), PoolStats::default());
        pool.validate().expect("valid");
    }

    #[test]
    fn empty_blocks_are_found_and_removed_only_when_empty() {
        let mut pool = small_pool();
        let a = alloc(&mut pool, MIB, 256);
        assert_eq!(pool.remove_block(a.block), Err(PoolError::BlockNotEmpty(a.block)));
        pool.free(&a).expect("free");
        assert_eq!(pool.free(&a), Err(PoolError::NotAllocated), "double free refused");
        assert_eq!(pool.empty_blocks(), vec![a.block]);
        assert_eq!(pool.stats().empty_block_bytes, 4 * MIB);
        pool.remove_block(a.block).expect("remove");
        assert_eq!(pool.remove_block(a.block), Err(PoolError::UnknownBlock(a.block)));
        // Slots are reused.
        let b = alloc(&mut pool, MIB, 256);
        assert_eq!(b.block, a.block);
        pool.validate().expect("valid");
    }

    #[test]
    fn requests_are_checked() {
        let pool = small_pool();
        assert_eq!(pool.check_request(0, 256), Err(PoolError::ZeroSize));
        assert_eq!(pool.check_request(1, 3), Err(PoolError::AlignmentNotPowerOfTwo(3)));
        assert_eq!(
            pool.check_request(1, 4 * MIB),
            Err(PoolError::AlignmentTooLarge { requested: 4 * MIB, max: 2 * MIB })
        );
        assert_eq!(pool.check_request(1, 2 * MIB), Ok(()));
    }

    #[test]
    fn large_alignment_fits_in_a_fresh_block() {
        let mut pool = small_pool();
        let _ = alloc(&mut pool, 256, 256);
        let p = alloc(&mut pool, MIB + 256, 2 * MIB);
        assert_eq!(p.offset_bytes % (2 * MIB), 0);
        pool.validate().expect("valid");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Random pool traffic: counters match the blocks, no two live allocations of one block
        /// overlap, dedicated blocks hold one allocation, and freeing everything then removing
        /// the empty blocks leaves nothing reserved.
        #[test]
        fn random_pool_traffic(ops in proptest::collection::vec((any::<bool>(), 1u64..(3 * MIB), 8u32..22, any::<prop::sample::Index>()), 1..120)) {
            let mut pool = small_pool();
            let mut live: Vec<Placement> = Vec::new();
            for (is_alloc, size, align_log2, pick) in ops {
                if is_alloc || live.is_empty() {
                    let p = alloc(&mut pool, size, 1 << align_log2);
                    prop_assert_eq!(p.offset_bytes % (1 << align_log2), 0);
                    for q in live.iter().filter(|q| q.block == p.block) {
                        prop_assert!(p.offset_bytes + p.size_bytes <= q.offset_bytes || q.offset_bytes + q.size_bytes <= p.offset_bytes);
                    }
                    live.push(p);
                } else {
                    let p = live.swap_remove(pick.index(live.len()));
                    let out = pool.free(&p).expect("free");
                    prop_assert_eq!(out.freed_bytes, p.size_bytes);
                    if out.dedicated {
                        pool.remove_block(p.block).expect("dedicated block released");
                    }
                }
                pool.validate().map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(pool.stats().allocated_bytes, live.iter().map(|p| p.size_bytes).sum::<u64>());
            }
            for p in live.drain(..) {
                pool.free(&p).expect("free");
            }
            for id in pool.empty_blocks() {
                pool.remove_block(id).expect("remove");
            }
            prop_assert_eq!(pool.stats(), PoolStats::default());
            pool.validate().map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
    }
}
