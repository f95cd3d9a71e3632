//! Making room is the default: loads, resumes, moves and a holder's `use()` of a parked model
//! on a full GPU park the least valuable idle held model, are refused only when what is left
//! is pinned or in use (and then say which models and why), and two of them racing for the
//! same room are both served. On simulated GPUs of 90 MiB whose dedicated memory is host
//! memory (tmpfs files), counted as the driver would count it, under the whole app.

use super::error::AppError;
use super::load::{self, LoadError, Loads};
use super::{residency, App};
use crate::config::Config;
use crate::optimizer::admission::AdmissionError;
use crate::service::{Limits, Service};
use crate::weights::{HolderError, LoadRequest, WeightHolder};
use futures_util::future::BoxFuture;
use memwarden_backends::host::HostDedicated;
use memwarden_backends::{
    Backend, BackendError, BlockMemory, ChunkWriter, DedicatedBlock, DedicatedError, DedicatedMemory, DeviceInfo,
    MemoryReading, PinnedChunk,
};
use memwarden_core::units::MIB;
use memwarden_core::{DeviceId, HandleKind, MemoryKind, PoolConfig};
use memwarden_protocol::api::{LoadBody, LoadedDto, WeightState};
use memwarden_protocol::{UnmapWeights, WeightsGrant};
use memwarden_sys::SharedHandle;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const CAPACITY: u64 = 90 * MIB;
/// Each test model: two of them fit a simulated GPU, three do not.
const MODEL: u64 = 32 * MIB;

fn dir() -> PathBuf {
    crate::test_dirs::scratch_dir("mw-room")
}

/// Dedicated memory of a GPU with [`CAPACITY`] bytes: host memory, counted, refused past the
/// capacity as a driver would.
struct TinyArena {
    device: DeviceId,
    inner: HostDedicated,
    live: Arc<AtomicU64>,
}

struct Counted {
    inner: Box<dyn DedicatedBlock>,
    live: Arc<AtomicU64>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.live.fetch_sub(self.inner.size_bytes(), Ordering::SeqCst);
    }
}

impl DedicatedBlock for Counted {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn export(&self) -> Result<Vec<memwarden_backends::ExportedPiece>, DedicatedError> {
        self.inner.export()
    }
    fn writer(&self, chunk_bytes: u64) -> Result<Box<dyn ChunkWriter + '_>, DedicatedError> {
        self.inner.writer(chunk_bytes)
    }
    fn save(&self, pieces: &[memwarden_backends::ChunkPiece<'_>]) -> Result<(), DedicatedError> {
        self.inner.save(pieces)
    }
    fn restore(&self, pieces: &[memwarden_backends::ChunkPiece<'_>]) -> Result<(), DedicatedError> {
        self.inner.restore(pieces)
    }
    fn switch(
        self: Box<Self>,
        memory: &dyn DedicatedMemory,
        save: &[memwarden_backends::ChunkPiece<'_>],
        in_bytes: u64,
        restore: &[memwarden_backends::ChunkPiece<'_>],
    ) -> Result<memwarden_backends::Switched, memwarden_backends::SwitchFailure> {
        memwarden_backends::serial_switch(self, memory, save, in_bytes, restore)
    }
}

impl DedicatedMemory for TinyArena {
    fn device(&self) -> DeviceId {
        self.device
    }
    fn handle_kind(&self) -> HandleKind {
        self.inner.handle_kind()
    }
    fn can_park(&self) -> bool {
        true
    }
    fn alloc(&self, bytes: u64) -> Result<Box<dyn DedicatedBlock>, DedicatedError> {
        let rounded = bytes.div_ceil(2 * MIB) * (2 * MIB);
        let taken = self.live.fetch_add(rounded, Ordering::SeqCst);
        if taken + rounded > CAPACITY {
            self.live.fetch_sub(rounded, Ordering::SeqCst);
            return Err(DedicatedError::OutOfMemory {
                device: "gpu",
                bytes,
                message: format!("{}: {bytes} bytes do not fit (simulated)", self.device),
            });
        }
        // The bytes stay counted while the block is made (two allocations racing cannot both
        // pass the check), then are corrected to the block's real size.
        let inner = match self.inner.alloc(rounded) {
            Ok(b) => b,
            Err(e) => {
                self.live.fetch_sub(rounded, Ordering::SeqCst);
                return Err(e);
            }
        };
        self.live.fetch_add(inner.size_bytes(), Ordering::SeqCst);
        self.live.fetch_sub(rounded, Ordering::SeqCst);
        Ok(Box::new(Counted { inner, live: self.live.clone() }))
    }
    fn pinned_chunk(&self, bytes: u64) -> Result<PinnedChunk, DedicatedError> {
        self.inner.pinned_chunk(bytes)
    }
}

/// A GPU whose only memory is its dedicated memory ([`TinyArena`]): its status is the
/// capacity less the blocks alive.
struct TinyGpu {
    info: DeviceInfo,
    arena: Arc<TinyArena>,
}

impl TinyGpu {
    fn new(index: u32) -> TinyGpu {
        let device = DeviceId::cuda(index);
        let arena = Arc::new(TinyArena { device, inner: HostDedicated::new(dir()), live: Arc::new(AtomicU64::new(0)) });
        let info = DeviceInfo {
            device_id: device,
            device_type: "GPU",
            name: "tiny".into(),
            memory_type: "VRAM",
            gpu: None,
            extra: Default::default(),
        };
        TinyGpu { info, arena }
    }
}

fn unsupported() -> BackendError {
    BackendError::InvalidArgument("the tiny GPU holds weights only".into())
}

impl Backend for TinyGpu {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn kinds(&self) -> &[MemoryKind] {
        &[MemoryKind::Device]
    }
    fn read_status(&self) -> Result<MemoryReading, BackendError> {
        let used = self.arena.live.load(Ordering::SeqCst).min(CAPACITY);
        Ok(MemoryReading {
            total_bytes: CAPACITY,
            available_bytes: CAPACITY - used,
            used_bytes: used,
            source: "simulated".into(),
            reserved_bytes: None,
            processes: vec![],
        })
    }
    fn dedicated(&self) -> Result<Arc<dyn DedicatedMemory>, DedicatedError> {
        Ok(self.arena.clone())
    }
    fn max_alignment_bytes(&self) -> u64 {
        2 * MIB
    }
    fn create_block(&self, _kind: MemoryKind, _size_bytes: u64) -> Result<Box<dyn BlockMemory>, BackendError> {
        Err(unsupported())
    }
    fn copy(
        &self,
        _src: &dyn BlockMemory,
        _src_offset: u64,
        _dst: &dyn BlockMemory,
        _dst_offset: u64,
        _len_bytes: u64,
    ) -> Result<(), BackendError> {
        Err(unsupported())
    }
    fn write(&self, _block: &dyn BlockMemory, _offset: u64, _data: &[u8]) -> Result<(), BackendError> {
        Err(unsupported())
    }
    fn read(&self, _block: &dyn BlockMemory, _offset: u64, _out: &mut [u8]) -> Result<(), BackendError> {
        Err(unsupported())
    }
}

/// The app over `gpus` tiny GPUs (`cuda:0`…), with no worker, no watchdog and no keep-alive
/// (nothing parks on its own), no hashing, and a short wait for freed bytes to show.
async fn app(gpus: u32) -> Arc<App> {
    let backends: Vec<Arc<dyn Backend>> = (0..gpus).map(|i| Arc::new(TinyGpu::new(i)) as Arc<dyn Backend>).collect();
    let service = Arc::new(Service::with_backends(backends, PoolConfig::default(), Limits::default()));
    let mut config = Config::default();
    config.workers.enabled = false;
    config.workers.socket = "none".into();
    config.optimizer.watchdog = false;
    config.optimizer.verify_ms = 300;
    config.weights.keep_alive_ms = 0;
    config.weights.hash_on_load = false;
    App::start(service, &config).await
}

/// A `.safetensors` file of [`MODEL`] bytes (4 tensors), every byte `seed`.
fn model_file(name: &str, seed: u8) -> PathBuf {
    let each = MODEL / 4;
    let mut header = String::from("{");
    for i in 0..4 {
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
    let path = dir().join(format!("{name}.safetensors"));
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + MODEL as usize, seed);
    std::fs::write(&path, bytes).expect("write model");
    path
}

fn body(path: &std::path::Path, device: DeviceId, priority: u8, pinned: bool) -> LoadBody {
    LoadBody {
        path: path.display().to_string(),
        name: None,
        device_id: Some(device.to_string()),
        priority: Some(priority),
        pinned,
        held_by: None,
        keep_alive_ms: None,
        run_async: false,
    }
}

/// `POST /api/memory/models/load` of a held model, as the HTTP handler calls it.
async fn load_held(app: &App, path: &std::path::Path, device: DeviceId, priority: u8, pinned: bool) -> String {
    match load::load(app, device, true, body(path, device, priority, pinned), None).await {
        Ok(LoadedDto::Held(m)) => m.model_id,
        Ok(_) => panic!("a held load answered a worker's model"),
        Err(e) => panic!("load of {} refused: {e}", path.display()),
    }
}

fn state(app: &App, id: &str) -> WeightState {
    app.weights.get(id).expect("held").state()
}

fn gpu(i: u32) -> DeviceId {
    DeviceId::cuda(i)
}

/// The issue's report, scaled down: idle held models fill the card, and the next load parks
/// the least valuable of them (lowest priority first, then least recently used) instead of
/// being refused with "only 0 could be released".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_needs_room_parks_the_least_valuable_idle_held_model() {
    let app = app(1).await;
    let a = load_held(&app, &model_file("room-a", 1), gpu(0), 50, false).await;
    let b = load_held(&app, &model_file("room-b", 2), gpu(0), 10, false).await;
    let c = load_held(&app, &model_file("room-c", 3), gpu(0), 50, false).await;
    assert_eq!(state(&app, &b), WeightState::Parked, "the lowest priority goes first, though a is older");
    assert_eq!((state(&app, &a), state(&app, &c)), (WeightState::Resident, WeightState::Resident));
    // Among equal priorities, the least recently used: a (loaded before c).
    let d = load_held(&app, &model_file("room-d", 4), gpu(0), 50, false).await;
    assert_eq!(state(&app, &a), WeightState::Parked);
    assert_eq!((state(&app, &c), state(&app, &d)), (WeightState::Resident, WeightState::Resident));
    let room = crate::optimizer::room::room(&app.optimizer, gpu(0), &[]);
    assert_eq!(room.releasable_bytes, 2 * MODEL, "the two resident idle models count as releasable");
    assert!(room.held_back.is_empty(), "{:?}", room.held_back);
}

/// What is left is pinned: the load is refused (INSUFFICIENT_MEMORY) before anything moves,
/// and the message names the pinned models.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_is_refused_when_what_is_left_is_pinned_and_the_message_names_it() {
    let app = app(1).await;
    let a = load_held(&app, &model_file("pin-a", 1), gpu(0), 50, true).await;
    let b = load_held(&app, &model_file("pin-b", 2), gpu(0), 50, true).await;
    let refused = load::load(&app, gpu(0), true, body(&model_file("pin-c", 3), gpu(0), 50, false), None).await;
    let message = match refused {
        Err(AppError::Admission(AdmissionError::InsufficientMemory(m))) => m,
        Err(e) => panic!("expected INSUFFICIENT_MEMORY, got {e}"),
        Ok(_) => panic!("a load that cannot fit was admitted"),
    };
    assert!(message.contains(&format!("{a} (pinned)")) && message.contains(&format!("{b} (pinned)")), "{message}");
    assert!(message.contains("nothing was unloaded"), "{message}");
    assert_eq!((state(&app, &a), state(&app, &b)), (WeightState::Resident, WeightState::Resident));
    assert_eq!(app.weights.models().len(), 2, "the refused model was not loaded");
}

/// A holder that never leaves `use()`.
struct Busy {
    id: String,
    in_use: AtomicBool,
}

impl WeightHolder for Arc<Busy> {
    fn holder_id(&self) -> String {
        self.id.clone()
    }
    fn unmap(&self, _req: UnmapWeights) -> BoxFuture<'static, Result<(), HolderError>> {
        let busy = self.in_use.load(Ordering::SeqCst);
        Box::pin(async move {
            if busy {
                Err(HolderError::InUse("a use() is open".into()))
            } else {
                Ok(())
            }
        })
    }
    fn remap(&self, _grant: WeightsGrant, _fds: Vec<SharedHandle>) -> BoxFuture<'static, Result<(), HolderError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A model whose holder stays in `use()` past the bound is skipped (another is parked in its
/// place); when nothing else is left, the refusal names it with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_in_use_past_the_bound_is_skipped_and_named_when_nothing_else_is_left() {
    let app = app(1).await;
    let holder = Arc::new(Busy { id: "client-1".into(), in_use: AtomicBool::new(true) });
    let loads = Loads { optimizer: &app.optimizer, weights: &app.weights };
    let req = |path: PathBuf| LoadRequest {
        path,
        device: gpu(0),
        name: None,
        priority: 50,
        pinned: false,
        keep_alive_ms: None,
    };
    let busy = loads.held(req(model_file("use-a", 1)), Some(Arc::new(holder.clone())), None, None).await;
    let busy = busy.expect("load a").model.id.clone();
    let idle = load_held(&app, &model_file("use-b", 2), gpu(0), 50, false).await;
    // The busy model is the least recently used: tried first, skipped, and the idle one parked.
    let c = load_held(&app, &model_file("use-c", 3), gpu(0), 50, true).await;
    assert_eq!((state(&app, &busy), state(&app, &idle)), (WeightState::Resident, WeightState::Parked));
    match loads.held(req(model_file("use-d", 4)), None, None, None).await {
        Err(LoadError::Admission(AdmissionError::InsufficientMemory(m))) => {
            assert!(m.contains(&format!("{busy} (in use past 2000 ms)")), "{m}");
            assert!(m.contains(&format!("{c} (pinned)")), "{m}");
        }
        Err(e) => panic!("expected INSUFFICIENT_MEMORY, got {e}"),
        Ok(_) => panic!("admitted with every model left pinned or in use"),
    }
    assert_eq!(state(&app, &busy), WeightState::Resident, "nothing was taken from under the busy holder");
}

/// A move to a full GPU makes room there (it used to park the model and fail the resume).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_that_needs_room_on_the_target_makes_it() {
    let app = app(2).await;
    let m = load_held(&app, &model_file("move-m", 1), gpu(0), 50, false).await;
    let x = load_held(&app, &model_file("move-x", 2), gpu(1), 50, false).await;
    let y = load_held(&app, &model_file("move-y", 3), gpu(1), 50, false).await;
    match residency::move_model(&app, &m, gpu(1)).await {
        Ok(residency::Moved::Held { previous_device, freed_bytes, .. }) => {
            assert_eq!(previous_device, gpu(0));
            assert!(freed_bytes >= MODEL);
        }
        Ok(_) => panic!("a held model moved as a worker's"),
        Err(e) => panic!("move refused: {e}"),
    }
    let moved = app.weights.get(&m).expect("held");
    assert_eq!((moved.device(), moved.state()), (gpu(1), WeightState::Resident));
    assert_eq!(state(&app, &x), WeightState::Parked, "the least recently used on the target made room");
    assert_eq!(state(&app, &y), WeightState::Resident);
}

/// Two loads racing for the same room are both served (one after the other), never both
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_loads_racing_for_the_same_room_are_both_served() {
    let app = app(1).await;
    let a = load_held(&app, &model_file("race-a", 1), gpu(0), 50, false).await;
    let b = load_held(&app, &model_file("race-b", 2), gpu(0), 50, false).await;
    let (pc, pd) = (model_file("race-c", 3), model_file("race-d", 4));
    let try_load = |path: PathBuf| {
        let app = app.clone();
        async move {
            match load::load(&app, gpu(0), true, body(&path, gpu(0), 50, false), None).await {
                Ok(LoadedDto::Held(m)) => Ok(m.model_id),
                Ok(_) => panic!("a held load answered a worker's model"),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    let (c, d) = tokio::join!(try_load(pc.clone()), try_load(pd.clone()));
    // The issue's rule: serialized or both served, never both refused. Both are served nearly
    // always; under a starved CPU (CI) the loser has been seen refused once, after its retry
    // window, while the winner's load ran (docs: issue 25's closing note): then a load again
    // is served.
    let (c, d) = match (c, d) {
        (Ok(c), Ok(d)) => (c, d),
        (Err(c), Err(d)) => panic!("both racing loads were refused: {c} / {d}"),
        (Ok(c), Err(e)) => (c, try_load(pd).await.unwrap_or_else(|again| panic!("{e}; again: {again}"))),
        (Err(e), Ok(d)) => (try_load(pc).await.unwrap_or_else(|again| panic!("{e}; again: {again}")), d),
    };
    assert_eq!((state(&app, &a), state(&app, &b)), (WeightState::Parked, WeightState::Parked));
    assert_eq!((state(&app, &c), state(&app, &d)), (WeightState::Resident, WeightState::Resident));
}

/// Two resumes racing for the same room: both served, each parking an idle model of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_resumes_racing_for_the_same_room_are_both_served() {
    let app = app(1).await;
    let a = load_held(&app, &model_file("rr-a", 1), gpu(0), 50, false).await;
    let b = load_held(&app, &model_file("rr-b", 2), gpu(0), 50, false).await;
    residency::park(&app, &a).await.expect("park a");
    residency::park(&app, &b).await.expect("park b");
    let c = load_held(&app, &model_file("rr-c", 3), gpu(0), 50, false).await;
    let d = load_held(&app, &model_file("rr-d", 4), gpu(0), 50, false).await;
    let (ra, rb) = tokio::join!(residency::resume(&app, &a, None), residency::resume(&app, &b, None));
    if let Some(e) = ra.as_ref().err().or(rb.as_ref().err()) {
        panic!("a racing resume was refused: {e}");
    }
    assert_eq!((state(&app, &a), state(&app, &b)), (WeightState::Resident, WeightState::Resident));
    assert_eq!((state(&app, &c), state(&app, &d)), (WeightState::Parked, WeightState::Parked));
}

/// A holder's `use()` of a parked model (`resumeWeights`) on a full GPU parks an idle model
/// and maps the resumed one again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holders_use_of_a_parked_model_makes_room() {
    let app = app(1).await;
    let holder = Arc::new(Busy { id: "client-2".into(), in_use: AtomicBool::new(false) });
    let loads = Loads { optimizer: &app.optimizer, weights: &app.weights };
    let req = LoadRequest {
        path: model_file("hold-a", 1),
        device: gpu(0),
        name: None,
        priority: 50,
        pinned: false,
        keep_alive_ms: None,
    };
    let a = loads.held(req, Some(Arc::new(holder.clone())), None, None).await.expect("load a").model.id.clone();
    residency::park(&app, &a).await.expect("park a");
    let b = load_held(&app, &model_file("hold-b", 2), gpu(0), 50, false).await;
    let c = load_held(&app, &model_file("hold-c", 3), gpu(0), 50, false).await;
    let outcome =
        residency::resume_for_holder(&app, &a, || -> Arc<dyn WeightHolder> { Arc::new(holder.clone()) }).await;
    assert_eq!(outcome.expect("resumed for the holder").action, "resume");
    assert_eq!(state(&app, &a), WeightState::Resident);
    assert_eq!((state(&app, &b), state(&app, &c)), (WeightState::Parked, WeightState::Resident));
    assert!(app.weights.get(&a).expect("held").with_held(|h| h.holders.contains_key("client-2")));
}

/// A resume that cannot get room (what is left is pinned) is refused at once, names the pinned
/// models, and leaves the model parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_is_refused_when_what_is_left_is_pinned_and_the_message_names_it() {
    let app = app(1).await;
    let a = load_held(&app, &model_file("rp-a", 1), gpu(0), 50, false).await;
    residency::park(&app, &a).await.expect("park a");
    let b = load_held(&app, &model_file("rp-b", 2), gpu(0), 50, true).await;
    let c = load_held(&app, &model_file("rp-c", 3), gpu(0), 50, true).await;
    match residency::resume(&app, &a, None).await {
        Err(AppError::InsufficientMemory(m)) => {
            assert!(m.contains(&format!("{b} (pinned)")) && m.contains(&format!("{c} (pinned)")), "{m}");
            assert!(m.contains("nothing was released"), "{m}");
        }
        Err(e) => panic!("expected INSUFFICIENT_MEMORY, got {e}"),
        Ok(_) => panic!("resumed with no room to make"),
    }
    assert_eq!(state(&app, &a), WeightState::Parked);
    assert_eq!((state(&app, &b), state(&app, &c)), (WeightState::Resident, WeightState::Resident));
}

/// A second load of a file resident on the full device shares the copy: nothing is parked
/// for it, least of all the copy itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_load_of_a_resident_file_on_a_full_device_parks_nothing() {
    let app = app(1).await;
    let path = model_file("share-a", 1);
    let a = load_held(&app, &path, gpu(0), 50, false).await;
    let b = load_held(&app, &model_file("share-b", 2), gpu(0), 50, false).await;
    assert_eq!(load_held(&app, &path, gpu(0), 50, false).await, a, "the same copy");
    assert_eq!((state(&app, &a), state(&app, &b)), (WeightState::Resident, WeightState::Resident));
}

/// A resume on a full GPU where one idle model's memory makes the room is a switch with the
/// least valuable such model: it is parked and the resumed model's bytes are whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_a_full_gpu_switches_with_the_least_valuable_model() {
    let app = app(1).await;
    let a = load_held(&app, &model_file("sw-a", 7), gpu(0), 50, false).await;
    residency::park(&app, &a).await.expect("park a");
    let b = load_held(&app, &model_file("sw-b", 8), gpu(0), 10, false).await;
    let c = load_held(&app, &model_file("sw-c", 9), gpu(0), 50, false).await;
    let acted = residency::resume(&app, &a, None).await.expect("resumed by a switch");
    assert_eq!(acted.switched_with.as_deref(), Some(b.as_str()), "the lowest priority model made the room");
    assert!(acted.outcome.phases.iter().any(|(p, _)| *p == "copyOut"), "{:?}", acted.outcome.phases);
    assert_eq!(
        (state(&app, &a), state(&app, &b), state(&app, &c)),
        (WeightState::Resident, WeightState::Parked, WeightState::Resident)
    );
    let pieces =
        app.weights.get(&a).expect("held").with_held(|h| h.block.as_ref().expect("resident").export().expect("export"));
    let mut bytes = vec![0u8; MODEL as usize];
    use std::os::unix::fs::FileExt;
    std::fs::File::from(pieces.into_iter().next().expect("a piece").handle).read_exact_at(&mut bytes, 0).expect("read");
    assert!(bytes.iter().all(|&x| x == 7), "the resumed model holds its own bytes");
}

/// A diffusers pipeline folder `name` whose `components` are models of [`MODEL`] bytes.
fn pipeline_folder(name: &str, components: &[&str]) -> PathBuf {
    let p = dir().join(name);
    let mut index = serde_json::json!({"_class_name": "LDMPipeline"});
    for (seed, comp) in components.iter().enumerate() {
        std::fs::create_dir_all(p.join(comp)).expect("component dir");
        let file = model_file(&format!("{name}-{comp}"), seed as u8 + 3);
        std::fs::rename(file, p.join(comp).join("diffusion_pytorch_model.safetensors")).expect("move");
        index[*comp] = serde_json::json!(["diffusers", "UNet2DModel"]);
    }
    std::fs::write(p.join("model_index.json"), index.to_string()).expect("model_index.json");
    p
}

/// A pipeline parks and resumes as one (issue 24): every component, in the order of their
/// ids; a resume makes room for the whole group; again is `none`; an unknown group is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_group_parks_and_resumes_as_one_making_room() {
    use residency::GroupAction::{Park, Resume};
    let app = app(1).await;
    let path = pipeline_folder("grp-pipe", &["unet", "vae"]);
    match load::load(&app, gpu(0), true, body(&path, gpu(0), 50, false), None).await {
        Ok(LoadedDto::Pipeline(p)) => assert_eq!(p.components.len(), 2),
        Ok(_) => panic!("a pipeline folder answered one model"),
        Err(e) => panic!("pipeline load refused: {e}"),
    }
    let group = |ids: &[(residency::Acted, f64)]| ids.iter().map(|(a, _)| a.model.id.clone()).collect::<Vec<_>>();
    let parked = residency::for_group(&app, "grp-pipe", Park).await.expect("group park");
    let ids = group(&parked);
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(|id| state(&app, id) == WeightState::Parked));
    assert_eq!(parked.iter().map(|(a, _)| a.outcome.freed_bytes).sum::<u64>(), 2 * MODEL);
    assert!(parked[0].1 <= parked[1].1, "each component's time is from the request's start to its end");
    let again = residency::for_group(&app, "grp-pipe", Park).await.expect("again");
    assert!(again.iter().all(|(a, _)| a.outcome.action == "none"));
    // Two other models fill the card; the group's resume parks them to make its room.
    let x = load_held(&app, &model_file("grp-x", 5), gpu(0), 50, false).await;
    let y = load_held(&app, &model_file("grp-y", 6), gpu(0), 50, false).await;
    let resumed = residency::for_group(&app, "grp-pipe", Resume).await.expect("group resume makes room");
    assert_eq!(group(&resumed), ids, "in the same order");
    assert!(ids.iter().all(|id| state(&app, id) == WeightState::Resident));
    assert_eq!((state(&app, &x), state(&app, &y)), (WeightState::Parked, WeightState::Parked));
    match residency::for_group(&app, "no-such-pipe", Park).await {
        Err(AppError::Weights(crate::weights::WeightsError::GroupNotFound(g))) => assert_eq!(g, "no-such-pipe"),
        other => panic!("an unknown group: {:?}", other.map(|a| a.len())),
    }
}

/// A group larger than its device: the resume does not claim success while making room parked
/// a component it had just resumed; 507 names them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_does_not_fit_at_once_is_refused_naming_what_was_parked() {
    let app = app(1).await;
    let path = pipeline_folder("grp-big", &["a", "b", "c"]);
    load::load(&app, gpu(0), true, body(&path, gpu(0), 50, false), None).await.expect("loads, parking as it goes");
    match residency::for_group(&app, "grp-big", residency::GroupAction::Resume).await {
        Err(AppError::InsufficientMemory(m)) => assert!(m.contains("grp-big") && m.contains("does not fit"), "{m}"),
        other => panic!("three of 32 MiB on 90 MiB: {:?}", other.map(|d| d.len())),
    }
}
