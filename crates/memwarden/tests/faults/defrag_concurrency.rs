//! A defragmentation pass and the requests around it (issue 15, item 7): a pass must not stall
//! other devices, only requests for the allocations being moved may wait, and no request may
//! ever see an allocation half-moved.
//!
//! The second device is host memory behind a GPU id whose copies can be held at a gate (the
//! testkit's `SimulatedBackend`), so a test can stop a pass in the middle of a move and look at
//! everything else meanwhile.

use memwarden::service::{AllocateRequest, Limits, Service};
use memwarden_backends::{HostBackend, HostStatusReader};
use memwarden_core::defrag::{DefragOptions, DefragStrategy};
use memwarden_core::{DeviceId, GpuApi, PoolConfig};
use memwarden_testkit::{Controls, CopyFault, SimulatedBackend};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GATED: DeviceId = DeviceId::Gpu(GpuApi::Vulkan, 0);

/// The host (`cpu`) and the gated device (host memory under a GPU id: the testkit's
/// `SimulatedBackend`, whose copies wait at its gate while a test holds them), 8 MiB blocks.
fn service() -> (Arc<Service>, Arc<Controls>) {
    let gated = SimulatedBackend::host_memory(GATED).named("gated");
    let gate = gated.controls();
    let pool = PoolConfig { block_size_bytes: 8 * MIB, dedicated_threshold_bytes: 8 * MIB, ..PoolConfig::default() };
    let host = Arc::new(HostBackend::new(HostStatusReader::default()));
    (Arc::new(Service::with_backends(vec![host, Arc::new(gated)], pool, Limits::default())), gate)
}

fn movable(device: DeviceId, size_bytes: u64) -> AllocateRequest {
    AllocateRequest { movable: true, purpose: Some("defrag-test".into()), ..AllocateRequest::new(device, size_bytes) }
}

fn pattern(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
}

/// Two blocks of 1 MiB allocations, every other one freed, the survivors filled with their own
/// pattern: a `quick` pass empties one block into the other. Returns the survivors' ids.
fn fragment(s: &Service, device: DeviceId) -> Vec<String> {
    let ids: Vec<String> = (0..16).map(|_| s.allocate(movable(device, MIB)).expect("allocate").id.clone()).collect();
    for id in ids.iter().step_by(2) {
        s.free(id).expect("free");
    }
    let live: Vec<String> = ids.into_iter().skip(1).step_by(2).collect();
    for (i, id) in live.iter().enumerate() {
        s.write_bytes(id, 0, &pattern(i, MIB as usize)).expect("write");
    }
    live
}

fn quick() -> DefragOptions {
    DefragOptions { strategy: DefragStrategy::Quick, max_bytes_to_move: u64::MAX, max_allocations_to_move: usize::MAX }
}

/// Runs `f` on its own thread and waits up to `limit` for it.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_pass_stopped_mid_move_holds_up_only_the_allocations_it_moves() {
    let (s, gate) = service();
    let live = fragment(&s, GATED);
    // An allocation on the host, and one on the gated device that the pass will not move.
    let host_one = s.allocate(movable(DeviceId::Cpu, 4096)).expect("host allocation").id.clone();
    gate.hold_copies(true);
    let pass = {
        let s = s.clone();
        std::thread::spawn(move || s.defragment(GATED, quick(), None))
    };
    wait_for("the pass to reach its first copy", || gate.copies_started() > 0);

    // The host device is not held up: allocate, write, read, free and its status all answer.
    let s2 = s.clone();
    let host_ops = within(Duration::from_secs(2), move || {
        let a = s2.allocate(movable(DeviceId::Cpu, MIB)).expect("allocate on cpu");
        s2.write_bytes(&a.id, 0, &[7u8; 4096]).expect("write on cpu");
        assert_eq!(s2.read_bytes(&a.id, 0, 4096).expect("read on cpu"), vec![7u8; 4096]);
        s2.free(&a.id).expect("free on cpu");
        s2.status(DeviceId::Cpu).expect("cpu status");
        s2.allocations(None).len()
    });
    assert!(host_ops.is_some(), "requests on another device waited for the pass");
    // Reading the listing and one allocation's record does not wait either.
    let s3 = s.clone();
    let first = live[0].clone();
    assert!(within(Duration::from_secs(2), move || s3.allocation(&first).is_ok()).is_some());

    // Freeing an allocation of the moving batch waits for the batch, then succeeds.
    let freed = Arc::new(AtomicBool::new(false));
    let (s4, freed2) = (s.clone(), freed.clone());
    let moving_id = live[live.len() - 1].clone();
    let free_thread = std::thread::spawn(move || {
        let r = s4.free(&moving_id);
        freed2.store(true, Ordering::SeqCst);
        r
    });
    std::thread::sleep(Duration::from_millis(200));
    let moved_first = s.allocation(&live[live.len() - 1]).expect("still live").generation;
    assert_eq!(moved_first, 0, "the record does not change before its batch is done");
    assert!(!freed.load(Ordering::SeqCst), "a free of an allocation being moved must wait for the move");

    gate.hold_copies(false);
    let report = pass.join().expect("pass thread").expect("defragment");
    free_thread.join().expect("free thread").expect("the free succeeds after the move");
    assert!(report.allocations_moved > 0, "{report:?}");
    assert!(report.error.is_none(), "{report:?}");
    // Every survivor kept its bytes (the one freed meanwhile aside).
    for (i, id) in live.iter().enumerate().take(live.len() - 1) {
        assert_eq!(s.read_bytes(id, 0, MIB).expect("read"), pattern(i, MIB as usize), "allocation {i}");
    }
    s.free(&host_one).expect("free");
    s.validate().expect("ledger = pools after the pass");
}

#[test]
fn readers_never_see_an_allocation_half_moved() {
    let (s, _gate) = service();
    let stop = Arc::new(AtomicBool::new(false));
    // The allocations the readers check, with the pattern each holds; the main thread swaps
    // in a freshly fragmented set for every pass.
    let current: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (s, stop, current) = (s.clone(), stop.clone(), current.clone());
        readers.push(std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let set = current.lock().expect("set").clone();
                for (id, i) in set {
                    match s.read_bytes(&id, 0, MIB) {
                        Ok(got) => {
                            assert!(got == pattern(i, MIB as usize), "allocation {i} read half-moved or stale bytes");
                            reads += 1;
                        }
                        // Swapped out and freed since the snapshot.
                        Err(memwarden::service::ServiceError::AllocationNotFound { .. }) => {}
                        Err(e) => panic!("read: {e}"),
                    }
                }
            }
            reads
        }));
    }
    let (mut moved, mut passes) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) || passes < 5 {
        let live = fragment(&s, GATED);
        let old = std::mem::replace(
            &mut *current.lock().expect("set"),
            live.iter().cloned().enumerate().map(|(i, id)| (id, i)).collect(),
        );
        for (id, _) in old {
            // A reader may be copying it out right now: that free is refused, try again.
            while let Err(e) = s.free(&id) {
                assert!(matches!(e, memwarden::service::ServiceError::InvalidOperation(_)), "{e}");
                std::thread::yield_now();
            }
        }
        moved += s.defragment(GATED, quick(), None).expect("defragment").allocations_moved;
        passes += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let reads: u64 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
    assert!(moved >= passes, "{passes} passes moved only {moved} allocations: the test proved little");
    assert!(reads > 0);
    s.validate().expect("ledger = pools");
}

#[test]
fn requests_between_batches_make_the_pass_plan_again_and_nothing_is_lost() {
    let (s, gate) = service();
    let live = fragment(&s, GATED);
    gate.hold_copies(true);
    let pass = {
        let s = s.clone();
        std::thread::spawn(move || s.defragment(GATED, quick(), None))
    };
    wait_for("the first copy", || gate.copies_started() > 0);
    // While the first batch is held at its copy, requests on the same device queue up behind
    // the device: an allocation and a free. They land between batches and change the pool.
    let (s2, extra_id) = (s.clone(), live[0].clone());
    let meanwhile = std::thread::spawn(move || {
        let a = s2.allocate(movable(GATED, MIB)).expect("allocate between batches");
        s2.free(&extra_id).expect("free between batches");
        a.id.clone()
    });
    // The copy outlasts the batch's time bound, so the batch ends after it.
    std::thread::sleep(Duration::from_millis(100));
    gate.hold_copies(false);
    let report = pass.join().expect("pass").expect("defragment");
    let added = meanwhile.join().expect("requests");
    assert!(report.error.is_none(), "{report:?}");
    assert_eq!(report.moves_skipped, 0, "{report:?}");
    for (i, id) in live.iter().enumerate().skip(1) {
        assert_eq!(s.read_bytes(id, 0, MIB).expect("read"), pattern(i, MIB as usize), "allocation {i}");
    }
    assert!(s.allocation(&added).is_ok());
    s.validate().expect("ledger = pools");
}

#[test]
fn a_failing_copy_ends_the_pass_with_the_error_and_the_allocation_where_it_was() {
    let (s, gate) = service();
    let live = fragment(&s, GATED);
    gate.fail_next_copy(CopyFault::Error);
    let report = s.defragment(GATED, quick(), None).expect("defragment");
    let error = report.error.clone().expect("the copy's error is reported, not taken for a stale plan");
    assert!(error.contains("bounds check"), "{error}");
    assert!(report.moves_skipped > 0, "{report:?}");
    for (i, id) in live.iter().enumerate() {
        assert_eq!(s.read_bytes(id, 0, MIB).expect("read"), pattern(i, MIB as usize), "allocation {i}");
    }
    s.validate().expect("ledger = pools");
}

#[test]
fn a_copy_that_panics_leaves_no_allocation_waiting_forever() {
    let (s, gate) = service();
    let live = fragment(&s, GATED);
    gate.fail_next_copy(CopyFault::Panic);
    let pass = {
        let s = s.clone();
        std::thread::spawn(move || s.defragment(GATED, quick(), None))
    };
    assert!(pass.join().is_err(), "the pass panicked");
    // Every allocation can still be freed: none stays marked as moving.
    let s2 = s.clone();
    let freed = within(Duration::from_secs(5), move || live.iter().all(|id| s2.free(id).is_ok()));
    assert_eq!(freed, Some(true), "a free waited for a move that will never finish");
}
