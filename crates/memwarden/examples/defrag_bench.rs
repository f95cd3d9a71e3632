//! Defragmentation throughput: bytes moved per second while moving, against the raw copy rate
//! of the same device measured in the same run.
//!
//!   cargo run --release --example defrag_bench -- [DEVICE] [BLOCK_BYTES] [ALLOCATION_BYTES]
//!
//! Two blocks are filled with equal allocations, every other one is freed (each block half
//! used), and a `quick` pass empties one block into the other: half of all allocations move.
use memwarden::config::Config;
use memwarden::service::{AllocateRequest, Service, TransferRequest, TransferTarget};
use memwarden_core::defrag::{DefragOptions, DefragStrategy};
use std::sync::Arc;
use std::time::Instant;

fn req(device: &str, size_bytes: u64) -> AllocateRequest {
    AllocateRequest {
        device: device.into(),
        size_bytes,
        kind: None,
        alignment_bytes: 256,
        purpose: Some("defrag-bench".into()),
        owner: None,
        owner_pid: None,
        owner_client: None,
        persistent: false,
        movable: true,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device = args.get(1).cloned().unwrap_or_else(|| "cpu".into());
    let block: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1 << 30);
    let size: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(64 << 20);
    let mut config = Config::default();
    config.pool.block_size_bytes = block;
    config.pool.dedicated_threshold_bytes = block;
    config.transfer.sync_max_bytes = u64::MAX;
    let s = Arc::new(Service::from_config(&config));
    let id = s.resolve(&device).expect("device");

    // Raw copy rate of the device through the same copy path, in one call: block-sized halves.
    let a = s.allocate(req(&device, block / 2)).expect("a");
    let b = s.allocate(req(&device, block / 2)).expect("b");
    let copy = || {
        let t = Instant::now();
        s.transfer(TransferRequest {
            source_id: a.id.clone(),
            source_offset: 0,
            target: TransferTarget::Allocation { id: b.id.clone(), offset: 0 },
            size_bytes: None,
            move_source: false,
        })
        .expect("copy");
        t.elapsed().as_secs_f64()
    };
    copy();
    let mut times: Vec<f64> = (0..5).map(|_| copy()).collect();
    times.sort_by(f64::total_cmp);
    let raw = (block / 2) as f64 / times[2];
    s.free(&a.id).expect("free");
    s.free(&b.id).expect("free");
    s.clear(Some(id)).expect("clear");

    // Three rounds: fill two blocks, free every other allocation, defragment; median rate.
    let per_block = block / size;
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let ids: Vec<_> =
            (0..2 * per_block).map(|_| s.allocate(req(&device, size)).expect("fill").id.clone()).collect();
        for i in ids.iter().step_by(2) {
            s.free(i).expect("free every other");
        }
        let opts = DefragOptions { strategy: DefragStrategy::Quick, ..Default::default() };
        let r = s.defragment(id, opts, None).expect("defragment");
        for r in s.allocations(Some(id)) {
            s.free(&r.id).expect("free");
        }
        s.clear(Some(id)).expect("clear");
        rounds.push(r);
    }
    rounds.sort_by(|a, b| {
        let ra = a.bytes_moved as f64 / a.moving.as_secs_f64();
        let rb = b.bytes_moved as f64 / b.moving.as_secs_f64();
        ra.total_cmp(&rb)
    });
    let r = &rounds[1];
    let rate = r.bytes_moved as f64 / r.moving.as_secs_f64();
    println!(
        "defragment {device}: moved {} allocations, {} MiB in {:.2} ms of copying ({:.1} GB/s, median of 3); whole pass {:.2} ms incl. planning and releasing {} block(s) ({} MiB)",
        r.allocations_moved,
        r.bytes_moved >> 20,
        r.moving.as_secs_f64() * 1e3,
        rate / 1e9,
        r.duration.as_secs_f64() * 1e3,
        r.blocks_released,
        r.bytes_released >> 20,
    );
    println!(
        "raw copy of {} MiB on {device} in one call: {:.1} GB/s; defragmentation moves at {:.0}% of it",
        (block / 2) >> 20,
        raw / 1e9,
        100.0 * rate / raw
    );
}
