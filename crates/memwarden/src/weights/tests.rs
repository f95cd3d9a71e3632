//! The store's state machine on cpu and on a simulated GPU (the host's dedicated memory, named
//! `cuda:0` and parkable), with real bytes: every check reads the memory a holder would map.

use super::memory::ParkPool;
use super::*;
use crate::config::WeightsSection;
use futures_util::future::BoxFuture;
use memwarden_backends::host::HostDedicated;
use memwarden_backends::{DedicatedBlock, DedicatedError, PinnedChunk};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};

pub(super) const GPU: DeviceId = DeviceId::Gpu(memwarden_core::GpuApi::Cuda, 0);

pub(super) fn shm_dir() -> PathBuf {
    crate::test_dirs::scratch_dir("mw-weights")
}

/// Host memory that says it is a GPU whose models park: runs the park/resume state machine in CI.
struct SimulatedGpu(HostDedicated);

impl DedicatedMemory for SimulatedGpu {
    fn device(&self) -> DeviceId {
        GPU
    }
    fn handle_kind(&self) -> memwarden_core::HandleKind {
        self.0.handle_kind()
    }
    fn can_park(&self) -> bool {
        true
    }
    fn alloc(&self, bytes: u64) -> Result<Box<dyn DedicatedBlock>, DedicatedError> {
        self.0.alloc(bytes)
    }
    fn pinned_chunk(&self, bytes: u64) -> Result<PinnedChunk, DedicatedError> {
        self.0.pinned_chunk(bytes)
    }
}

pub(super) fn store(config: WeightsSection) -> Arc<WeightStore> {
    store_with(config, PoolLimits { chunk_bytes: 4 << 20, floor_bytes: 0, max_bytes: 1 << 30 })
}

/// A store whose park pool has `limits`.
fn store_with(config: WeightsSection, limits: PoolLimits) -> Arc<WeightStore> {
    let gpu: Arc<dyn DedicatedMemory> = Arc::new(SimulatedGpu(HostDedicated::new(shm_dir())));
    let arenas: Vec<Arc<dyn DedicatedMemory>> = vec![Arc::new(HostDedicated::new(shm_dir())), gpu.clone()];
    WeightStore::new(arenas, ParkPool::new(limits, Some(gpu)), config)
}

/// A model file of `n` tensors of 3 MiB + 1 byte each (chunks straddle tensor ends), bytes from
/// `seed`, and the image its block should hold: each tensor at a multiple of 256 bytes, zeros
/// between (`TENSOR_ALIGN_BYTES`).
pub(super) fn model_file(name: &str, seed: u8) -> (PathBuf, Vec<u8>) {
    let n = 4usize;
    let each = (3 << 20) + 1;
    let mut header = String::from("{");
    for i in 0..n {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            r#""t{i}":{{"dtype":"U8","shape":[{each}],"data_offsets":[{},{}]}}"#,
            i * each,
            (i + 1) * each
        ));
    }
    header.push('}');
    let data: Vec<u8> = (0..n * each).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    let path = shm_dir().join(format!("{name}.safetensors"));
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&data);
    std::fs::write(&path, bytes).expect("write model");
    // In the block each tensor starts at a multiple of 256 (its size is odd), zeros between.
    let mut block = Vec::new();
    for t in data.chunks(each) {
        block.resize(block.len().div_ceil(256) * 256, 0);
        block.extend_from_slice(t);
    }
    (path, block)
}

pub(super) fn req(path: &std::path::Path, device: DeviceId) -> LoadRequest {
    LoadRequest { path: path.into(), device, name: None, priority: 50, pinned: false, keep_alive_ms: None }
}

/// What a holder sees through its descriptor (host memory: one piece).
pub(super) fn mapped_bytes(mut fds: Vec<OwnedFd>, len: usize) -> Vec<u8> {
    assert_eq!(fds.len(), 1, "host memory is one piece");
    let f = std::fs::File::from(fds.remove(0));
    let mut out = vec![0u8; len];
    f.read_exact_at(&mut out, 0).expect("read the mapping");
    out
}

#[derive(Default)]
pub(super) struct FakeHolder {
    id: String,
    pub(super) in_use: std::sync::atomic::AtomicBool,
    /// Its connection closed: every call answers `Gone`.
    gone: std::sync::atomic::AtomicBool,
    pub(super) unmaps: AtomicUsize,
    pub(super) remaps: Mutex<Vec<(WeightsGrant, Vec<u8>)>>,
}

impl WeightHolder for Arc<FakeHolder> {
    fn holder_id(&self) -> String {
        self.id.clone()
    }

    fn unmap(&self, _req: UnmapWeights) -> BoxFuture<'static, Result<(), HolderError>> {
        let me = self.clone();
        Box::pin(async move {
            if me.gone.load(Ordering::SeqCst) {
                return Err(HolderError::Gone("connection closed".into()));
            }
            if me.in_use.load(Ordering::SeqCst) {
                return Err(HolderError::InUse("a use() is open".into()));
            }
            me.unmaps.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    fn remap(&self, grant: WeightsGrant, fd: Vec<OwnedFd>) -> BoxFuture<'static, Result<(), HolderError>> {
        let me = self.clone();
        Box::pin(async move {
            let bytes = mapped_bytes(fd, grant.data_bytes as usize);
            lock(&me.remaps).push((grant, bytes));
            Ok(())
        })
    }
}

pub(super) fn holder(id: &str) -> Arc<FakeHolder> {
    Arc::new(FakeHolder { id: id.into(), ..Default::default() })
}

#[tokio::test]
async fn a_load_puts_the_files_bytes_in_shared_memory_and_a_second_load_shares_them() {
    let s = store(WeightsSection { load_threads: 3, ..Default::default() });
    let (path, data) = model_file("share", 7);
    let a = s.load(req(&path, DeviceId::Cpu), Some(Arc::new(holder("p1")))).await.expect("load");
    assert!(!a.reused);
    let (grant, fd) = a.grant.expect("grant");
    assert_eq!(grant.handle, memwarden_protocol::HandleKind::Shm);
    assert_eq!(grant.tensors.len(), 4);
    assert!(!grant.shared);
    assert_eq!(mapped_bytes(fd, data.len()), data, "the mapping holds the file's data section");
    let b = s.load(req(&path, DeviceId::Cpu), Some(Arc::new(holder("p2")))).await.expect("second load");
    assert!(b.reused, "the same file on the same device is not loaded twice");
    assert_eq!(b.model.id, a.model.id);
    let (g2, fd2) = b.grant.expect("grant");
    assert!(g2.shared);
    assert_eq!(g2.hash, grant.hash);
    assert_eq!(mapped_bytes(fd2, data.len()), data);
    let listed = s.list();
    assert_eq!(listed.len(), 1, "the bytes are counted once");
    assert_eq!(listed[0].holders, vec!["p1".to_string(), "p2".to_string()]);
    assert!(listed[0].resident_bytes >= data.len() as u64);
}

#[tokio::test]
async fn park_and_resume_on_a_gpu_keep_the_id_and_the_bytes_and_remap_every_holder() {
    let s = store(WeightsSection::default());
    let (path, data) = model_file("park", 3);
    let h = holder("w0");
    let a = s.load(req(&path, GPU), Some(Arc::new(h.clone()))).await.expect("load");
    let id = a.model.id.clone();
    let parked = s.park(&id).await.expect("park");
    assert_eq!(parked.action, "park");
    assert!(parked.freed_bytes >= data.len() as u64);
    assert_eq!(h.unmaps.load(Ordering::SeqCst), 1, "the holder unmapped before the memory went");
    let dto = &s.list()[0];
    assert_eq!((dto.state, dto.resident_bytes), (WeightState::Parked, 0));
    assert!(dto.parked_bytes >= data.len() as u64);
    assert!(dto.last_park.is_some());
    assert_eq!(s.park(&id).await.expect("again").action, "none", "parking a parked model changes nothing");
    let resumed = s.resume(&id, None).await.expect("resume");
    assert_eq!(resumed.action, "resume");
    let remaps = lock(&h.remaps);
    assert_eq!(remaps.len(), 1);
    assert_eq!(remaps[0].0.model_id, id, "the id stays across park and resume");
    assert_eq!(remaps[0].1, data, "the resumed memory holds the same bytes");
    let dto = &s.list()[0];
    assert_eq!((dto.state, dto.parked_bytes), (WeightState::Resident, 0));
}

#[tokio::test]
async fn a_holder_inside_use_past_the_bound_stops_the_park_and_nothing_moves() {
    let s = store(WeightsSection::default());
    let (path, data) = model_file("busy", 5);
    let free = holder("a");
    let busy = holder("b");
    busy.in_use.store(true, Ordering::SeqCst);
    let m = s.load(req(&path, GPU), Some(Arc::new(free.clone()))).await.expect("load").model;
    s.load(req(&path, GPU), Some(Arc::new(busy.clone()))).await.expect("share");
    match s.park(&m.id).await {
        Err(WeightsError::InUse(msg)) => assert!(msg.contains("in use"), "{msg}"),
        other => panic!("expected IN_USE, got {:?}", other.map(|o| o.action)),
    }
    assert_eq!(m.state(), WeightState::Resident);
    // The holder that had already unmapped got the same memory back.
    let remaps = lock(&free.remaps);
    assert_eq!(remaps.len(), 1);
    assert_eq!(remaps[0].1, data);
}

#[tokio::test]
async fn cpu_and_pinned_models_are_not_parked() {
    let s = store(WeightsSection::default());
    let (path, _) = model_file("cpu", 1);
    let m = s.load(req(&path, DeviceId::Cpu), None).await.expect("load").model;
    assert!(matches!(s.park(&m.id).await, Err(WeightsError::NotSupported(msg)) if msg.contains("resident or dropped")));
    let (path2, _) = model_file("pinned", 2);
    let p = s.load(LoadRequest { pinned: true, ..req(&path2, GPU) }, None).await.expect("load").model;
    assert!(matches!(s.park(&p.id).await, Err(WeightsError::NotSupported(msg)) if msg.contains("pinned")));
    assert!(matches!(s.park("w-999").await, Err(WeightsError::ModelNotFound(_))));
}

#[tokio::test]
async fn drop_keeps_only_the_file_and_a_resume_reloads_it_unless_it_changed() {
    let s = store(WeightsSection::default());
    let (path, data) = model_file("drop", 9);
    let h = holder("w");
    let m = s.load(req(&path, DeviceId::Cpu), Some(Arc::new(h.clone()))).await.expect("load").model;
    let d = s.drop_copy(&m.id).await.expect("drop");
    assert_eq!(d.action, "drop");
    assert_eq!(m.state(), WeightState::Dropped);
    assert_eq!((s.list()[0].resident_bytes, s.list()[0].parked_bytes), (0, 0));
    s.resume(&m.id, None).await.expect("reload");
    assert_eq!(lock(&h.remaps)[0].1, data, "reloaded from the file");
    // Changed on disk while dropped: detected, and nothing stale is loaded.
    s.drop_copy(&m.id).await.expect("drop again");
    std::thread::sleep(std::time::Duration::from_millis(20));
    model_file("drop", 10);
    assert!(matches!(s.resume(&m.id, None).await, Err(WeightsError::FileChanged(_))));
    assert_eq!(m.state(), WeightState::Dropped);
}

#[tokio::test]
async fn a_truncated_file_allocates_nothing_and_a_missing_one_is_not_found() {
    let s = store(WeightsSection::default());
    let (path, data) = model_file("trunc", 1);
    let len = std::fs::metadata(&path).expect("meta").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(len - data.len() as u64 / 2)
        .expect("cut");
    assert!(matches!(s.load(req(&path, GPU), None).await, Err(WeightsError::InvalidFile(_))));
    assert!(s.models().is_empty());
    assert!(matches!(
        s.load(req(std::path::Path::new("/nonexistent/m.safetensors"), GPU), None).await,
        Err(WeightsError::FileNotFound(_))
    ));
    let vk = DeviceId::Gpu(memwarden_core::GpuApi::Vulkan, 0);
    assert!(matches!(s.load(req(&path, vk), None).await, Err(WeightsError::DeviceUnavailable(_))));
}

#[tokio::test]
async fn a_dead_holders_weights_are_orphaned_then_reattached_without_reading_the_file() {
    let s = store(WeightsSection { orphan_grace_ms: 60_000, ..Default::default() });
    let (path, data) = model_file("orphan", 4);
    let m = s.load(req(&path, GPU), Some(Arc::new(holder("w0")))).await.expect("load").model;
    s.holder_gone("w0");
    assert_eq!(m.state(), WeightState::Orphaned);
    assert!(s.list()[0].orphaned_until.is_some());
    // The restarted worker loads the same file: it gets the same bytes without a second read
    // (`reused`; the load measurement is still the first one's).
    let first_load = s.list()[0].load.clone();
    let again = s.load(req(&path, GPU), Some(Arc::new(holder("w0-restarted")))).await;
    let a = again.expect("re-attach");
    assert!(a.reused);
    assert_eq!(a.model.id, m.id);
    assert_eq!(m.state(), WeightState::Resident);
    assert_eq!(s.list()[0].load, first_load);
    let (_, fd) = a.grant.expect("grant");
    assert_eq!(mapped_bytes(fd, data.len()), data);
}

#[tokio::test]
async fn policy_parks_idle_and_orphaned_models_and_drops_old_parked_copies() {
    let s = store(WeightsSection { keep_alive_ms: 1, orphan_grace_ms: 1, drop_after_ms: 1, ..Default::default() });
    let (path, _) = model_file("policy", 6);
    let idle = s.load(req(&path, GPU), None).await.expect("load").model;
    let (path2, _) = model_file("policy-cpu", 6);
    let cpu = s.load(req(&path2, DeviceId::Cpu), None).await.expect("load").model;
    let (path3, _) = model_file("policy-watched", 6);
    let watched = s.load(req(&path3, GPU), Some(Arc::new(holder("h")))).await.expect("load").model;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    super::policy::KeepAlive::tick(&s).await;
    assert_eq!(idle.state(), WeightState::Parked, "idle past keepAlive on a GPU: parked");
    assert_eq!(cpu.state(), WeightState::Dropped, "idle past keepAlive on cpu: dropped");
    assert_eq!(watched.state(), WeightState::Resident, "a holder that never marks use() is not parked by keep-alive");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    super::policy::KeepAlive::tick(&s).await;
    assert_eq!(idle.state(), WeightState::Dropped, "parked past drop_after_ms: dropped");
    s.touch(&watched.id, "h");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    super::policy::KeepAlive::tick(&s).await;
    assert_eq!(watched.state(), WeightState::Parked, "once its holder marks use(), keep-alive applies");
}

#[tokio::test]
async fn concurrent_park_resume_and_unload_of_one_model_are_serialized() {
    let s = store(WeightsSection::default());
    let (path, data) = model_file("race", 8);
    let h = holder("w");
    let m = s.load(req(&path, GPU), Some(Arc::new(h.clone()))).await.expect("load").model;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let s = s.clone();
        let id = m.id.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                s.park(&id).await.map(|o| o.action)
            } else {
                s.resume(&id, None).await.map(|o| o.action)
            }
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("every operation succeeds in turn");
    }
    s.resume(&m.id, None).await.expect("resume");
    for (_, bytes) in lock(&h.remaps).iter() {
        assert_eq!(bytes, &data, "every remap saw whole, correct bytes");
    }
    let (_, freed) = s.unload(&m.id).await.expect("unload");
    assert!(freed >= data.len() as u64);
    assert!(s.models().is_empty());
    assert!(matches!(s.park(&m.id).await, Err(WeightsError::ModelNotFound(_))));
}

#[tokio::test]
async fn a_holder_that_is_gone_does_not_block_a_park_and_stops_counting() {
    let s = store(WeightsSection::default());
    let (path, _) = model_file("gone", 2);
    let dead = holder("dead");
    let m = s.load(req(&path, GPU), Some(Arc::new(dead.clone()))).await.expect("load").model;
    dead.gone.store(true, Ordering::SeqCst);
    assert_eq!(s.park(&m.id).await.expect("park").action, "park");
    assert!(s.list()[0].holders.is_empty(), "the dead holder no longer counts");
}

#[tokio::test]
async fn a_holder_asking_to_resume_a_resident_model_gets_the_memory_again() {
    let s = store(WeightsSection::default());
    let (path, data) = model_file("ask", 3);
    let h = holder("h");
    let m = s.load(req(&path, GPU), Some(Arc::new(h.clone()))).await.expect("load").model;
    // The holder unmapped on its own (it gave up on a park the daemon then rolled back).
    let o = s.ensure_resident(&m.id, Arc::new(h.clone())).await.expect("resume");
    assert_eq!(o.action, "none");
    let remaps = lock(&h.remaps);
    assert_eq!(remaps.len(), 1, "the asking holder was sent the memory again");
    assert_eq!(remaps[0].1, data);
}

#[tokio::test]
async fn an_orphan_parked_by_the_ladder_is_still_reattached_by_its_restarted_holder() {
    let s = store(WeightsSection::default());
    let (path, data) = model_file("parked-orphan", 4);
    let m = s.load(req(&path, GPU), Some(Arc::new(holder("w0")))).await.expect("load").model;
    s.holder_gone("w0");
    s.park(&m.id).await.expect("the ladder parks the orphan");
    let orphans = s.orphans_of("w0");
    assert_eq!(orphans.len(), 1, "still known as w0's");
    let (grant, fd) = s.attach_holder(&orphans[0], Arc::new(holder("w0"))).await.expect("re-attach");
    assert_eq!(m.state(), WeightState::Resident, "resumed for the re-attach");
    assert_eq!(mapped_bytes(fd, data.len()), data);
    assert_eq!(grant.model_id, m.id);
    assert!(s.orphans_of("w0").is_empty(), "attached again: no longer an orphan");
}

#[tokio::test]
async fn an_operation_waiting_on_a_model_that_was_unloaded_meanwhile_finds_it_gone() {
    let s = store(WeightsSection::default());
    let (path, _) = model_file("race-unload", 5);
    let m = s.load(req(&path, GPU), None).await.expect("load").model;
    let guard = m.op.lock().await; // an operation in progress
    let resume = tokio::spawn({
        let s = s.clone();
        let id = m.id.clone();
        async move { s.resume(&id, None).await }
    });
    tokio::task::yield_now().await;
    lock(&s.models).remove(&m.id); // what unload does under the lock
    drop(guard);
    assert!(matches!(resume.await.expect("task"), Err(WeightsError::ModelNotFound(_))));
}

/// Waits (bounded) until the park pool's figures satisfy `ok`.
async fn pool_until(s: &WeightStore, what: &str, ok: impl Fn(&PoolStats) -> bool) -> PoolStats {
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let st = s.park_pool_stats();
        if ok(&st) && !s.park_pool.busy() {
            return st;
        }
        assert!(Instant::now() < deadline, "park pool never {what}: {st:?}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn the_park_pool_grows_after_a_load_so_a_park_registers_nothing_and_shrinks_after_an_unload() {
    let s = store(WeightsSection::default());
    assert_eq!(s.park_pool_stats().registered_bytes, 0, "nothing held: nothing registered");
    let (path, data) = model_file("pool-grow", 3);
    let size = data.len() as u64;
    let m = s.load(req(&path, GPU), None).await.expect("load").model;
    assert_eq!(m.id, "w-1", "a load's place in the pool's demand takes no model id");
    let st = pool_until(&s, "grew to the model", |p| p.free_bytes >= size).await;
    assert_eq!(st.target_free_bytes, size.div_ceil(4 << 20) * (4 << 20));
    let parked = s.park(&m.id).await.expect("park");
    assert_eq!(s.park_pool_stats().chunks_on_park_path, 0, "the park took chunks registered ahead");
    assert!(parked.phases.iter().any(|(p, _)| *p == "takePinned"));
    // Parked: its chunks are in use; nothing else may be parked, so nothing more is kept free.
    pool_until(&s, "let the free chunks go", |p| p.free_bytes == 0 && p.registered_bytes >= size).await;
    s.resume(&m.id, None).await.expect("resume");
    // Resident again: its own chunks came back free and cover the next park.
    let st = pool_until(&s, "kept the chunks for the next park", |p| p.free_bytes >= size).await;
    assert!(st.registered_bytes <= st.target_free_bytes, "nothing beyond the target stays: {st:?}");
    s.park(&m.id).await.expect("park again");
    s.resume(&m.id, None).await.expect("resume again");
    assert_eq!(s.park_pool_stats().chunks_on_park_path, 0);
    s.unload(&m.id).await.expect("unload");
    pool_until(&s, "shrank after the unload", |p| p.registered_bytes == 0 && p.target_free_bytes == 0).await;
}

#[tokio::test]
async fn the_park_pool_counts_a_load_from_its_start_and_ignores_pinned_and_cpu_models() {
    let s = store(WeightsSection::default());
    let demand = s.load_demand(GPU, false, 9 << 20).expect("a load on a GPU counts");
    assert_eq!(s.park_pool_stats().target_free_bytes, 12 << 20, "9 MiB in whole 4 MiB chunks");
    pool_until(&s, "grew while the load runs", |p| p.free_bytes >= 9 << 20).await;
    drop(demand);
    assert_eq!(s.park_pool_stats().target_free_bytes, 0);
    assert!(s.load_demand(GPU, true, 9 << 20).is_none(), "a pinned model is never parked");
    assert!(s.load_demand(DeviceId::Cpu, false, 9 << 20).is_none(), "cpu does not park");
    pool_until(&s, "shrank", |p| p.registered_bytes == 0).await;
    let (path, _) = model_file("pool-pinned", 1);
    s.load(LoadRequest { pinned: true, ..req(&path, GPU) }, None).await.expect("load");
    let (path2, _) = model_file("pool-cpu", 2);
    s.load(req(&path2, DeviceId::Cpu), None).await.expect("load");
    assert_eq!(s.park_pool_stats().target_free_bytes, 0, "neither may be parked");
}

#[tokio::test]
async fn the_park_pool_stays_within_its_cap_and_a_floor_is_kept_free() {
    let cap = PoolLimits { chunk_bytes: 4 << 20, floor_bytes: 0, max_bytes: 8 << 20 };
    let s = store_with(WeightsSection::default(), cap);
    let (path, data) = model_file("pool-cap", 4);
    let m = s.load(req(&path, GPU), None).await.expect("load").model;
    pool_until(&s, "reached its cap", |p| p.registered_bytes == 8 << 20).await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(s.park_pool_stats().registered_bytes, 8 << 20, "never beyond the cap");
    s.park(&m.id).await.expect("a park beyond the cap still parks");
    let chunks = (data.len() as u64).div_ceil(4 << 20);
    assert_eq!(s.park_pool_stats().chunks_on_park_path, chunks - 2, "the rest was registered on the path");
    drop(s);

    let floor = PoolLimits { chunk_bytes: 4 << 20, floor_bytes: 6 << 20, max_bytes: 0 };
    let s = store_with(WeightsSection::default(), floor);
    let st = pool_until(&s, "registered its floor", |p| p.free_bytes == 8 << 20).await;
    assert_eq!(st.target_free_bytes, 8 << 20, "6 MiB in whole chunks, with nothing held");
}

#[tokio::test]
async fn every_state_change_is_an_event_with_the_resume_estimate() {
    use memwarden_protocol::api::ModelStateEventDto;
    let s = store(WeightsSection::default());
    let mut events = s.subscribe();
    let mut next = move || -> ModelStateEventDto { events.try_recv().expect("an event") };
    let (path, data) = model_file("events", 6);
    let size = data.len() as u64;
    let m = s.load(req(&path, GPU), None).await.expect("load").model;
    let e = next();
    assert_eq!((e.model_id.as_str(), e.state, e.previous_state), (m.id.as_str(), WeightState::Resident, None));
    assert_eq!((e.bytes, e.resume_estimate_ms, e.device_id.as_str(), e.unloaded), (size, 0, "cuda:0", false));
    assert_eq!(e.name, "events");
    s.park(&m.id).await.expect("park");
    let e = next();
    assert_eq!((e.state, e.previous_state), (WeightState::Parked, Some(WeightState::Resident)));
    assert!(e.resume_estimate_ms >= 1, "{e:?}");
    s.resume(&m.id, None).await.expect("resume");
    let e = next();
    assert_eq!(
        (e.state, e.previous_state, e.resume_estimate_ms),
        (WeightState::Resident, Some(WeightState::Parked), 0)
    );
    s.drop_copy(&m.id).await.expect("drop");
    let e = next();
    assert_eq!((e.state, e.previous_state), (WeightState::Dropped, Some(WeightState::Resident)));
    assert!(e.resume_estimate_ms >= 1);
    s.unload(&m.id).await.expect("unload");
    let e = next();
    assert_eq!((e.state, e.previous_state, e.unloaded), (WeightState::Dropped, Some(WeightState::Dropped), true));
    let mut rest = s.subscribe();
    assert!(rest.try_recv().is_err(), "nothing more");
}

#[tokio::test]
async fn the_listing_estimates_a_resume_from_the_models_own_rate_else_the_devices() {
    let s = store(WeightsSection::default());
    let (path, data) = model_file("estimate-a", 1);
    let (path2, data2) = model_file("estimate-b", 2);
    let a = s.load(req(&path, GPU), None).await.expect("load").model;
    let b = s.load(req(&path2, GPU), None).await.expect("load").model;
    let listed = |id: &str| s.list().into_iter().find(|d| d.model_id == id).expect("listed");
    assert_eq!(listed(&a.id).resume_estimate_ms, 0, "resident: no wait");
    // Never resumed, nothing on the device resumed: the default rate.
    s.park(&a.id).await.expect("park");
    let default = (data.len() as f64 / DEFAULT_PARKED_RESUME_BYTES_PER_S * 1e3).ceil().max(1.0) as u64;
    assert_eq!(listed(&a.id).resume_estimate_ms, default);
    s.resume(&a.id, None).await.expect("resume");
    s.park(&a.id).await.expect("park again");
    let own = a.with_held(|h| h.resume.as_ref().expect("measured").bytes_per_s());
    let expect = |bytes: usize, rate: f64| (bytes as f64 / rate * 1e3).ceil().max(1.0) as u64;
    let dto = listed(&a.id);
    assert_eq!((dto.state, dto.resume_estimate_ms), (WeightState::Parked, expect(data.len(), own)));
    // b never resumed: the device's average (a's resume, the only one).
    s.park(&b.id).await.expect("park b");
    assert_eq!(listed(&b.id).resume_estimate_ms, expect(data2.len(), own));
    // Dropped: its own load rate.
    s.drop_copy(&b.id).await.expect("drop b");
    let load = b.with_held(|h| h.load.as_ref().expect("load").bytes_per_s());
    assert_eq!(listed(&b.id).resume_estimate_ms, expect(data2.len(), load));
}

#[tokio::test]
async fn a_store_that_goes_stops_the_pools_growth_and_releases_its_free_chunks() {
    let gpu: Arc<dyn DedicatedMemory> = Arc::new(SimulatedGpu(HostDedicated::new(shm_dir())));
    let limits = PoolLimits { chunk_bytes: 4 << 20, floor_bytes: 64 << 20, max_bytes: 0 };
    let pool = ParkPool::new(limits, Some(gpu.clone()));
    let s = WeightStore::new(vec![gpu], pool.clone(), WeightsSection::default());
    tokio::time::sleep(std::time::Duration::from_millis(5)).await; // growing, maybe done
    drop(s);
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    while pool.registered_bytes() > 0 || pool.busy() {
        assert!(Instant::now() < deadline, "the pool kept {} bytes", pool.registered_bytes());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Nothing grows again once closed.
    pool.adjust_in_background();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(pool.registered_bytes(), 0);
}
