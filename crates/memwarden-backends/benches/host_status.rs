//! The host status readers the pressure sampler runs every `pressure.host_interval_ms` (60 ms),
//! over fixture trees copied from real machines. `cargo bench -p memwarden-backends --bench
//! host_status`.
use criterion::{criterion_group, criterion_main, Criterion};
use memwarden_backends::HostStatusReader;
use std::hint::black_box;
use std::path::PathBuf;

fn fixture(name: &str) -> HostStatusReader {
    HostStatusReader::with_root(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/host").join(name))
}

fn readers(c: &mut Criterion) {
    let plain = fixture("no-cgroup");
    c.bench_function("host status read, no cgroup (meminfo)", |b| b.iter(|| black_box(plain.read().expect("read"))));
    let limited = fixture("cgroup-v2-limited");
    c.bench_function("host status read, cgroup v2 limit (meminfo + cgroup)", |b| {
        b.iter(|| black_box(limited.read().expect("read")))
    });
    c.bench_function("host PSI read (pressure/memory)", |b| b.iter(|| black_box(plain.psi())));
}

criterion_group!(benches, readers);
criterion_main!(benches);
