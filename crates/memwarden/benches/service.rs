//! The service's allocation path with all its bookkeeping (validation, budget check against a
//! cached status sample, pool, ledger, id generation): `cargo bench -p memwarden --bench service`.
use criterion::{criterion_group, criterion_main, Criterion};
use memwarden::config::Config;
use memwarden::service::{AllocateRequest, Service};
use memwarden_core::MemoryKind;
use std::hint::black_box;

fn request(size_bytes: u64, kind: MemoryKind) -> AllocateRequest {
    AllocateRequest {
        device: "cpu".into(),
        size_bytes,
        kind: Some(kind),
        alignment_bytes: 256,
        purpose: Some("bench".into()),
        owner: None,
        owner_pid: None,
        owner_client: None,
        persistent: false,
        movable: true,
    }
}

fn service_pair(c: &mut Criterion) {
    let service = Service::from_config(&Config::default());
    // Warm the pool so the pair is served from a cached block.
    let warm = service.allocate(request(1 << 20, MemoryKind::Host)).expect("warm");
    service.free(&warm.id).expect("free");
    c.bench_function("service allocate+free 64 KiB host (pool hit)", |b| {
        b.iter(|| {
            let r = service.allocate(black_box(request(65536, MemoryKind::Host))).expect("allocate");
            service.free(&r.id).expect("free");
        })
    });
    // The same pair with recording off (analytics.enabled = false): what counters, peaks, owner
    // activity and the event log cost on the hot path.
    let mut config = Config::default();
    config.analytics.enabled = false;
    let quiet = Service::from_config(&config);
    let warm = quiet.allocate(request(1 << 20, MemoryKind::Host)).expect("warm");
    quiet.free(&warm.id).expect("free");
    c.bench_function("service allocate+free 64 KiB host (pool hit), recording off", |b| {
        b.iter(|| {
            let r = quiet.allocate(black_box(request(65536, MemoryKind::Host))).expect("allocate");
            quiet.free(&r.id).expect("free");
        })
    });
    c.bench_function("service allocate+free reservation", |b| {
        b.iter(|| {
            let r = service.allocate(black_box(request(1 << 30, MemoryKind::Reservation))).expect("reserve");
            service.free(&r.id).expect("free");
        })
    });
}

criterion_group!(benches, service_pair);
criterion_main!(benches);
