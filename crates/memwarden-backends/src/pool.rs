//! [`MemoryPool`]: the core block pool joined to real blocks from one backend. This is the only
//! place that decides when blocks are created and released, for every backend.

use crate::backend::{Backend, BackendError, SharedBlock};
use memwarden_core::defrag::Move;
use memwarden_core::{BlockId, MemoryKind, Placement, Pool, PoolConfig, PoolError, PoolInvariantError, PoolStats};
use std::collections::HashMap;
use std::sync::Arc;

/// A live allocation in a [`MemoryPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolAllocation {
    pub placement: Placement,
    /// Block base address + offset.
    pub address: u64,
}

/// The first broken invariant [`MemoryPool::validate`] finds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryPoolInvariantError {
    /// The core pool's own bookkeeping is broken.
    #[error(transparent)]
    Pool(#[from] PoolInvariantError),
    #[error("{pool_blocks} pool blocks but {memory_blocks} memory blocks")]
    BlockCount { pool_blocks: usize, memory_blocks: usize },
    #[error("block {block:?} has no memory")]
    NoMemory { block: BlockId },
    #[error("block {block:?}: memory {memory_bytes} < pool {pool_bytes}")]
    MemoryTooSmall { block: BlockId, memory_bytes: u64, pool_bytes: u64 },
}

/// One kind of memory on one device, pooled.
pub struct MemoryPool {
    backend: Arc<dyn Backend>,
    kind: MemoryKind,
    pool: Pool,
    blocks: HashMap<BlockId, SharedBlock>,
}

impl std::fmt::Debug for MemoryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryPool")
            .field("device", &self.backend.info().device_id)
            .field("kind", &self.kind)
            .field("stats", &self.pool.stats())
            .finish()
    }
}

fn pool_error(e: PoolError) -> BackendError {
    BackendError::InvalidArgument(e.to_string())
}

impl MemoryPool {
    /// `config.max_alignment_bytes` is capped at the backend's block alignment.
    pub fn new(backend: Arc<dyn Backend>, kind: MemoryKind, mut config: PoolConfig) -> Self {
        config.max_alignment_bytes = config.max_alignment_bytes.min(backend.max_alignment_bytes());
        MemoryPool { backend, kind, pool: Pool::new(config), blocks: HashMap::new() }
    }

    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Checks a request without allocating (for validation before a budget check).
    pub fn check_request(&self, size_bytes: u64, align_bytes: u64) -> Result<(), BackendError> {
        self.pool.check_request(size_bytes, align_bytes).map_err(pool_error)
    }

    /// Bytes a request would newly take from the OS or driver: 0 when it fits in a cached block.
    pub fn new_block_bytes(&self, size_bytes: u64, align_bytes: u64) -> u64 {
        self.pool.block_request(size_bytes, align_bytes).size_bytes
    }

    /// The largest alignment a request may ask for (the configured one, capped at the
    /// backend's block alignment).
    pub fn max_alignment_bytes(&self) -> u64 {
        self.pool.config().max_alignment_bytes
    }

    /// Allocates from a cached block, or creates a block with the backend. On any failure
    /// nothing is left half-allocated.
    pub fn allocate(&mut self, size_bytes: u64, align_bytes: u64) -> Result<PoolAllocation, BackendError> {
        self.check_request(size_bytes, align_bytes)?;
        if let Some(hit) = self.try_allocate_cached(size_bytes, align_bytes) {
            return Ok(hit);
        }
        self.grow(size_bytes, align_bytes)
    }

    /// Creates a block of [`MemoryPool::new_block_bytes`] with the backend and allocates in it:
    /// the caller already checked the request ([`MemoryPool::check_request`]), found no room in
    /// the cached blocks and admitted the new block against its budget. On any failure nothing
    /// is left half-allocated.
    pub fn grow(&mut self, size_bytes: u64, align_bytes: u64) -> Result<PoolAllocation, BackendError> {
        let request = self.pool.block_request(size_bytes, align_bytes);
        let memory: SharedBlock = self.backend.create_block(self.kind, request.size_bytes)?.into();
        let id = self.pool.add_block(request);
        self.blocks.insert(id, memory);
        let Some(placement) = self.pool.allocate_in(id, size_bytes, align_bytes) else {
            // Unreachable by construction (a fresh block holds its request); undo cleanly.
            self.release_block(id)?;
            return Err(BackendError::InvalidArgument(format!(
                "a new block of {} bytes could not hold {size_bytes} bytes aligned to {align_bytes}",
                request.size_bytes
            )));
        };
        Ok(self.located(placement))
    }

    /// Allocates only from blocks already held (no new memory); `None` when none has room.
    /// The request must have passed [`MemoryPool::check_request`].
    pub fn try_allocate_cached(&mut self, size_bytes: u64, align_bytes: u64) -> Option<PoolAllocation> {
        self.pool.try_allocate(size_bytes, align_bytes).map(|p| self.located(p))
    }

    fn located(&self, placement: Placement) -> PoolAllocation {
        let base = self.blocks.get(&placement.block).map(|b| b.address()).unwrap_or(0);
        PoolAllocation { placement, address: base + placement.offset_bytes }
    }

    /// Frees an allocation. A dedicated block goes back to the OS or driver at once; shared
    /// blocks stay cached until [`MemoryPool::clear`]. Returns the bytes freed.
    pub fn free(&mut self, placement: &Placement) -> Result<u64, BackendError> {
        let out = self.pool.free(placement).map_err(pool_error)?;
        if out.dedicated && out.block_empty {
            self.release_block(placement.block)?;
        }
        Ok(out.freed_bytes)
    }

    /// Returns every empty block to the OS or driver. Returns how many and the bytes released.
    pub fn clear(&mut self) -> Result<(usize, u64), BackendError> {
        let mut released = 0;
        let empty = self.pool.empty_blocks();
        for &id in &empty {
            released += self.release_block(id)?;
        }
        Ok((empty.len(), released))
    }

    /// Waits until every byte of the moves made so far has arrived.
    pub fn finish_moves(&self) -> Result<(), BackendError> {
        self.backend.synchronize()
    }

    /// The core pool, for planning (defragmentation) without touching memory.
    pub fn core(&self) -> &Pool {
        &self.pool
    }

    /// Carries out one planned move: takes the destination range, copies the bytes (queued on
    /// GPUs: call [`MemoryPool::finish_moves`] before anyone reads them), frees the source. On a
    /// failed copy the destination is given back and the allocation stays where it was.
    /// Returns the new placement and address.
    pub fn apply_move(&mut self, m: &Move) -> Result<PoolAllocation, BackendError> {
        let to = self.pool.allocate_at(m.to_block, m.to_offset_bytes, m.from.size_bytes).ok_or_else(|| {
            BackendError::InvalidArgument(format!(
                "move destination {:?}+{} is not free",
                m.to_block, m.to_offset_bytes
            ))
        })?;
        let copied = match (self.blocks.get(&m.from.block), self.blocks.get(&to.block)) {
            (Some(src), Some(dst)) => self.backend.copy_queued(
                src.as_ref(),
                m.from.offset_bytes,
                dst.as_ref(),
                to.offset_bytes,
                m.from.size_bytes,
            ),
            _ => Err(BackendError::InvalidArgument("move names a block without memory".into())),
        };
        if let Err(e) = copied {
            let _ = self.pool.free(&to);
            return Err(e);
        }
        self.pool.free(&m.from).map_err(pool_error)?;
        Ok(self.located(to))
    }

    fn release_block(&mut self, id: BlockId) -> Result<u64, BackendError> {
        let size = self.pool.remove_block(id).map_err(pool_error)?;
        if let Some(memory) = self.blocks.remove(&id) {
            self.backend.destroy_block(memory)?;
        }
        Ok(size)
    }

    /// Full statistics (walks every block for the largest free range).
    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Bytes held from the OS or driver (O(1)).
    pub fn reserved_bytes(&self) -> u64 {
        self.pool.reserved_bytes()
    }

    /// Bytes held but not handed out (O(1)).
    pub fn free_in_pool_bytes(&self) -> u64 {
        self.pool.reserved_bytes() - self.pool.allocated_bytes()
    }

    /// The block memory behind a placement, to read, write, copy or export it. Holding the
    /// clone keeps the memory mapped even if the pool releases the block meanwhile.
    pub fn block(&self, id: BlockId) -> Option<SharedBlock> {
        self.blocks.get(&id).cloned()
    }

    /// The pool's invariants plus: every pool block has memory of at least its size.
    pub fn validate(&self) -> Result<(), MemoryPoolInvariantError> {
        self.pool.validate()?;
        let views = self.pool.blocks();
        if views.len() != self.blocks.len() {
            return Err(MemoryPoolInvariantError::BlockCount {
                pool_blocks: views.len(),
                memory_blocks: self.blocks.len(),
            });
        }
        for v in views {
            let m = self.blocks.get(&v.id).ok_or(MemoryPoolInvariantError::NoMemory { block: v.id })?;
            if m.size_bytes() < v.size_bytes {
                return Err(MemoryPoolInvariantError::MemoryTooSmall {
                    block: v.id,
                    memory_bytes: m.size_bytes(),
                    pool_bytes: v.size_bytes,
                });
            }
        }
        Ok(())
    }
}

impl Drop for MemoryPool {
    fn drop(&mut self) {
        let stats = self.pool.stats();
        if stats.allocation_count > 0 {
            tracing::warn!(
                device = %self.backend.info().device_id,
                kind = %self.kind,
                allocations = stats.allocation_count,
                bytes = stats.allocated_bytes,
                "pool dropped with live allocations; their memory is released now"
            );
        }
        for (_, memory) in self.blocks.drain() {
            if let Err(e) = self.backend.destroy_block(memory) {
                tracing::warn!(error = %e, "releasing a block failed");
            }
        }
    }
}
