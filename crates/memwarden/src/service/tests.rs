use super::*;
use memwarden_backends::{BackendError, HostBackend, HostStatusReader};
use memwarden_core::units::{GIB, MIB};
use memwarden_testkit::SimulatedBackend;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/host").join(name)
}

/// A service over the real host backend, reading status from `root` (a fixture) or the machine.
fn service_with(root: Option<&str>, headroom_bytes: u64) -> Service {
    let reader = match root {
        Some(r) => HostStatusReader::with_root(fixture(r)),
        None => HostStatusReader::default(),
    };
    let pool = PoolConfig { block_size_bytes: 8 * MIB, dedicated_threshold_bytes: 4 * MIB, ..PoolConfig::default() };
    Service::with_backends(
        vec![Arc::new(HostBackend::new(reader))],
        pool,
        Limits { headroom_bytes, ..Limits::default() },
    )
}

fn req(size_bytes: u64, kind: Option<MemoryKind>) -> AllocateRequest {
    AllocateRequest {
        device: "cpu".into(),
        size_bytes,
        kind,
        alignment_bytes: DEFAULT_ALIGNMENT_BYTES,
        purpose: Some("test".into()),
        owner: Some("unit".into()),
        owner_pid: None,
        owner_client: None,
        persistent: false,
        movable: true,
    }
}

fn pool_reserved(s: &Service) -> u64 {
    s.status(DeviceId::Cpu).expect("status").pool_totals().0
}

#[test]
fn allocate_list_get_free() {
    let s = service_with(None, 0);
    let a = s.allocate(req(1000, None)).expect("allocate");
    assert_eq!(a.kind, MemoryKind::Host, "host is the default kind on cpu");
    assert_eq!(a.allocated_bytes, 1024);
    assert!(a.address.is_some_and(|x| x % 256 == 0));
    let b = s.allocate(req(5000, Some(MemoryKind::Pinned))).expect("pinned");
    assert_eq!(s.allocations(None).len(), 2);
    assert_eq!(s.allocations(Some(DeviceId::Cpu)).len(), 2);
    assert_eq!(s.allocation(&a.id).expect("get").size_bytes, 1000);
    s.validate().expect("ledger matches pools");
    assert_eq!(s.free(&a.id).expect("free").allocated_bytes, a.allocated_bytes);
    assert!(matches!(s.free(&a.id), Err(ServiceError::AllocationNotFound { .. })), "double free is 404");
    assert!(matches!(s.allocation(&a.id), Err(ServiceError::AllocationNotFound { .. })));
    assert!(matches!(s.free("no-such-id"), Err(ServiceError::AllocationNotFound { .. })));
    s.free(&b.id).expect("free");
    s.validate().expect("valid");
}

#[test]
fn aliases_resolve_and_unknown_devices_name_the_known_ones() {
    let s = service_with(None, 0);
    for alias in ["cpu", "cpu:0", "cpu-0", "CPU_0"] {
        assert_eq!(s.resolve(alias), Ok(DeviceId::Cpu));
    }
    match s.resolve("cuda:0") {
        Err(ServiceError::DeviceNotFound { requested, known }) => {
            assert_eq!(requested, "cuda:0");
            assert_eq!(known, vec!["cpu".to_string()]);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(s.resolve("banana"), Err(ServiceError::DeviceNotFound { .. })));
}

#[test]
fn bad_requests_are_refused_with_nothing_changed() {
    let s = service_with(None, 0);
    let cases = [
        (req(0, None), "sizeBytes"),
        (AllocateRequest { alignment_bytes: 3, ..req(10, None) }, "alignment"),
        (AllocateRequest { alignment_bytes: 4 * MIB, ..req(10, None) }, "alignment"),
        (req(10, Some(MemoryKind::Device)), "memoryType"),
    ];
    for (r, field) in cases {
        match s.allocate(r) {
            Err(ServiceError::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    assert!(s.allocations(None).is_empty());
    assert_eq!(pool_reserved(&s), 0);
}

#[test]
fn large_alignment_is_honoured() {
    let s = service_with(None, 0);
    let _small = s.allocate(req(300, None)).expect("small");
    let a = s.allocate(AllocateRequest { alignment_bytes: 2 * MIB, ..req(300, None) }).expect("aligned");
    assert_eq!(a.address.expect("address") % (2 * MIB), 0);
}

/// The cgroup-v1 fixture: limit 2 GiB, 324431872 bytes used → 1823051776 available.
const FIXTURE_AVAILABLE: u64 = 2 * GIB - (324_591_616 - 159_744);

#[test]
fn budget_is_checked_before_anything_is_allocated() {
    let s = service_with(Some("cgroup-v1-limited"), 0);
    match s.allocate(req(FIXTURE_AVAILABLE + 1, None)) {
        Err(ServiceError::InsufficientMemory { requested_bytes, available_bytes, .. }) => {
            assert_eq!(requested_bytes, FIXTURE_AVAILABLE + 1);
            assert_eq!(available_bytes, FIXTURE_AVAILABLE);
        }
        other => panic!("{other:?}"),
    }
    assert!(s.allocations(None).is_empty(), "nothing half-allocated");
    assert_eq!(pool_reserved(&s), 0);
    s.validate().expect("valid");
}

#[test]
fn reservations_take_budget_but_no_memory() {
    let s = service_with(Some("cgroup-v1-limited"), 0);
    let r = s.allocate(req(FIXTURE_AVAILABLE - 100 * MIB, Some(MemoryKind::Reservation))).expect("reserve");
    assert_eq!(r.address, None);
    assert_eq!(pool_reserved(&s), 0, "a reservation holds no memory");
    assert_eq!(s.status(DeviceId::Cpu).expect("status").reservation_bytes, FIXTURE_AVAILABLE - 100 * MIB);
    // 100 MiB of budget is left: 200 MiB does not fit, 50 MiB does.
    match s.allocate(req(200 * MIB, None)) {
        Err(ServiceError::InsufficientMemory { available_bytes, .. }) => assert_eq!(available_bytes, 100 * MIB),
        other => panic!("{other:?}"),
    }
    let a = s.allocate(req(50 * MIB, None)).expect("fits the rest of the budget");
    s.validate().expect("valid");
    s.free(&r.id).expect("free the reservation");
    assert_eq!(s.status(DeviceId::Cpu).expect("status").reservation_bytes, 0);
    s.free(&a.id).expect("free");
    s.validate().expect("valid");
}

#[test]
fn headroom_is_kept_free() {
    let s = service_with(Some("cgroup-v1-limited"), FIXTURE_AVAILABLE - 10 * MIB);
    assert!(matches!(
        s.allocate(req(11 * MIB, Some(MemoryKind::Reservation))),
        Err(ServiceError::InsufficientMemory { .. })
    ));
    s.allocate(req(9 * MIB, Some(MemoryKind::Reservation))).expect("within headroom");
}

#[test]
fn a_new_block_must_fit_what_the_os_has() {
    // 100 MiB budget left; the request (1 MiB) fits, but it needs a new 8 MiB block: still fine.
    // With only 4 MiB left the block does not fit and the 1 MiB request is refused.
    let s = service_with(Some("cgroup-v1-limited"), FIXTURE_AVAILABLE - 4 * MIB);
    match s.allocate(req(MIB, None)) {
        Err(ServiceError::InsufficientMemory { detail, .. }) => assert!(detail.contains("new pool block"), "{detail}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(pool_reserved(&s), 0);
}

#[test]
fn dedicated_blocks_go_back_at_once_shared_ones_on_clear() {
    let s = service_with(None, 0);
    let big = s.allocate(req(6 * MIB, None)).expect("dedicated");
    assert_eq!(pool_reserved(&s), 6 * MIB);
    s.free(&big.id).expect("free");
    assert_eq!(pool_reserved(&s), 0, "dedicated block released on free");
    let small = s.allocate(req(MIB, None)).expect("shared");
    assert_eq!(pool_reserved(&s), 8 * MIB);
    assert_eq!(s.clear(None).expect("clear")[0].cleared_bytes, 0, "a block in use stays");
    s.free(&small.id).expect("free");
    assert_eq!(pool_reserved(&s), 8 * MIB, "shared block cached after free");
    let out = s.clear(Some(DeviceId::Cpu)).expect("clear");
    assert_eq!(out, vec![ClearOutcome { device: DeviceId::Cpu, cleared_bytes: 8 * MIB, reserved_bytes_after: 0 }]);
    s.validate().expect("valid");
}

#[test]
fn concurrent_traffic_keeps_the_ledger_and_pools_consistent() {
    let s = Arc::new(service_with(None, 0));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut live = Vec::new();
                for i in 0..300u64 {
                    let size = ((i * 7919 + t * 104729) % 300_000) + 1;
                    let kind = if i % 5 == 0 { MemoryKind::Reservation } else { MemoryKind::Host };
                    live.push(s.allocate(req(size, Some(kind))).expect("allocate").id.clone());
                    if i % 3 == 0 {
                        let id = live.swap_remove((i as usize * 31) % live.len());
                        s.free(&id).expect("free");
                    }
                }
                live
            })
        })
        .collect();
    let live: Vec<String> = threads.into_iter().flat_map(|t| t.join().expect("thread")).collect();
    s.validate().expect("consistent after concurrent traffic");
    assert_eq!(s.allocations(None).len(), live.len());
    for id in live {
        s.free(&id).expect("free");
    }
    s.clear(None).expect("clear");
    assert_eq!(pool_reserved(&s), 0);
    s.validate().expect("valid");
}

#[test]
fn the_nonblocking_path_defers_only_when_a_block_is_needed() {
    let s = service_with(None, 0);
    assert_eq!(s.try_allocate_now(req(MIB, None)), Ok(None), "empty pool: a block is needed");
    assert_eq!(pool_reserved(&s), 0, "deferring changed nothing");
    assert!(s.allocations(None).is_empty());
    let warm = s.allocate(req(MIB, None)).expect("allocate");
    let hit = s.try_allocate_now(req(MIB, None)).expect("ok").expect("pool hit is served now");
    assert!(
        s.try_allocate_now(req(MIB, Some(MemoryKind::Reservation))).expect("ok").is_some(),
        "reservations never block"
    );
    assert!(s.free_is_quick(&hit.id), "a shared-block free releases nothing");
    let big = s.allocate(req(5 * MIB, None)).expect("dedicated");
    assert!(!s.free_is_quick(&big.id), "a dedicated free unmaps");
    for id in [&warm.id, &hit.id, &big.id] {
        s.free(id).expect("free");
    }
    s.validate().expect("valid");
}

#[test]
fn allocations_in_use_by_a_copy_cannot_be_freed() {
    let s = service_with(None, 0);
    let a = s.allocate(req(4096, None)).expect("allocate");
    s.acquire(&[&a.id]).expect("acquire");
    match s.free(&a.id) {
        Err(ServiceError::InvalidOperation(m)) => assert!(m.contains("in use by 1 transfer"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(s.allocation(&a.id).is_ok(), "still there");
    s.release(&[&a.id]);
    s.free(&a.id).expect("free after the copy");
    assert!(
        matches!(s.acquire(&[&a.id]), Err(ServiceError::AllocationNotFound { .. })),
        "a freed allocation cannot be used"
    );
    s.validate().expect("valid");
}

/// The host and a GPU-like device (`cuda:0`, 8 GiB, 4 GiB used elsewhere) whose driver fails
/// every call with `fail_with` (the testkit's simulated backend; no hardware).
fn with_flaky_gpu(fail_with: BackendError) -> Service {
    let gpu =
        SimulatedBackend::new(DeviceId::cuda(0)).named("flaky").with_capacity(8 * GIB).with_used_elsewhere(4 * GIB);
    gpu.controls().fail_everything_with(Some(fail_with));
    let pool = PoolConfig { block_size_bytes: 8 * MIB, dedicated_threshold_bytes: 4 * MIB, ..PoolConfig::default() };
    Service::with_backends(
        vec![Arc::new(HostBackend::new(HostStatusReader::default())), Arc::new(gpu)],
        pool,
        Limits::default(),
    )
}

#[test]
fn driver_out_of_memory_is_insufficient_memory_with_numbers() {
    let s = with_flaky_gpu(BackendError::OutOfMemory {
        requested_bytes: GIB,
        available_bytes: 123,
        detail: "cuMemAlloc failed".into(),
    });
    let r = AllocateRequest { device: "cuda:0".into(), ..req(GIB, None) };
    match s.allocate(r) {
        Err(ServiceError::InsufficientMemory { device, requested_bytes, available_bytes, .. }) => {
            assert_eq!((device.as_str(), requested_bytes, available_bytes), ("cuda:0", GIB, 123));
        }
        other => panic!("{other:?}"),
    }
    assert!(s.allocations(None).is_empty(), "nothing half-allocated");
    assert!(s.status(DeviceId::cuda(0)).expect("status").fault.is_none(), "running out of memory is not a fault");
    s.validate().expect("valid");
}

#[test]
fn a_driver_fault_marks_only_that_device_unhealthy() {
    let s =
        with_flaky_gpu(BackendError::Failed { operation: "CUDA driver", message: "CUDA_ERROR_ILLEGAL_ADDRESS".into() });
    let r = AllocateRequest { device: "gpu:0".into(), ..req(MIB, None) };
    assert!(matches!(s.allocate(r), Err(ServiceError::BackendFailed { .. })));
    let st = s.status(DeviceId::cuda(0)).expect("status still answers");
    assert_eq!(st.fault.as_deref(), Some("CUDA_ERROR_ILLEGAL_ADDRESS"));
    // The host keeps working.
    let a = s.allocate(req(MIB, None)).expect("cpu unaffected");
    assert!(s.status(DeviceId::Cpu).expect("status").fault.is_none());
    s.free(&a.id).expect("free");
    s.validate().expect("valid");
}

fn capped_service() -> Service {
    // 8 MiB blocks, nothing dedicated below 8 MiB, at most two blocks per pool.
    let pool = PoolConfig { block_size_bytes: 8 * MIB, dedicated_threshold_bytes: 8 * MIB, ..PoolConfig::default() };
    let limits = Limits { pool_cap_bytes: 16 * MIB, ..Limits::default() };
    let host = HostBackend::new(HostStatusReader::default()).with_shared_dir(Some(std::env::temp_dir()));
    Service::with_backends(vec![Arc::new(host)], pool, limits)
}

fn pattern_of(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (k as u8).wrapping_mul(13).wrapping_add(i as u8).rotate_left((i % 7) as u32)).collect()
}

/// The scenario that matters: a capped pool is fragmented until a large allocation fails
/// although enough bytes are free in total; after defragmentation it succeeds.
#[test]
fn defragmentation_makes_a_failing_allocation_fit() {
    let s = capped_service();
    let small: Vec<_> = (0..16).map(|_| s.allocate(req(MIB, None)).expect("1 MiB")).collect();
    for a in small.iter().step_by(2) {
        s.free(&a.id).expect("free every other");
    }
    let st = s.status(DeviceId::Cpu).expect("status");
    let host = st.pools.iter().find(|(k, _)| *k == MemoryKind::Host).expect("host pool").1;
    assert_eq!(host.free_in_pool_bytes, 8 * MIB, "8 MiB free in total");
    assert_eq!(host.largest_free_block_bytes, MIB, "but only in 1 MiB pieces");
    assert!((host.fragmentation_index() - 0.875).abs() < 1e-9);
    assert_eq!(s.can_allocate(DeviceId::Cpu, 4 * MIB, None).expect("probe").fit, Fit::No);
    match s.allocate(req(4 * MIB, None)) {
        Err(ServiceError::InsufficientMemory { detail, .. }) => assert!(detail.contains("capped"), "{detail}"),
        other => panic!("expected 507, got {other:?}"),
    }
    let opts = memwarden_core::defrag::DefragOptions::default();
    let report = s.defragment(DeviceId::Cpu, opts, None).expect("defragment");
    assert_eq!(report.allocations_moved, 4, "the sparser block's four allocations move");
    assert_eq!(report.bytes_moved, 4 * MIB);
    assert_eq!((report.blocks_released, report.bytes_released), (1, 8 * MIB));
    assert!(report.fragmentation_before > 0.8 && report.fragmentation_after == 0.0, "{report:?}");
    assert_eq!(s.can_allocate(DeviceId::Cpu, 4 * MIB, None).expect("probe").fit, Fit::NewMemory);
    s.allocate(req(4 * MIB, None)).expect("the same allocation now fits");
    s.validate().expect("valid");
}

/// Every byte of every allocation survives a thorough pass; immovable and exported ones stay
/// put; moved ones get a new generation.
#[test]
fn defragmentation_keeps_every_byte() {
    let s = capped_service();
    let sizes = [300_000u64, MIB, 70_000, 512 * 1024, 123_456, 2 * MIB, 4096, 777_777];
    let mut live = Vec::new();
    for (i, &size) in sizes.iter().cycle().take(24).enumerate() {
        let immovable = i % 5 == 0;
        let a = s.allocate(AllocateRequest { movable: !immovable, ..req(size, None) }).expect("allocate");
        s.write_bytes(&a.id, 0, &pattern_of(i, size as usize)).expect("fill");
        live.push((i, a));
    }
    let mut kept = Vec::new();
    for (i, a) in live {
        if i % 3 == 1 {
            s.free(&a.id).expect("free");
        } else {
            kept.push((i, a));
        }
    }
    let exported = &kept[1].1;
    s.export(&exported.id, ExportVia::Http).expect("export pins it");
    let before: Vec<_> = kept.iter().map(|(_, a)| s.allocation(&a.id).expect("live")).collect();
    let opts = memwarden_core::defrag::DefragOptions {
        strategy: memwarden_core::defrag::DefragStrategy::Thorough,
        ..Default::default()
    };
    let report = s.defragment(DeviceId::Cpu, opts, None).expect("defragment");
    assert!(report.allocations_moved > 0, "{report:?}");
    for ((i, a), old) in kept.iter().zip(&before) {
        let now = s.allocation(&a.id).expect("still live");
        let data = s.read_bytes(&a.id, 0, a.size_bytes).expect("read");
        assert!(data == pattern_of(*i, a.size_bytes as usize), "allocation {i} lost bytes");
        if !old.movable || old.exported {
            assert_eq!(now.placement, old.placement, "allocation {i} must not move");
            assert_eq!(now.generation, 0);
        } else if now.placement != old.placement {
            assert!(now.generation > old.generation, "a moved allocation's generation grows");
            assert_ne!(now.address, old.address);
        }
    }
    s.validate().expect("ledger matches pools after moves");
}

/// The progress hook sees bytes moved grow batch by batch (1024 moves: more than one batch
/// takes) against the bytes planned, and ends at the report's `bytes_moved`, planned and moved
/// equal.
#[test]
fn defragmentation_reports_progress_after_each_batch() {
    let s = capped_service();
    let small: Vec<_> = (0..4096).map(|_| s.allocate(req(4096, None)).expect("4 KiB")).collect();
    for a in small.iter().step_by(2) {
        s.free(&a.id).expect("free every other");
    }
    let mut calls: Vec<(u64, u64)> = Vec::new();
    let opts = memwarden_core::defrag::DefragOptions::default();
    let report = s
        .defragment_with_progress(DeviceId::Cpu, opts, None, &mut |moved, planned| calls.push((moved, planned)))
        .expect("defragment");
    let moved = (report.allocations_moved, report.bytes_moved);
    assert_eq!(moved, (1024, 4 * MIB), "the second block's allocations moved: {report:?}");
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0), "bytes moved never decrease: {calls:?}");
    assert!(calls.iter().all(|(moved, planned)| moved <= planned), "{calls:?}");
    assert_eq!(calls.first(), Some(&(0, report.bytes_moved)), "the plan's bytes first, nothing moved yet");
    assert!(calls.iter().any(|&(m, _)| m > 0 && m < report.bytes_moved), "between batches: {calls:?}");
    assert_eq!(calls.last(), Some(&(report.bytes_moved, report.bytes_moved)), "{calls:?}");
    // Nothing to do: one call, nothing planned.
    let mut calls = Vec::new();
    let again = s
        .defragment_with_progress(DeviceId::Cpu, opts, None, &mut |moved, planned| calls.push((moved, planned)))
        .expect("defragment");
    assert_eq!((again.bytes_moved, calls), (0, vec![(0, 0)]));
    s.validate().expect("valid");
}

#[test]
fn defragmentation_respects_time_and_move_limits() {
    let s = capped_service();
    let small: Vec<_> = (0..16).map(|_| s.allocate(req(MIB, None)).expect("1 MiB")).collect();
    for a in small.iter().step_by(2) {
        s.free(&a.id).expect("free");
    }
    let opts = memwarden_core::defrag::DefragOptions { max_allocations_to_move: 0, ..Default::default() };
    let r = s.defragment(DeviceId::Cpu, opts, None).expect("defragment");
    assert_eq!((r.allocations_moved, r.bytes_moved), (0, 0));
    let r = s
        .defragment(DeviceId::Cpu, memwarden_core::defrag::DefragOptions::default(), Some(Duration::ZERO))
        .expect("defragment");
    assert_eq!(r.allocations_moved, 0, "no time: nothing moves");
    assert!(r.moves_skipped > 0);
    s.validate().expect("valid");
}

#[test]
fn allocations_in_use_are_not_moved() {
    let s = capped_service();
    let small: Vec<_> = (0..16).map(|_| s.allocate(req(MIB, None)).expect("1 MiB")).collect();
    for a in small.iter().step_by(2) {
        s.free(&a.id).expect("free");
    }
    let busy: Vec<&str> = small.iter().skip(1).step_by(2).map(|a| a.id.as_str()).collect();
    s.acquire(&busy).expect("acquire");
    let r = s.defragment(DeviceId::Cpu, memwarden_core::defrag::DefragOptions::default(), None).expect("defragment");
    assert_eq!(r.allocations_moved, 0, "allocations a transfer uses stay put");
    s.release(&busy);
}

#[test]
fn automatic_defragmentation_retries_a_failed_allocation() {
    let mut s = capped_service();
    s.auto_defrag = Some(crate::config::DefragSection { auto: true, ..Default::default() });
    let small: Vec<_> = (0..16).map(|_| s.allocate(req(MIB, None)).expect("1 MiB")).collect();
    for a in small.iter().step_by(2) {
        s.free(&a.id).expect("free");
    }
    let a = s.allocate(req(4 * MIB, None)).expect("fits after the automatic pass");
    assert_eq!(a.size_bytes, 4 * MIB);
    let moved = s.allocations(None).iter().filter(|r| r.generation > 0).count();
    assert_eq!(moved, 4, "the pass moved the sparse block's allocations");
    s.validate().expect("valid");
}

#[test]
fn recording_counts_the_allocation_path_and_the_log_resolves_owners() {
    let s = service_with(None, 0);
    let a = s.allocate(req(MIB, None)).expect("a");
    let b = s.allocate(req(2 * MIB, Some(MemoryKind::Reservation))).expect("b");
    s.free(&a.id).expect("free a");
    let r = s.device_record(DeviceId::Cpu);
    assert_eq!((r.counters.allocations, r.counters.reservations, r.counters.frees), (2, 1, 1));
    // A reservation commits no memory: no allocated or live bytes (issue 15).
    assert_eq!(r.counters.allocated_bytes, MIB);
    assert_eq!(r.live_bytes, 0, "only the reservation is live, and it holds no memory");
    assert_eq!(r.peak_live.value, MIB);
    assert_eq!(r.counters.average_allocation_bytes(), MIB);
    // Both allocations' entries resolve to their records: a's through its freed entry, b's
    // through the ledger.
    let ev = s.allocation_events(Some(DeviceId::Cpu), None);
    let got: Vec<(EventKind, &str, Option<&str>)> =
        ev.iter().map(|e| (e.kind, e.record.id.as_str(), e.record.owner.as_deref())).collect();
    assert_eq!(
        got,
        vec![
            (EventKind::Allocated, a.id.as_str(), Some("unit")),
            (EventKind::Allocated, b.id.as_str(), Some("unit")),
            (EventKind::Freed, a.id.as_str(), Some("unit")),
        ]
    );
    assert!(s.owner_activity().contains_key("unit"));
    // A request that does not fit, even through the non-blocking path, is recorded as a
    // failure with its size; a reservation that does not fit is not.
    let too_big = 1u64 << 50;
    assert_eq!(s.try_allocate_now(req(too_big, None)), Ok(None), "the blocking path decides");
    assert!(matches!(s.allocate(req(too_big, None)), Err(ServiceError::InsufficientMemory { .. })));
    assert!(s.allocate(req(too_big, Some(MemoryKind::Reservation))).is_err());
    let r = s.device_record(DeviceId::Cpu);
    assert_eq!(r.counters.failed_allocations, 1);
    assert_eq!(r.last_failure.map(|(_, bytes)| bytes), Some(too_big));
    s.free(&b.id).expect("free b");
    s.validate().expect("valid");
}

#[test]
fn a_full_event_log_drops_the_oldest_and_says_so() {
    let mut s = service_with(None, 0);
    s.set_recording(true, 4);
    for _ in 0..3 {
        let a = s.allocate(req(4096, None)).expect("a");
        s.free(&a.id).expect("free");
    }
    let ev = s.allocation_events(None, None);
    let kinds: Vec<EventKind> = ev.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Allocated, EventKind::Freed, EventKind::Allocated, EventKind::Freed]);
    assert_eq!(ev[0].record.id, ev[1].record.id, "the first pair's two entries were dropped");
    let (capacity, oldest, dropped) = s.event_log_extent();
    assert_eq!(capacity, 4);
    assert!(dropped.is_some_and(|d| oldest.is_some_and(|o| d <= o)));
    assert_eq!(s.device_record(DeviceId::Cpu).counters.allocations, 3, "counters are exact regardless");
    // Recording off: nothing is counted or logged, and frees still work.
    s.set_recording(false, 4);
    let a = s.allocate(req(4096, None)).expect("a");
    s.free(&a.id).expect("free");
    assert!(s.allocation_events(None, None).is_empty());
    assert_eq!(s.device_record(DeviceId::Cpu).counters.allocations, 0);
}

#[test]
fn a_reclaimed_allocation_a_copy_is_using_is_freed_when_the_copy_releases_it() {
    let s = service_with(None, 0);
    let a = s.allocate(req(4096, None)).expect("allocate");
    s.acquire(&[&a.id]).expect("a copy uses it");
    let (count, _, deferred) = s.reclaim(std::slice::from_ref(&a.id));
    assert_eq!((count, deferred), (0, vec![a.id.clone()]));
    assert!(s.allocation(&a.id).is_ok(), "kept while the copy runs");
    s.release(&[&a.id]);
    assert!(matches!(s.allocation(&a.id), Err(ServiceError::AllocationNotFound { .. })), "freed on release");
    let events = s.allocation_events(None, None);
    assert_eq!(events.last().map(|e| (e.kind, e.record.id.as_str())), Some((EventKind::Reclaimed, a.id.as_str())));
    s.validate().expect("valid");
}

#[test]
fn an_allocation_for_a_connection_that_closed_is_refused_and_leaves_nothing() {
    let s = service_with(None, 0);
    let for_client = |c: &str| AllocateRequest { owner_client: Some(c.into()), ..req(MIB, None) };
    // Never opened (or already closed and reclaimed): refused where it would be recorded.
    match s.allocate(for_client("app@1")) {
        Err(ServiceError::InvalidOperation(m)) => assert!(m.contains("app@1"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(s.allocations(None).is_empty());
    assert_eq!(s.status(DeviceId::Cpu).expect("status").pool_totals().1, 0, "the placement went back");
    s.open_client("app@2");
    let kept = s.allocate(for_client("app@2")).expect("an open connection owns memory");
    let other = s.allocate(for_client("app@2")).expect("twice");
    s.open_client("app@3");
    let neighbour = s.allocate(for_client("app@3")).expect("another connection of the same name");
    let (count, bytes, deferred) = s.reclaim_client("app@2");
    assert_eq!((count, bytes, deferred.len()), (2, kept.allocated_bytes + other.allocated_bytes, 0));
    assert!(s.allocation(&neighbour.id).is_ok(), "only that connection's memory");
    assert!(s.allocate(for_client("app@2")).is_err(), "closed for good");
    s.validate().expect("valid");
}

mod executor_runs_every_plan {
    use super::*;
    use memwarden_core::defrag::{DefragOptions, DefragStrategy};
    use proptest::prelude::*;

    use memwarden_core::units::KIB;

    /// 1 MiB blocks, nothing dedicated, no cap: plans with many moves, some allocations moved twice.
    fn small_blocks() -> Service {
        let pool = PoolConfig { block_size_bytes: MIB, dedicated_threshold_bytes: MIB, ..PoolConfig::default() };
        let host = HostBackend::new(HostStatusReader::default()).with_shared_dir(Some(std::env::temp_dir()));
        Service::with_backends(vec![Arc::new(host)], pool, Limits::default())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// With no other request on the device, a pass carries out the whole plan it makes, in
        /// every strategy: nothing skipped, no error, every byte where its allocation now is.
        #[test]
        fn with_no_concurrent_requests(
            sizes in proptest::collection::vec(1u64..=96, 8..160),
            keep in proptest::collection::vec(any::<bool>(), 160),
            strategy in prop_oneof![Just(DefragStrategy::Quick), Just(DefragStrategy::Balanced), Just(DefragStrategy::Thorough)],
        ) {
            let s = small_blocks();
            let all: Vec<_> = sizes.iter().map(|k| s.allocate(req(k * 4 * KIB, None)).expect("allocate")).collect();
            let mut live = Vec::new();
            for (i, a) in all.iter().enumerate() {
                if keep[i] {
                    s.write_bytes(&a.id, 0, &pattern_of(i, a.size_bytes as usize)).expect("write");
                    live.push((i, a.clone()));
                } else {
                    s.free(&a.id).expect("free");
                }
            }
            let options = DefragOptions { strategy, ..DefragOptions::default() };
            let plan = s.plan_now(DeviceId::Cpu, MemoryKind::Host, options);
            let report = s.defragment(DeviceId::Cpu, options, None).expect("defragment");
            prop_assert!(report.error.is_none(), "{:?}", report);
            prop_assert_eq!(report.moves_skipped, 0, "{:?}", report);
            prop_assert_eq!(report.allocations_moved, plan.moves.len(), "{:?}", report);
            prop_assert_eq!(report.bytes_moved, plan.bytes_to_move);
            for (i, a) in &live {
                prop_assert_eq!(s.read_bytes(&a.id, 0, a.size_bytes).expect("read"), pattern_of(*i, a.size_bytes as usize));
            }
            s.validate().expect("ledger = pools");
        }
    }
}
