//! Sub-allocator and pool hot paths. `cargo bench -p memwarden-core --bench allocator`.
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use memwarden_core::{Pool, PoolConfig, Tlsf};
use std::hint::black_box;

fn tlsf_pair(c: &mut Criterion) {
    // A block with some live allocations around, so the free lists are not trivially empty.
    let mut t = Tlsf::new(1 << 30);
    let keep: Vec<_> = (0..1000).filter_map(|i| t.allocate(((i % 37) + 1) * 4096, 256)).collect();
    for (i, (_, h)) in keep.iter().enumerate() {
        if i % 3 == 0 {
            t.free(*h).expect("free");
        }
    }
    c.bench_function("tlsf allocate+free 64 KiB", |b| {
        b.iter(|| {
            let (_, h) = t.allocate(black_box(65536), 256).expect("fits");
            t.free(h).expect("free");
        })
    });
    let sizes: Vec<u64> = (0..1024u64).map(|i| ((i * 7919) % 4093 + 1) * 256).collect();
    c.bench_function("tlsf allocate+free mixed sizes", |b| {
        let mut i = 0;
        b.iter(|| {
            let (_, h) = t.allocate(sizes[i & 1023], 256).expect("fits");
            t.free(h).expect("free");
            i += 1;
        })
    });
    c.bench_function("tlsf 64 allocations then 64 frees (whole batch)", |b| {
        b.iter_batched_ref(
            || Vec::with_capacity(64),
            |hs| {
                for k in 0..64 {
                    hs.push(t.allocate(sizes[k * 13 % 1024], 256).expect("fits").1);
                }
                for h in hs.drain(..) {
                    t.free(h).expect("free");
                }
            },
            BatchSize::SmallInput,
        )
    });
}

fn pool_pair(c: &mut Criterion) {
    let mut pool = Pool::new(PoolConfig::default());
    // Two blocks in use so try_allocate has something to walk.
    let mut live = Vec::new();
    for _ in 0..2 {
        let req = pool.block_request(1 << 20, 256);
        let id = pool.add_block(req);
        live.push(pool.allocate_in(id, 60 << 20, 256).expect("fits"));
    }
    c.bench_function("pool allocate+free 1 MiB", |b| {
        b.iter(|| {
            let p = pool.try_allocate(black_box(1 << 20), 256).expect("fits");
            pool.free(&p).expect("free");
        })
    });
}

criterion_group!(benches, tlsf_pair, pool_pair);
criterion_main!(benches);
