//! What [`Tlsf::validate`](super::Tlsf::validate) reports: kept apart from the allocator so its
//! file stays about the allocation logic.

/// The first broken invariant [`Tlsf::validate`](super::Tlsf::validate) finds. Node numbers are
/// slots in the node arena; sizes and offsets are in units of
/// [`GRANULARITY_BYTES`](super::GRANULARITY_BYTES).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsfInvariantError {
    #[error("physical chain has a cycle (more steps than its {nodes} nodes)")]
    PhysicalCycle { nodes: usize },
    #[error("node {node}: prev_phys {prev_phys} != {expected}")]
    PrevPhys { node: u32, prev_phys: u32, expected: u32 },
    #[error("node {node}: offset {offset_units} != {expected_units} (gap or overlap)")]
    Offset { node: u32, offset_units: u64, expected_units: u64 },
    #[error("node {node}: empty range")]
    EmptyRange { node: u32 },
    #[error("nodes {first} and {second}: adjacent free ranges not merged")]
    UnmergedFree { first: u32, second: u32 },
    #[error("node {node}: dead node in the chain")]
    DeadInChain { node: u32 },
    #[error("ranges cover {covered_units} units of {capacity_units}")]
    Coverage { covered_units: u64, capacity_units: u64 },
    #[error("free counter {counter} != {in_chain} units free in the chain")]
    FreeUnits { counter: u64, in_chain: u64 },
    #[error("used counter {counter} != {in_chain} used ranges in the chain")]
    UsedCount { counter: usize, in_chain: usize },
    #[error("fl bitmap bit {fl} is {fl_bit} but its sl bitmap is {sl_bitmap:#x}")]
    FlBitmap { fl: usize, fl_bit: bool, sl_bitmap: u32 },
    #[error("sl bitmap ({fl},{sl}) disagrees with its list (list empty: {head_is_nil})")]
    SlBitmap { fl: usize, sl: usize, head_is_nil: bool },
    #[error("free list has a cycle (more entries than its {nodes} nodes)")]
    FreeListCycle { nodes: usize },
    #[error("node {node} in free list ({fl},{sl}) but not free")]
    ListedNotFree { node: u32, fl: usize, sl: usize },
    #[error("node {node} of {size_units} units in wrong class ({fl},{sl})")]
    WrongClass { node: u32, size_units: u64, fl: usize, sl: usize },
    #[error("node {node}: prev_free {prev_free} != {expected}")]
    PrevFree { node: u32, prev_free: u32, expected: u32 },
    #[error("free counter {counter} != {in_chain} free ranges in the chain")]
    FreeCount { counter: usize, in_chain: usize },
    #[error("{listed} nodes in free lists, {free_in_chain} free in the chain")]
    FreeListMismatch { listed: usize, free_in_chain: usize },
    #[error("{dead} dead nodes but {spare} spare slots")]
    SpareSlots { dead: usize, spare: usize },
}
