//! A TLSF (two-level segregated fit) sub-allocator over the offsets of one block.
//!
//! It holds no memory and no handle to any: it only decides which byte range of a block of
//! `capacity` bytes each allocation gets, in O(1) for both allocation and free (two bitmap
//! scans, no loops over ranges). The same code serves host blocks, GPU blocks and tests.
//!
//! Written by hand rather than taken from a crate because the crates that exist either own the
//! memory they manage (rlsf, talc) or are tied to one graphics API (gpu-allocator's
//! free-list, VMA's TLSF is C++); memwarden needs an offset-only allocator whose every range can
//! be listed (pool dumps, defragmentation) and whose invariants can be checked (`validate`).
//!
//! Every offset and size is a multiple of [`GRANULARITY_BYTES`]. Physically adjacent free
//! ranges are always merged, so no two free ranges touch.

use std::fmt;

mod invariant;
pub use invariant::TlsfInvariantError;

/// Every offset and size handed out is a multiple of this (also the default alignment).
pub const GRANULARITY_BYTES: u64 = 256;

/// log2 of the number of second-level classes per power of two.
const SLI: u32 = 4;
const SL_COUNT: usize = 1 << SLI;
const FL_COUNT: usize = 64;
const NIL: u32 = u32::MAX;

/// Identifies one live allocation inside its [`Tlsf`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TlsfHandle(u32);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsfError {
    #[error("handle does not name a live allocation")]
    NotAllocated,
}

#[derive(Clone, Copy, Debug)]
struct Node {
    /// In units of GRANULARITY_BYTES.
    offset: u64,
    /// In units of GRANULARITY_BYTES.
    size: u64,
    prev_phys: u32,
    next_phys: u32,
    prev_free: u32,
    next_free: u32,
    state: NodeState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeState {
    Free,
    Used,
    /// Slot in the node arena not in use (waiting in `spare`).
    Dead,
}

/// One range of a block, as listed by [`Tlsf::ranges`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub offset_bytes: u64,
    pub size_bytes: u64,
    pub free: bool,
}

#[derive(Clone)]
pub struct Tlsf {
    capacity_units: u64,
    nodes: Vec<Node>,
    spare: Vec<u32>,
    /// The node at offset 0: start of the physical chain.
    first: u32,
    fl_bitmap: u64,
    sl_bitmap: [u32; FL_COUNT],
    heads: Box<[[u32; SL_COUNT]; FL_COUNT]>,
    free_units: u64,
    free_count: usize,
    used_count: usize,
}

impl fmt::Debug for Tlsf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tlsf")
            .field("capacity_bytes", &self.capacity_bytes())
            .field("free_bytes", &self.free_bytes())
            .field("used_count", &self.used_count)
            .finish()
    }
}

/// The (first-level, second-level) class of a free range of `units`.
fn class_of(units: u64) -> (usize, usize) {
    debug_assert!(units > 0);
    if units < SL_COUNT as u64 {
        (0, units as usize)
    } else {
        let log2 = 63 - units.leading_zeros();
        let fl = (log2 - SLI + 1) as usize;
        let sl = ((units >> (log2 - SLI)) as usize) - SL_COUNT;
        (fl, sl)
    }
}

/// The smallest class whose every member is at least `units` long (`None` if none exists).
fn class_at_least(units: u64) -> Option<(usize, usize)> {
    if units < SL_COUNT as u64 {
        return Some((0, units as usize));
    }
    let log2 = 63 - units.leading_zeros();
    let rounded = units.checked_add((1u64 << (log2 - SLI)) - 1)?;
    Some(class_of(rounded))
}

impl Tlsf {
    /// A sub-allocator for a block of `capacity_bytes` (rounded down to the granularity).
    /// A capacity below one granule gives an allocator that never allocates.
    pub fn new(capacity_bytes: u64) -> Self {
        let capacity_units = capacity_bytes / GRANULARITY_BYTES;
        let mut tlsf = Tlsf {
            capacity_units,
            nodes: Vec::with_capacity(16),
            spare: Vec::new(),
            first: NIL,
            fl_bitmap: 0,
            sl_bitmap: [0; FL_COUNT],
            heads: Box::new([[NIL; SL_COUNT]; FL_COUNT]),
            free_units: 0,
            free_count: 0,
            used_count: 0,
        };
        if capacity_units > 0 {
            let n = tlsf.new_node(0, capacity_units, NIL, NIL);
            tlsf.first = n;
            tlsf.insert_free(n);
        }
        tlsf
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_units * GRANULARITY_BYTES
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_units * GRANULARITY_BYTES
    }

    pub fn used_bytes(&self) -> u64 {
        self.capacity_bytes() - self.free_bytes()
    }

    /// Number of live allocations.
    pub fn allocation_count(&self) -> usize {
        self.used_count
    }

    pub fn is_empty(&self) -> bool {
        self.used_count == 0
    }

    /// Size of the largest free range, found from the bitmaps plus a walk of one free list.
    pub fn largest_free_bytes(&self) -> u64 {
        if self.fl_bitmap == 0 {
            return 0;
        }
        let fl = 63 - self.fl_bitmap.leading_zeros() as usize;
        let sl = 31 - self.sl_bitmap[fl].leading_zeros() as usize;
        let mut n = self.heads[fl][sl];
        let mut best = 0;
        while n != NIL {
            best = best.max(self.nodes[n as usize].size);
            n = self.nodes[n as usize].next_free;
        }
        best * GRANULARITY_BYTES
    }

    /// Allocates `size_bytes` (rounded up to the granularity) at an offset that is a multiple of
    /// `align_bytes` (a power of two; values below the granularity mean the granularity).
    /// Returns the offset in bytes and the handle that frees it, or `None` when no free range
    /// fits. The search is good-fit in O(1); only when that fails does it walk the one free list
    /// whose ranges may or may not fit, so a range that fits exactly is still found.
    pub fn allocate(&mut self, size_bytes: u64, align_bytes: u64) -> Option<(u64, TlsfHandle)> {
        if size_bytes == 0 || !align_bytes.is_power_of_two() {
            return None;
        }
        let size = size_bytes.div_ceil(GRANULARITY_BYTES);
        let align = align_bytes.max(GRANULARITY_BYTES) / GRANULARITY_BYTES;
        if size > self.free_units {
            return None;
        }
        let n = self.find_fit(size, align)?;
        let aligned = self.nodes[n as usize].offset.div_ceil(align) * align;
        Some((aligned * GRANULARITY_BYTES, self.carve(n, aligned, size)))
    }

    /// Allocates exactly `[offset_bytes, offset_bytes + size_bytes)` (offset a multiple of the
    /// granularity, size rounded up to it), if that range is free. O(ranges): for the
    /// defragmentation planner and executor, which choose places themselves.
    pub fn allocate_at(&mut self, offset_bytes: u64, size_bytes: u64) -> Option<TlsfHandle> {
        if size_bytes == 0 || !offset_bytes.is_multiple_of(GRANULARITY_BYTES) {
            return None;
        }
        let offset = offset_bytes / GRANULARITY_BYTES;
        let size = size_bytes.div_ceil(GRANULARITY_BYTES);
        let mut n = self.first;
        while n != NIL {
            let node = self.nodes[n as usize];
            if offset < node.offset + node.size {
                let fits =
                    node.state == NodeState::Free && offset >= node.offset && offset + size <= node.offset + node.size;
                return fits.then(|| self.carve(n, offset, size));
            }
            n = node.next_phys;
        }
        None
    }

    /// Turns `[offset, offset + size)` (units) of free node `n` into a used node, returning the
    /// rest of `n` (before and after) to the free lists.
    fn carve(&mut self, n: u32, offset: u64, size: u64) -> TlsfHandle {
        self.remove_free(n);
        let node = self.nodes[n as usize];
        let pad = offset - node.offset;
        if pad > 0 {
            let front = self.new_node(node.offset, pad, node.prev_phys, n);
            if node.prev_phys != NIL {
                self.nodes[node.prev_phys as usize].next_phys = front;
            } else {
                self.first = front;
            }
            let nd = &mut self.nodes[n as usize];
            nd.prev_phys = front;
            nd.offset = offset;
            nd.size -= pad;
            self.insert_free(front);
        }
        // Cut the unused tail off as a free range.
        let node = self.nodes[n as usize];
        if node.size > size {
            let tail = self.new_node(node.offset + size, node.size - size, n, node.next_phys);
            if node.next_phys != NIL {
                self.nodes[node.next_phys as usize].prev_phys = tail;
            }
            let nd = &mut self.nodes[n as usize];
            nd.next_phys = tail;
            nd.size = size;
            self.insert_free(tail);
        }
        self.nodes[n as usize].state = NodeState::Used;
        self.used_count += 1;
        TlsfHandle(n)
    }

    /// Number of free ranges (for the fragmentation metrics).
    pub fn free_range_count(&self) -> usize {
        self.free_count
    }

    /// The lowest free offset at which `size_bytes` aligned to `align_bytes` fits, scanning
    /// ranges in address order (first fit). O(ranges); the planner uses it to pack downwards.
    pub fn lowest_fit(&self, size_bytes: u64, align_bytes: u64) -> Option<u64> {
        let size = size_bytes.div_ceil(GRANULARITY_BYTES);
        let align = align_bytes.max(GRANULARITY_BYTES) / GRANULARITY_BYTES;
        let mut n = self.first;
        while n != NIL {
            let node = &self.nodes[n as usize];
            if node.state == NodeState::Free {
                let aligned = node.offset.div_ceil(align) * align;
                if aligned + size <= node.offset + node.size {
                    return Some(aligned * GRANULARITY_BYTES);
                }
            }
            n = node.next_phys;
        }
        None
    }

    /// Frees an allocation, merging it with free neighbours. Returns the bytes it held.
    pub fn free(&mut self, handle: TlsfHandle) -> Result<u64, TlsfError> {
        let n = handle.0;
        match self.nodes.get(n as usize) {
            Some(node) if node.state == NodeState::Used => {}
            _ => return Err(TlsfError::NotAllocated),
        }
        let freed = self.nodes[n as usize].size * GRANULARITY_BYTES;
        self.used_count -= 1;
        let mut n = n;
        let prev = self.nodes[n as usize].prev_phys;
        if prev != NIL && self.nodes[prev as usize].state == NodeState::Free {
            self.remove_free(prev);
            self.absorb_next(prev);
            n = prev;
        }
        let next = self.nodes[n as usize].next_phys;
        if next != NIL && self.nodes[next as usize].state == NodeState::Free {
            self.remove_free(next);
            self.absorb_next(n);
        }
        self.insert_free(n);
        Ok(freed)
    }

    /// The live allocation that starts at `offset_bytes`, if any. O(ranges).
    pub fn handle_at(&self, offset_bytes: u64) -> Option<TlsfHandle> {
        let mut n = self.first;
        while n != NIL {
            let node = &self.nodes[n as usize];
            if node.offset * GRANULARITY_BYTES == offset_bytes {
                return (node.state == NodeState::Used).then_some(TlsfHandle(n));
            }
            n = node.next_phys;
        }
        None
    }

    /// Offset and size in bytes of a live allocation.
    pub fn range_of(&self, handle: TlsfHandle) -> Option<(u64, u64)> {
        let node = self.nodes.get(handle.0 as usize)?;
        (node.state == NodeState::Used).then(|| (node.offset * GRANULARITY_BYTES, node.size * GRANULARITY_BYTES))
    }

    /// Every range of the block in address order, free and used.
    pub fn ranges(&self) -> impl Iterator<Item = Range> + '_ {
        let mut n = self.first;
        std::iter::from_fn(move || {
            if n == NIL {
                return None;
            }
            let node = &self.nodes[n as usize];
            n = node.next_phys;
            Some(Range {
                offset_bytes: node.offset * GRANULARITY_BYTES,
                size_bytes: node.size * GRANULARITY_BYTES,
                free: node.state == NodeState::Free,
            })
        })
    }

    /// Checks every invariant; returns the first one broken. Tests call it after each step.
    pub fn validate(&self) -> Result<(), TlsfInvariantError> {
        // Physical chain: contiguous, covers the capacity, no two free neighbours.
        let mut expect_offset = 0;
        let mut prev = NIL;
        let mut n = self.first;
        let (mut free_units, mut used, mut free_nodes, mut steps) = (0u64, 0usize, 0usize, 0usize);
        while n != NIL {
            steps += 1;
            if steps > self.nodes.len() {
                return Err(TlsfInvariantError::PhysicalCycle { nodes: self.nodes.len() });
            }
            let node = &self.nodes[n as usize];
            if node.prev_phys != prev {
                return Err(TlsfInvariantError::PrevPhys { node: n, prev_phys: node.prev_phys, expected: prev });
            }
            if node.offset != expect_offset {
                return Err(TlsfInvariantError::Offset {
                    node: n,
                    offset_units: node.offset,
                    expected_units: expect_offset,
                });
            }
            if node.size == 0 {
                return Err(TlsfInvariantError::EmptyRange { node: n });
            }
            match node.state {
                NodeState::Free => {
                    free_units += node.size;
                    free_nodes += 1;
                    if prev != NIL && self.nodes[prev as usize].state == NodeState::Free {
                        return Err(TlsfInvariantError::UnmergedFree { first: prev, second: n });
                    }
                }
                NodeState::Used => used += 1,
                NodeState::Dead => return Err(TlsfInvariantError::DeadInChain { node: n }),
            }
            expect_offset += node.size;
            prev = n;
            n = node.next_phys;
        }
        if expect_offset != self.capacity_units {
            return Err(TlsfInvariantError::Coverage {
                covered_units: expect_offset,
                capacity_units: self.capacity_units,
            });
        }
        if free_units != self.free_units {
            return Err(TlsfInvariantError::FreeUnits { counter: self.free_units, in_chain: free_units });
        }
        if used != self.used_count {
            return Err(TlsfInvariantError::UsedCount { counter: self.used_count, in_chain: used });
        }
        // Free lists: each node in the list of its class, links consistent, bitmaps exact.
        let mut listed = 0;
        for fl in 0..FL_COUNT {
            let fl_bit = self.fl_bitmap & (1 << fl) != 0;
            if fl_bit != (self.sl_bitmap[fl] != 0) {
                return Err(TlsfInvariantError::FlBitmap { fl, fl_bit, sl_bitmap: self.sl_bitmap[fl] });
            }
            for sl in 0..SL_COUNT {
                let head = self.heads[fl][sl];
                if (self.sl_bitmap[fl] & (1 << sl) != 0) != (head != NIL) {
                    return Err(TlsfInvariantError::SlBitmap { fl, sl, head_is_nil: head == NIL });
                }
                let mut prev = NIL;
                let mut n = head;
                while n != NIL {
                    listed += 1;
                    if listed > self.nodes.len() {
                        return Err(TlsfInvariantError::FreeListCycle { nodes: self.nodes.len() });
                    }
                    let node = &self.nodes[n as usize];
                    if node.state != NodeState::Free {
                        return Err(TlsfInvariantError::ListedNotFree { node: n, fl, sl });
                    }
                    if class_of(node.size) != (fl, sl) {
                        return Err(TlsfInvariantError::WrongClass { node: n, size_units: node.size, fl, sl });
                    }
                    if node.prev_free != prev {
                        return Err(TlsfInvariantError::PrevFree {
                            node: n,
                            prev_free: node.prev_free,
                            expected: prev,
                        });
                    }
                    prev = n;
                    n = node.next_free;
                }
            }
        }
        if free_nodes != self.free_count {
            return Err(TlsfInvariantError::FreeCount { counter: self.free_count, in_chain: free_nodes });
        }
        if listed != free_nodes {
            return Err(TlsfInvariantError::FreeListMismatch { listed, free_in_chain: free_nodes });
        }
        let dead = self.nodes.iter().filter(|n| n.state == NodeState::Dead).count();
        if dead != self.spare.len() {
            return Err(TlsfInvariantError::SpareSlots { dead, spare: self.spare.len() });
        }
        Ok(())
    }

    fn new_node(&mut self, offset: u64, size: u64, prev_phys: u32, next_phys: u32) -> u32 {
        let node = Node { offset, size, prev_phys, next_phys, prev_free: NIL, next_free: NIL, state: NodeState::Free };
        if let Some(n) = self.spare.pop() {
            self.nodes[n as usize] = node;
            n
        } else {
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        }
    }

    /// Merges `n`'s physical successor into `n` and retires the successor's node.
    fn absorb_next(&mut self, n: u32) {
        let next = self.nodes[n as usize].next_phys;
        let gone = self.nodes[next as usize];
        let nd = &mut self.nodes[n as usize];
        nd.size += gone.size;
        nd.next_phys = gone.next_phys;
        if gone.next_phys != NIL {
            self.nodes[gone.next_phys as usize].prev_phys = n;
        }
        self.nodes[next as usize].state = NodeState::Dead;
        self.spare.push(next);
    }

    /// A free node that holds `size` units at an offset aligned to `align` units.
    fn find_fit(&self, size: u64, align: u64) -> Option<u32> {
        let fits = |n: u32| {
            let node = &self.nodes[n as usize];
            node.offset.div_ceil(align) * align + size <= node.offset + node.size
        };
        // 1. Good fit: the first node of the smallest class whose members all hold `size`
        //    (O(1)); it fits unless alignment padding is needed.
        if let Some(n) = class_at_least(size).and_then(|(fl, sl)| self.find_free(fl, sl)) {
            if fits(n) {
                return Some(n);
            }
        }
        // 2. Room for the worst-case padding too: any node found fits (O(1)).
        if align > 1 {
            if let Some(n) =
                size.checked_add(align - 1).and_then(class_at_least).and_then(|(fl, sl)| self.find_free(fl, sl))
            {
                return Some(n);
            }
        }
        // 3. Last resort: the class that holds `size` itself has members both smaller and larger
        //    than it (an exactly-sized fresh block lands there); walk it for one that fits.
        let (fl, sl) = class_of(size);
        let mut n = self.heads[fl][sl];
        while n != NIL {
            if fits(n) {
                return Some(n);
            }
            n = self.nodes[n as usize].next_free;
        }
        None
    }

    fn find_free(&self, fl: usize, sl: usize) -> Option<u32> {
        let sl_map = self.sl_bitmap[fl] & (u32::MAX << sl);
        let (fl, sl_map) = if sl_map != 0 {
            (fl, sl_map)
        } else {
            let fl_map = if fl + 1 >= FL_COUNT { 0 } else { self.fl_bitmap & (u64::MAX << (fl + 1)) };
            if fl_map == 0 {
                return None;
            }
            let fl = fl_map.trailing_zeros() as usize;
            (fl, self.sl_bitmap[fl])
        };
        let sl = sl_map.trailing_zeros() as usize;
        let head = self.heads[fl][sl];
        (head != NIL).then_some(head)
    }

    fn insert_free(&mut self, n: u32) {
        let (fl, sl) = class_of(self.nodes[n as usize].size);
        let head = self.heads[fl][sl];
        {
            let nd = &mut self.nodes[n as usize];
            nd.state = NodeState::Free;
            nd.prev_free = NIL;
            nd.next_free = head;
        }
        if head != NIL {
            self.nodes[head as usize].prev_free = n;
        }
        self.heads[fl][sl] = n;
        self.sl_bitmap[fl] |= 1 << sl;
        self.fl_bitmap |= 1 << fl;
        self.free_units += self.nodes[n as usize].size;
        self.free_count += 1;
    }

    fn remove_free(&mut self, n: u32) {
        let node = self.nodes[n as usize];
        let (fl, sl) = class_of(node.size);
        if node.prev_free != NIL {
            self.nodes[node.prev_free as usize].next_free = node.next_free;
        } else {
            self.heads[fl][sl] = node.next_free;
            if node.next_free == NIL {
                self.sl_bitmap[fl] &= !(1 << sl);
                if self.sl_bitmap[fl] == 0 {
                    self.fl_bitmap &= !(1 << fl);
                }
            }
        }
        if node.next_free != NIL {
            self.nodes[node.next_free as usize].prev_free = node.prev_free;
        }
        self.free_units -= node.size;
        self.free_count -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::MIB;
    use proptest::prelude::*;

    const G: u64 = GRANULARITY_BYTES;

    #[test]
    fn classes_are_monotonic_and_rounding_is_safe() {
        let mut last = (0, 0);
        for units in 1..5000u64 {
            let c = class_of(units);
            assert!(c >= last, "class of {units} went down");
            last = c;
            // Every member of class_at_least(units) is >= units.
            let (fl, sl) = class_at_least(units).expect("class");
            let min_member = (1..20000u64).find(|&u| class_of(u) == (fl, sl));
            if let Some(m) = min_member {
                assert!(m >= units, "class for {units} admits {m}");
            }
        }
        assert!(class_at_least(u64::MAX).is_none());
    }

    #[test]
    fn allocate_and_free_whole_block() {
        let mut t = Tlsf::new(MIB);
        let (off, h) = t.allocate(MIB, G).expect("fits exactly");
        assert_eq!(off, 0);
        assert_eq!(t.free_bytes(), 0);
        assert!(t.allocate(1, G).is_none());
        assert_eq!(t.free(h), Ok(MIB));
        assert_eq!(t.free(h), Err(TlsfError::NotAllocated), "double free is refused");
        assert_eq!(t.free_bytes(), MIB);
        assert_eq!(t.largest_free_bytes(), MIB);
        t.validate().expect("valid");
    }

    #[test]
    fn validate_names_the_broken_invariant() {
        let mut t = Tlsf::new(MIB);
        t.allocate(4 * G, G).expect("fits");
        t.free_units += 1;
        let e = t.validate().expect_err("counter off by one");
        assert_eq!(e, TlsfInvariantError::FreeUnits { counter: t.free_units, in_chain: t.free_units - 1 });
        assert!(e.to_string().starts_with("free counter"), "{e}");
    }

    #[test]
    fn sizes_round_to_granularity_and_offsets_align() {
        let mut t = Tlsf::new(MIB);
        let (a, ha) = t.allocate(1, G).expect("a");
        let (b, _) = t.allocate(300, 4096).expect("b");
        assert_eq!(a, 0);
        assert_eq!(t.range_of(ha), Some((0, G)));
        assert_eq!(b % 4096, 0);
        assert!(b >= G);
        t.validate().expect("valid");
        // The padding in front of b is free and reusable.
        let (c, _) = t.allocate(G, G).expect("c");
        assert!(c < b, "padding reused: c={c} b={b}");
        t.validate().expect("valid");
    }

    #[test]
    fn neighbours_merge_on_free() {
        let mut t = Tlsf::new(4 * G);
        let hs: Vec<_> = (0..4).map(|_| t.allocate(G, G).expect("fits").1).collect();
        t.free(hs[0]).expect("free");
        t.free(hs[2]).expect("free");
        assert_eq!(t.largest_free_bytes(), G);
        t.free(hs[1]).expect("free");
        assert_eq!(t.largest_free_bytes(), 3 * G);
        assert_eq!(t.ranges().count(), 2);
        t.free(hs[3]).expect("free");
        assert_eq!(t.ranges().collect::<Vec<_>>(), vec![Range { offset_bytes: 0, size_bytes: 4 * G, free: true }]);
        t.validate().expect("valid");
    }

    #[test]
    fn allocate_at_takes_exactly_the_range_asked() {
        let mut t = Tlsf::new(16 * G);
        let a = t.allocate_at(4 * G, 2 * G).expect("free range");
        assert_eq!(t.range_of(a), Some((4 * G, 2 * G)));
        assert!(t.allocate_at(5 * G, G).is_none(), "inside a used range");
        assert!(t.allocate_at(15 * G, 2 * G).is_none(), "past the end");
        assert!(t.allocate_at(100, G).is_none(), "not on the granularity");
        assert_eq!(t.free_range_count(), 2);
        assert_eq!(t.lowest_fit(4 * G, G), Some(0));
        assert_eq!(t.lowest_fit(5 * G, G), Some(6 * G));
        assert_eq!(t.lowest_fit(11 * G, G), None);
        t.validate().expect("valid");
    }

    #[test]
    fn bad_requests_fail_cleanly() {
        let mut t = Tlsf::new(1 << 16);
        assert!(t.allocate(0, G).is_none());
        assert!(t.allocate(G, 3).is_none());
        assert!(t.allocate(u64::MAX, G).is_none());
        // Offset 0 is aligned to anything; no other offset in the block is aligned to 2^63.
        assert_eq!(t.allocate(G, 1 << 63).map(|a| a.0), Some(0));
        assert!(t.allocate(G, 1 << 63).is_none());
        assert!(Tlsf::new(100).allocate(1, 1).is_none());
        t.validate().expect("valid");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Random allocate/free sequences: validate after every step, live ranges never overlap,
        /// sit inside the block, honour their alignment, and free + used always equals capacity.
        #[test]
        fn random_sequences_keep_invariants(
            capacity_units in 1u64..4096,
            ops in proptest::collection::vec((any::<bool>(), 1u64..70_000, 0u32..14, any::<prop::sample::Index>()), 1..200),
        ) {
            let capacity = capacity_units * G;
            let mut t = Tlsf::new(capacity);
            let mut live: Vec<(TlsfHandle, u64, u64)> = Vec::new();
            for (alloc, size, align_log2, pick) in ops {
                if alloc || live.is_empty() {
                    let align = 1u64 << align_log2;
                    if let Some((off, h)) = t.allocate(size, align) {
                        let (o, s) = t.range_of(h).expect("live");
                        prop_assert_eq!(o, off);
                        prop_assert!(s >= size && s - size < G);
                        prop_assert_eq!(off % align.max(G), 0);
                        prop_assert!(off + s <= capacity);
                        for &(_, lo, ls) in &live {
                            prop_assert!(off + s <= lo || lo + ls <= off, "overlap");
                        }
                        live.push((h, off, s));
                    }
                } else {
                    let (h, _, s) = live.swap_remove(pick.index(live.len()));
                    prop_assert_eq!(t.free(h), Ok(s));
                }
                t.validate().map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(t.free_range_count(), t.ranges().filter(|r| r.free).count());
                let used: u64 = live.iter().map(|l| l.2).sum();
                prop_assert_eq!(t.used_bytes(), used);
                prop_assert_eq!(t.allocation_count(), live.len());
            }
            for (h, _, _) in live.drain(..) {
                t.free(h).expect("free");
            }
            prop_assert_eq!(t.free_bytes(), capacity);
            prop_assert_eq!(t.largest_free_bytes(), capacity);
            t.validate().map_err(|e| TestCaseError::fail(e.to_string()))?;
        }

        /// A request that asks for no more than the largest free range minus worst-case padding
        /// and class rounding always succeeds (the allocator does not lose free space).
        #[test]
        fn free_space_is_findable(sizes in proptest::collection::vec(1u64..64, 1..40)) {
            let mut t = Tlsf::new(MIB);
            let hs: Vec<_> = sizes.iter().filter_map(|&s| t.allocate(s * G, G)).collect();
            for (i, (_, h)) in hs.iter().enumerate() {
                if i % 2 == 0 { t.free(*h).expect("free"); }
            }
            let largest = t.largest_free_bytes();
            // Good-fit search rounds a request up to its next class boundary, which costs less
            // than one eighth of the request.
            let safe = largest - largest / 8;
            if safe >= G {
                prop_assert!(t.allocate(safe / G * G, G).is_some(), "largest {} safe {}", largest, safe);
            }
        }
    }
}
