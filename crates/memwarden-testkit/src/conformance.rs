//! One conformance suite for every backend: each backend's tests call [`run`] (this crate's own
//! tests run it on the host, lavapipe's Vulkan, the [`SimulatedBackend`](crate::SimulatedBackend)
//! and, behind the `hw-tests` feature, CUDA). Every check asserts something a broken backend
//! gets wrong.

use memwarden_backends::{Backend, BackendError, MemoryPool};
use memwarden_core::defrag::Move;
use memwarden_core::units::{MIB, TIB};
use memwarden_core::{MemoryKind, PoolConfig};
use std::sync::Arc;

/// Runs every check against `backend`; panics with the failing check's message.
pub fn run(backend: Arc<dyn Backend>) {
    status_is_sane(backend.as_ref());
    for &kind in backend.kinds() {
        blocks_hold_data(backend.as_ref(), kind);
        copies_are_exact_and_bounded(backend.as_ref(), kind);
        pool_round_trip(backend.clone(), kind);
    }
    reservation_blocks_are_refused(backend.as_ref());
}

fn status_is_sane(backend: &dyn Backend) {
    let r = backend.read_status().expect("status reads");
    assert!(r.total_bytes > 0, "total memory is positive");
    assert!(r.available_bytes <= r.total_bytes, "available {} <= total {}", r.available_bytes, r.total_bytes);
    assert!(r.used_bytes <= r.total_bytes, "used <= total");
    assert!(!r.source.is_empty(), "the source is named");
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn blocks_hold_data(backend: &dyn Backend, kind: MemoryKind) {
    let block = backend.create_block(kind, 3 * MIB + 5).expect("create block");
    assert!(block.size_bytes() >= 3 * MIB + 5, "block at least as large as asked");
    assert_eq!(block.kind(), kind);
    assert_eq!(block.address() % backend.max_alignment_bytes(), 0, "block base aligned");
    let data = pattern(4096, 7);
    backend.write(block.as_ref(), 3 * MIB - 4096, &data).expect("write");
    let mut back = vec![0; 4096];
    backend.read(block.as_ref(), 3 * MIB - 4096, &mut back).expect("read");
    assert_eq!(back, data, "read returns what was written");
    assert!(backend.write(block.as_ref(), block.size_bytes() - 1, &[1, 2]).is_err(), "write past the end refused");
    assert!(backend.read(block.as_ref(), u64::MAX, &mut back).is_err(), "read at overflowing offset refused");
    backend.destroy_block(block.into()).expect("destroy");
}

fn copies_are_exact_and_bounded(backend: &dyn Backend, kind: MemoryKind) {
    let a = backend.create_block(kind, 2 * MIB).expect("create a");
    let b = backend.create_block(kind, 2 * MIB).expect("create b");
    let data = pattern(MIB as usize, 3);
    backend.write(a.as_ref(), 4096, &data).expect("write");
    backend.copy(a.as_ref(), 4096, b.as_ref(), MIB, MIB).expect("copy");
    let mut back = vec![0; MIB as usize];
    backend.read(b.as_ref(), MIB, &mut back).expect("read");
    assert!(back == data, "copied bytes match");
    let err = backend.copy(a.as_ref(), 0, b.as_ref(), MIB + 1, MIB).expect_err("copy past the end refused");
    assert!(matches!(err, BackendError::InvalidArgument(_)), "bounds error is InvalidArgument: {err:?}");
    // A refused copy changed nothing.
    backend.read(b.as_ref(), MIB, &mut back).expect("read");
    assert!(back == data, "refused copy left the destination intact");
    backend.destroy_block(a.into()).expect("destroy");
    backend.destroy_block(b.into()).expect("destroy");
}

fn pool_round_trip(backend: Arc<dyn Backend>, kind: MemoryKind) {
    let config = PoolConfig { block_size_bytes: 4 * MIB, dedicated_threshold_bytes: 2 * MIB, max_alignment_bytes: TIB };
    let mut pool = MemoryPool::new(backend.clone(), kind, config);
    let small: Vec<_> = (0..6).map(|i| pool.allocate(300 * 1024 + i, 4096).expect("small allocation")).collect();
    let big = pool.allocate(5 * MIB, 256).expect("dedicated allocation");
    pool.validate().expect("valid");
    for (i, a) in small.iter().enumerate() {
        assert_eq!(a.address % 4096, 0, "address honours alignment");
        let block = pool.block(a.placement.block).expect("block");
        backend.write(block.as_ref(), a.placement.offset_bytes, &pattern(300 * 1024, i as u8)).expect("write");
    }
    // Every allocation still holds its own data: no two overlap in real memory.
    for (i, a) in small.iter().enumerate() {
        let mut back = vec![0; 300 * 1024];
        backend
            .read(pool.block(a.placement.block).expect("block").as_ref(), a.placement.offset_bytes, &mut back)
            .expect("read");
        assert!(back == pattern(300 * 1024, i as u8), "allocation {i} kept its data");
    }
    // A move (what defragmentation does) carries the bytes to the new place.
    let mut small = small;
    let victim = small[0];
    let to =
        pool.core().lowest_fit(victim.placement.block, victim.placement.size_bytes, 4096).expect("room in the block");
    assert!(to > victim.placement.offset_bytes, "the free space lies after the six allocations");
    let moved = pool
        .apply_move(&Move { from: victim.placement, to_block: victim.placement.block, to_offset_bytes: to })
        .expect("move");
    pool.finish_moves().expect("moves arrive");
    assert_eq!(moved.placement.offset_bytes, to);
    let mut back = vec![0; 300 * 1024];
    backend.read(pool.block(moved.placement.block).expect("block").as_ref(), to, &mut back).expect("read");
    assert!(back == pattern(300 * 1024, 0), "moved allocation kept its data");
    assert!(pool.free(&victim.placement).is_err(), "the old place is free already");
    small[0] = moved;
    pool.validate().expect("valid after a move");
    let s = pool.stats();
    assert_eq!(s.block_count, 2, "six small allocations share one block, the big one has its own");
    assert_eq!(s.reserved_bytes, 4 * MIB + 5 * MIB);
    // Freeing the dedicated allocation releases its block at once.
    pool.free(&big.placement).expect("free big");
    assert_eq!(pool.stats().reserved_bytes, 4 * MIB);
    assert!(pool.free(&big.placement).is_err(), "double free refused");
    assert_eq!(pool.clear().expect("clear"), (0, 0), "a block in use is not cleared");
    for a in &small {
        pool.free(&a.placement).expect("free");
    }
    assert_eq!(pool.clear().expect("clear"), (1, 4 * MIB), "clear returns the empty block");
    assert_eq!(pool.stats().reserved_bytes, 0);
    pool.validate().expect("valid");
    // Bad requests are refused with nothing created.
    assert!(pool.allocate(0, 256).is_err());
    assert!(pool.allocate(256, 3).is_err());
    assert_eq!(pool.stats().block_count, 0);
}

fn reservation_blocks_are_refused(backend: &dyn Backend) {
    let err = backend.create_block(MemoryKind::Reservation, MIB).expect_err("no memory for a reservation");
    assert!(matches!(err, BackendError::UnsupportedKind { .. }), "{err:?}");
}
