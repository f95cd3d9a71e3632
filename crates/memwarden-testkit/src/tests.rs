//! The conformance suite on every backend this machine has: the host, lavapipe's Vulkan
//! (installed by `scripts/test` and CI), the simulated backend (both ways it keeps its bytes)
//! and, with `--features hw-tests` on a GPU machine, every CUDA GPU. (They live here, not in
//! memwarden-backends' own tests: a dev-dependency of the backends on this crate would build
//! the backends twice, with two `Backend` traits.)

use crate::{conformance, Controls, CopyFault, SimulatedBackend, INJECTED};
use memwarden_backends::vulkan::{discover, VulkanOptions};
use memwarden_backends::{Backend, BackendError, HostBackend, HostStatusReader};
use memwarden_core::units::{GIB, MIB};
use memwarden_core::{DeviceId, GpuApi, MemoryKind};
use memwarden_sys::vulkan::HostAccess;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VK: DeviceId = DeviceId::Gpu(GpuApi::Vulkan, 0);

#[test]
fn host_backend_passes_the_conformance_suite() {
    conformance::run(Arc::new(HostBackend::new(HostStatusReader::default())));
}

/// Through the mapping (lavapipe's device memory is host-visible) and through staging (a
/// discrete GPU's path).
#[test]
fn vulkan_backend_passes_the_conformance_suite_on_lavapipe() {
    for host_access in [HostAccess::Auto, HostAccess::Staged] {
        let options = VulkanOptions { enabled: true, include_software: true, host_access, ..Default::default() };
        let (backends, _) = discover(&options, &[]).expect("a Vulkan loader and lavapipe are installed");
        assert!(!backends.is_empty());
        let b = backends.into_iter().next().expect("vulkan:0");
        assert_eq!(b.info().device_id.to_string(), "vulkan:0");
        assert!(!b.info().extra["driver"].is_empty() || b.info().extra["apiVersion"].starts_with("1.1"));
        let status = b.read_status().expect("status");
        assert!(["vk-memory-budget", "vk-heap-size"].contains(&status.source.as_str()), "{status:?}");
        assert!(b.exports_need_descriptor_passing(), "opaque fds travel only over the socket");
        let no_holder = matches!(b.dedicated(), Err(memwarden_backends::DedicatedError::Unsupported { .. }));
        assert!(no_holder, "no Vulkan weights holder");
        conformance::run(Arc::new(b));
    }
}

#[test]
fn simulated_backend_passes_the_conformance_suite_both_ways() {
    conformance::run(Arc::new(SimulatedBackend::new(VK)));
    conformance::run(Arc::new(SimulatedBackend::host_memory(VK)));
}

#[cfg(feature = "hw-tests")]
#[test]
fn cuda_backend_passes_the_conformance_suite() {
    let system = memwarden_backends::CudaSystem::init().expect("a CUDA GPU is required for hw-tests");
    for b in system.backends() {
        conformance::run(Arc::new(b));
    }
}

fn injected(e: &BackendError) -> bool {
    matches!(e, BackendError::Failed { message, .. } if message == INJECTED)
}

#[test]
fn capacity_counts_live_blocks_and_refuses_what_does_not_fit() {
    let b = SimulatedBackend::new(VK).with_capacity(64 * MIB).with_used_elsewhere(16 * MIB);
    let c: Arc<Controls> = b.controls();
    let r = b.read_status().expect("status");
    assert_eq!((r.total_bytes, r.used_bytes, r.available_bytes), (64 * MIB, 16 * MIB, 48 * MIB));
    let block = b.create_block(MemoryKind::Device, 40 * MIB).expect("fits");
    assert_eq!((c.live_bytes(), c.live_blocks()), (40 * MIB, 1));
    assert_eq!(b.read_status().expect("status").available_bytes, 8 * MIB);
    let err = b.create_block(MemoryKind::Device, 9 * MIB).expect_err("full");
    assert!(matches!(err, BackendError::OutOfMemory { available_bytes, .. } if available_bytes == 8 * MIB), "{err:?}");
    drop(block);
    assert_eq!((c.live_bytes(), c.live_blocks()), (0, 0));
    let host = SimulatedBackend::host_memory(VK);
    assert!(host.read_status().expect("the machine's").total_bytes > GIB / 4);
}

#[test]
fn faults_are_injected_on_demand_and_driver_errors_become_the_fault() {
    let b = SimulatedBackend::new(VK);
    let c = b.controls();
    let a = b.create_block(MemoryKind::Device, MIB).expect("block");
    c.fail_create(true);
    assert!(injected(&b.create_block(MemoryKind::Device, MIB).expect_err("fails")));
    assert_eq!(b.fault().as_deref(), Some(INJECTED));
    c.fail_create(false);
    c.fail_writes_after(MIB + 10);
    b.write(a.as_ref(), 0, &[1; MIB as usize]).expect("under the limit");
    assert!(injected(&b.write(a.as_ref(), 0, &[1; 11]).expect_err("past it")));
    assert_eq!(c.written_bytes(), MIB + 11);
    c.fail_writes_after(u64::MAX);
    let oom = BackendError::OutOfMemory { requested_bytes: 1, available_bytes: 2, detail: "x".into() };
    c.fail_everything_with(Some(oom.clone()));
    let mut out = [0; 4];
    assert_eq!(b.read(a.as_ref(), 0, &mut out), Err(oom.clone()));
    assert_eq!(b.create_block(MemoryKind::Device, MIB).err(), Some(oom));
    c.fail_everything_with(None);
    b.read(a.as_ref(), 0, &mut out).expect("reads again");
    assert_eq!(out, [1; 4]);
}

#[test]
fn copies_wait_at_the_gate_take_their_delay_and_fail_once_when_asked() {
    let b = Arc::new(SimulatedBackend::host_memory(VK));
    let c = b.controls();
    let x: Arc<dyn memwarden_backends::BlockMemory> = b.create_block(MemoryKind::Device, MIB).expect("x").into();
    let y: Arc<dyn memwarden_backends::BlockMemory> = b.create_block(MemoryKind::Device, MIB).expect("y").into();
    b.write(x.as_ref(), 0, b"held").expect("write");
    c.hold_copies(true);
    let done = Arc::new(AtomicBool::new(false));
    let copier = {
        let (b, x, y, done) = (b.clone(), x.clone(), y.clone(), done.clone());
        std::thread::spawn(move || {
            b.copy(x.as_ref(), 0, y.as_ref(), 0, 4).expect("copy");
            done.store(true, Ordering::SeqCst);
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.copies_started() == 0 {
        assert!(Instant::now() < deadline, "the copy never reached the gate");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(!done.load(Ordering::SeqCst), "held at the gate");
    c.hold_copies(false);
    copier.join().expect("copier");
    let mut out = [0; 4];
    b.read(y.as_ref(), 0, &mut out).expect("read");
    assert_eq!(&out, b"held");
    c.set_copy_delay(Duration::from_millis(30));
    let t = Instant::now();
    b.copy(x.as_ref(), 0, y.as_ref(), 0, 4).expect("slow copy");
    assert!(t.elapsed() >= Duration::from_millis(30));
    c.set_copy_delay(Duration::ZERO);
    c.fail_next_copy(CopyFault::Error);
    assert!(matches!(b.copy(x.as_ref(), 0, y.as_ref(), 0, 4), Err(BackendError::InvalidArgument(_))));
    b.copy(x.as_ref(), 0, y.as_ref(), 0, 4).expect("only the next one failed");
    c.fail_next_copy(CopyFault::Panic);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.copy(x.as_ref(), 0, y.as_ref(), 0, 4)));
    assert!(panicked.is_err());
    assert_eq!(c.copies_started(), 3, "failed copies never reached the gate");
}
