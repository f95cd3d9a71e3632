//! Model weights held by memwarden: a model's tensors live in the daemon's own memory (one
//! block per model on its device) and every process that uses them maps that block through a
//! file descriptor, so a load runs at storage speed, a park or resume at copy-engine speed,
//! several processes share one copy, and the weights outlive a holder that dies.
//!
//! States (docs/API.md): `resident` ⇄ `parked` (GPU only: the bytes wait in pinned host
//! memory, the device memory goes back to the driver) → `dropped` (only the file is kept);
//! `orphaned` is resident with every holder gone, kept for a grace period. Operations on one
//! model are serialized by its `op` lock; holders are asked to unmap before any memory is
//! taken from under them.

pub mod checkpoint;
mod error;
pub mod file;
pub mod holder;
pub mod load;
pub mod memory;
mod ops;
pub mod policy;
mod residency;
mod switch;

use crate::config::WeightsSection;
use crate::sync::lock;
use file::ModelFile;
use memory::{ParkBuffer, ParkPool};
use memwarden_backends::{DedicatedBlock, DedicatedMemory};
use memwarden_core::DeviceId;
use memwarden_protocol::api::{rfc3339, HeldModelDto, ModelStateEventDto, RateDto, WeightFileDto, WeightState};
use memwarden_protocol::{GrantPiece, UnmapWeights, WeightsGrant};
use memwarden_sys::SharedHandle;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

pub use error::WeightsError;
pub use holder::{HolderError, Unmapping, WeightHolder};
pub use memory::{PoolLimits, PoolStats};
pub use ops::Attached;
use residency::{host_memory_bytes, LoadDemand, RateBook, StateSink, STATE_EVENTS_CAPACITY};
pub use residency::{DEFAULT_FILE_RESUME_BYTES_PER_S, DEFAULT_PARKED_RESUME_BYTES_PER_S};
pub use switch::{switch, switch_partners, SwitchOutcome};

/// What a holder maps: the grant and one descriptor per piece of the memory, in order.
pub type Grant = (WeightsGrant, Vec<SharedHandle>);

/// One measured move of a model's bytes.
#[derive(Debug, Clone)]
pub struct Rate {
    pub at: OffsetDateTime,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Rate {
    fn now(bytes: u64, elapsed: Duration) -> Rate {
        Rate { at: OffsetDateTime::now_utc(), bytes, elapsed }
    }

    pub fn gb_per_s(&self) -> f64 {
        self.bytes_per_s() / 1e9
    }

    /// The rate in bytes per second (what the resume estimates divide by).
    pub fn bytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn dto(&self) -> RateDto {
        RateDto {
            at: rfc3339(self.at),
            bytes: self.bytes,
            ms: self.elapsed.as_secs_f64() * 1e3,
            gb_per_s: (self.gb_per_s() * 100.0).round() / 100.0,
        }
    }
}

/// A process that maps a model, and whether it marks its work with `use()` (only then may
/// keep-alive park the model under it).
#[derive(Clone)]
pub struct HolderEntry {
    pub holder: Arc<dyn WeightHolder>,
    pub marks_use: bool,
}

/// What changes as a model moves between states.
pub struct Held {
    pub state: WeightState,
    pub device: DeviceId,
    pub block: Option<Box<dyn DedicatedBlock>>,
    pub parked: Option<ParkBuffer>,
    pub holders: BTreeMap<String, HolderEntry>,
    pub last_used: Instant,
    pub last_used_at: OffsetDateTime,
    pub state_since: Instant,
    pub orphaned_since: Option<Instant>,
    /// The holder whose death orphaned it: a restarted worker of that id re-attaches it.
    pub orphaned_by: Option<String>,
    pub hash: String,
    /// Each file's hash, in shard order (a resume from the file checks each).
    pub file_hashes: Vec<String>,
    pub load: Option<Rate>,
    pub park: Option<Rate>,
    pub resume: Option<Rate>,
    /// The state the last resume started from (`parked`: `resume` is a copy from pinned
    /// memory; `dropped`: a read of the file).
    pub resumed_from: Option<WeightState>,
    /// Where state changes are told (the event stream, the park pool, the rate averages).
    sink: Option<StateSink>,
}

impl Held {
    fn set_state(&mut self, state: WeightState) {
        let previous = self.state;
        if previous != state {
            self.note_rates();
            self.state = state;
            self.state_since = Instant::now();
            if state == WeightState::Resident && matches!(previous, WeightState::Parked | WeightState::Dropped) {
                self.resumed_from = Some(previous);
            }
        }
        if state != WeightState::Orphaned {
            self.orphaned_since = None;
        }
        if previous != state {
            self.announce(Some(previous), false);
        }
    }

    /// The model leaves the store: dropped for good (told as `unloaded`).
    fn set_unloaded(&mut self) {
        let previous = self.state;
        self.state = WeightState::Dropped;
        self.state_since = Instant::now();
        self.orphaned_since = None;
        self.announce(Some(previous), true);
    }

    fn touch(&mut self) {
        self.last_used = Instant::now();
        self.last_used_at = OffsetDateTime::now_utc();
        // A resume sets its rate just before: the averages see it now.
        self.note_rates();
    }
}

pub struct HeldModel {
    pub id: String,
    pub name: String,
    pub file: ModelFile,
    pub priority: u8,
    pub pinned: bool,
    pub keep_alive_ms: Option<u64>,
    pub loaded_at: OffsetDateTime,
    /// Serializes park, resume, drop and unload of this model.
    op: tokio::sync::Mutex<()>,
    held: Mutex<Held>,
}

impl HeldModel {
    pub fn state(&self) -> WeightState {
        lock(&self.held).state
    }

    pub fn device(&self) -> DeviceId {
        lock(&self.held).device
    }

    pub fn with_held<R>(&self, f: impl FnOnce(&Held) -> R) -> R {
        f(&lock(&self.held))
    }

    /// A new model is held: told as a state change from nothing.
    fn announce_loaded(&self) {
        lock(&self.held).announce(None, false);
    }

    fn dto(&self, orphan_grace: Duration) -> HeldModelDto {
        let h = lock(&self.held);
        h.note_rates();
        HeldModelDto {
            model_id: self.id.clone(),
            name: self.name.clone(),
            path: self.file.path.display().to_string(),
            files: self
                .file
                .shards
                .iter()
                .map(|s| WeightFileDto { path: s.identity.path.display().to_string(), bytes: s.identity.size_bytes })
                .collect(),
            component: self.file.component.clone(),
            group: self.file.group.clone(),
            device_id: h.device.to_string(),
            state: h.state,
            size_bytes: self.file.data_bytes,
            resident_bytes: h.block.as_ref().map(|b| b.size_bytes()).unwrap_or(0),
            parked_bytes: h.parked.as_ref().map(|p| p.bytes()).unwrap_or(0),
            tensor_count: self.file.tensors.len() as u64,
            hash: h.hash.clone(),
            holders: h.holders.keys().cloned().collect(),
            priority: self.priority,
            pinned: self.pinned,
            keep_alive_ms: self.keep_alive_ms,
            loaded_at: rfc3339(self.loaded_at),
            last_used: rfc3339(h.last_used_at),
            load: h.load.as_ref().map(Rate::dto),
            last_park: h.park.as_ref().map(Rate::dto),
            last_resume: h.resume.as_ref().map(Rate::dto),
            resume_estimate_ms: h.resume_estimate_ms(self.file.data_bytes),
            orphaned_until: h.orphaned_since.map(|since| {
                let left = orphan_grace.saturating_sub(since.elapsed());
                rfc3339(OffsetDateTime::now_utc() + left)
            }),
        }
    }

    /// The grant a holder maps, with new descriptors of the resident block (one per piece).
    fn grant(&self, handle: memwarden_protocol::HandleKind) -> Result<Grant, WeightsError> {
        let h = lock(&self.held);
        let Some(block) = h.block.as_ref() else {
            return Err(WeightsError::Internal(format!("model {} has no resident memory", self.id)));
        };
        let exported = block.export()?;
        let pieces = if exported.len() > 1 {
            exported.iter().map(|p| GrantPiece { offset: p.offset, bytes: p.size_bytes }).collect()
        } else {
            Vec::new()
        };
        let fds = exported.into_iter().map(|p| p.handle).collect();
        let grant = WeightsGrant {
            model_id: self.id.clone(),
            name: self.name.clone(),
            device_id: h.device.to_string(),
            handle,
            allocation_bytes: block.size_bytes(),
            data_bytes: self.file.data_bytes,
            tensors: self.file.tensors.clone(),
            hash: h.hash.clone(),
            shared: !h.holders.is_empty(),
            access: "readwrite".into(),
            pieces,
        };
        Ok((grant, fds))
    }
}

/// What a load asks for.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    pub path: PathBuf,
    pub device: DeviceId,
    pub name: Option<String>,
    pub priority: u8,
    pub pinned: bool,
    pub keep_alive_ms: Option<u64>,
}

/// The outcome of park, resume and drop.
#[derive(Debug, Clone)]
pub struct ActionOutcome {
    pub action: &'static str,
    pub freed_bytes: u64,
    pub rate: Option<Rate>,
    /// Where the time went, in order (milliseconds).
    pub phases: Vec<(&'static str, f64)>,
}

impl ActionOutcome {
    /// The model was already in the asked state.
    pub fn none() -> ActionOutcome {
        ActionOutcome { action: "none", freed_bytes: 0, rate: None, phases: Vec::new() }
    }
}

/// Every held model, the devices' dedicated memory they live in, and the pinned chunks parked
/// ones wait in.
pub struct WeightStore {
    arenas: BTreeMap<DeviceId, Arc<dyn DedicatedMemory>>,
    park_pool: Arc<ParkPool>,
    models: Mutex<BTreeMap<String, Arc<HeldModel>>>,
    /// One load decides "share or load" at a time, so two loads of one file make one copy.
    loading: tokio::sync::Mutex<()>,
    config: WeightsSection,
    next_id: AtomicU64,
    /// Names the loads in progress in the park pool's demand.
    next_load: AtomicU64,
    /// Every state change of a held model (`modelState` on the event stream).
    events: tokio::sync::broadcast::Sender<ModelStateEventDto>,
    rates: Arc<RateBook>,
}

impl Drop for WeightStore {
    fn drop(&mut self) {
        // The background stops growing; parked chunks go with their models.
        self.park_pool.close();
    }
}

impl WeightStore {
    pub fn new(
        arenas: Vec<Arc<dyn DedicatedMemory>>,
        park_pool: Arc<ParkPool>,
        config: WeightsSection,
    ) -> Arc<WeightStore> {
        // A floor is registered from the start.
        park_pool.adjust_in_background();
        Arc::new(WeightStore {
            arenas: arenas.into_iter().map(|a| (a.device(), a)).collect(),
            park_pool,
            models: Mutex::new(BTreeMap::new()),
            loading: tokio::sync::Mutex::new(()),
            config,
            next_id: AtomicU64::new(1),
            next_load: AtomicU64::new(1),
            events: tokio::sync::broadcast::channel(STATE_EVENTS_CAPACITY).0,
            rates: Arc::new(RateBook::default()),
        })
    }

    /// The store for this daemon: weights on every device whose backend offers dedicated memory
    /// (cpu: tmpfs files in `host.shared_memory_dir`, when set; a CUDA GPU: VMM allocations),
    /// park chunks from the first device that parks.
    pub fn for_service(service: &crate::service::Service, config: &crate::config::Config) -> Arc<WeightStore> {
        let mut arenas: Vec<Arc<dyn DedicatedMemory>> = Vec::new();
        for device in service.device_ids() {
            match service.backend(device).map(|b| b.dedicated()) {
                Some(Ok(memory)) => arenas.push(memory),
                Some(Err(e)) => tracing::debug!(device = %device, "no weights held here: {e}"),
                None => {}
            }
        }
        let source = arenas.iter().find(|a| a.can_park()).cloned();
        let limits = PoolLimits::new(
            config.weights.park_pool_bytes,
            config.weights.park_pool_max_percent,
            host_memory_bytes(&config.host),
        );
        let pool = ParkPool::new(limits, source);
        WeightStore::new(arenas, pool, config.weights.clone())
    }

    /// Every state change of a held model from now on (a load, park, resume, drop, orphaning
    /// or unload), as it happens.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<ModelStateEventDto> {
        self.events.subscribe()
    }

    /// The park pool's figures now.
    pub fn park_pool_stats(&self) -> PoolStats {
        self.park_pool.stats()
    }

    /// Where a new model's state changes go.
    fn sink(&self, id: &str, name: &str, size_bytes: u64, pinned: bool, parkable: bool) -> StateSink {
        StateSink {
            model_id: id.to_string(),
            name: name.to_string(),
            size_bytes,
            pinned,
            parkable,
            events: self.events.clone(),
            pool: self.park_pool.clone(),
            rates: self.rates.clone(),
        }
    }

    /// Counts a load of `bytes` starting on `device` in the park pool's demand until the
    /// returned guard goes (the loaded model then counts on its own).
    fn load_demand(&self, device: DeviceId, pinned: bool, bytes: u64) -> Option<LoadDemand> {
        let parks = self.arenas.get(&device).is_some_and(|a| a.can_park());
        if !parks || pinned || !self.park_pool.has_source() {
            return None;
        }
        // A counter of its own: model ids stay w-1, w-2, … whatever loads ran.
        let key = format!("load-{}", self.next_load.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        self.park_pool.set_demand(&key, Some(bytes));
        Some(LoadDemand { pool: self.park_pool.clone(), key })
    }

    pub fn config(&self) -> &WeightsSection {
        &self.config
    }

    pub fn devices(&self) -> Vec<DeviceId> {
        self.arenas.keys().copied().collect()
    }

    pub fn holds_device(&self, device: DeviceId) -> bool {
        self.arenas.contains_key(&device)
    }

    fn arena(&self, device: DeviceId) -> Result<Arc<dyn DedicatedMemory>, WeightsError> {
        self.arenas.get(&device).cloned().ok_or_else(|| {
            WeightsError::DeviceUnavailable(format!(
                "memwarden cannot hold weights on {device} (it holds them on: {})",
                self.devices().iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// `DeviceUnavailable` where memwarden cannot hold weights on `device` (checked before a
    /// load reads anything).
    pub fn check_device(&self, device: DeviceId) -> Result<(), WeightsError> {
        self.arena(device).map(|_| ())
    }

    pub fn get(&self, id: &str) -> Result<Arc<HeldModel>, WeightsError> {
        lock(&self.models).get(id).cloned().ok_or_else(|| WeightsError::ModelNotFound(id.to_string()))
    }

    pub fn contains(&self, id: &str) -> bool {
        lock(&self.models).contains_key(id)
    }

    pub fn models(&self) -> Vec<Arc<HeldModel>> {
        lock(&self.models).values().cloned().collect()
    }

    pub fn list(&self) -> Vec<HeldModelDto> {
        let grace = Duration::from_millis(self.config.orphan_grace_ms);
        self.models().iter().map(|m| m.dto(grace)).collect()
    }

    pub fn dto(&self, m: &HeldModel) -> HeldModelDto {
        m.dto(Duration::from_millis(self.config.orphan_grace_ms))
    }

    /// A holder's `use()` ended: the model counts as used now.
    pub fn touch(&self, id: &str, holder_id: &str) {
        if let Ok(m) = self.get(id) {
            let mut h = lock(&m.held);
            h.touch();
            if let Some(e) = h.holders.get_mut(holder_id) {
                e.marks_use = true;
            }
        }
    }

    /// A holder no longer maps `id` (its weights stay in memwarden).
    pub fn release(&self, id: &str, holder_id: &str) -> Result<Arc<HeldModel>, WeightsError> {
        let m = self.get(id)?;
        let removed = lock(&m.held).holders.remove(holder_id);
        if removed.is_none() {
            return Err(WeightsError::NotSupported(format!("{holder_id} does not hold model {id}")));
        }
        Ok(m)
    }

    /// Models whose last holder had this id and that nobody holds since (a worker restarted
    /// under the same id), whatever their state: a parked one is resumed when re-attached.
    pub fn orphans_of(&self, holder_id: &str) -> Vec<Arc<HeldModel>> {
        self.models()
            .into_iter()
            .filter(|m| m.with_held(|h| h.holders.is_empty() && h.orphaned_by.as_deref() == Some(holder_id)))
            .collect()
    }

    /// A holder's connection closed: its models that nobody else maps become orphans.
    pub fn holder_gone(&self, holder_id: &str) {
        for m in self.models() {
            let mut h = lock(&m.held);
            if h.holders.remove(holder_id).is_none() || !h.holders.is_empty() {
                continue;
            }
            // Kept in every state until someone attaches: a parked orphan is re-attached too.
            h.orphaned_by = Some(holder_id.to_string());
            if h.state == WeightState::Resident {
                h.set_state(WeightState::Orphaned);
                h.orphaned_since = Some(Instant::now());
                tracing::info!(model = %m.id, holder = holder_id, "weights orphaned: their last holder is gone");
            }
        }
    }

    fn unmap_request(&self, id: &str, r#final: bool) -> UnmapWeights {
        UnmapWeights { model_id: id.to_string(), timeout_ms: self.config.use_bound_ms, r#final, confirm_early: false }
    }

    /// Resident models on `device` the optimizer may park (on `cpu`: drop), least valuable
    /// first (priority, then least recently used).
    pub fn park_candidates(&self, device: memwarden_core::DeviceId) -> Vec<Arc<HeldModel>> {
        let mut out: Vec<Arc<HeldModel>> = self
            .models()
            .into_iter()
            .filter(|m| !m.pinned && m.device() == device)
            .filter(|m| matches!(m.state(), WeightState::Resident | WeightState::Orphaned))
            .collect();
        out.sort_by_key(|m| (m.priority, m.with_held(|h| h.last_used)));
        out
    }

    /// Host memory the held weights take: models resident on `cpu` and every parked copy.
    pub fn host_bytes(&self) -> u64 {
        self.models()
            .iter()
            .map(|m| {
                m.with_held(|h| {
                    let resident = if h.device.is_gpu() { 0 } else { h.block.as_ref().map_or(0, |b| b.size_bytes()) };
                    resident + h.parked.as_ref().map_or(0, |p| p.bytes())
                })
            })
            .sum()
    }

    /// Parked copies the optimizer may drop under host pressure, least valuable first.
    pub fn drop_candidates(&self) -> Vec<Arc<HeldModel>> {
        let mut out: Vec<Arc<HeldModel>> =
            self.models().into_iter().filter(|m| !m.pinned && m.state() == WeightState::Parked).collect();
        out.sort_by_key(|m| (m.priority, m.with_held(|h| h.last_used)));
        out
    }
}

/// A model's resident memory taken out by a park: back into the model when dropped (a failed
/// or abandoned park leaves the model resident, as it was), unless [`BlockBack::take`]n to be
/// freed.
pub(super) struct BlockBack {
    pub(super) model: Arc<HeldModel>,
    pub(super) block: Option<Box<dyn memwarden_backends::DedicatedBlock>>,
}

impl BlockBack {
    /// Copies the memory out into `buf`'s pieces.
    pub(super) fn save(&self, pieces: &[memwarden_backends::ChunkPiece<'_>]) -> Result<(), WeightsError> {
        let block = self.block.as_deref().ok_or_else(|| WeightsError::Internal("the memory was taken".into()))?;
        Ok(block.save(pieces)?)
    }

    pub(super) fn take(&mut self) -> Result<Box<dyn memwarden_backends::DedicatedBlock>, WeightsError> {
        self.block.take().ok_or_else(|| WeightsError::Internal("the memory was taken".into()))
    }
}

impl Drop for BlockBack {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            lock(&self.model.held).block = Some(b);
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_checkpoint;
#[cfg(test)]
mod tests_switch;
#[cfg(test)]
mod tests_unmap;
