//! The store's operations: load (or share), park, resume, drop and unload. Each takes the
//! model's `op` lock, so two operations on one model never interleave; copies and file reads
//! run on blocking threads.

use super::file::ModelFile;
use super::holder::Unmaps;
use super::load;
use super::BlockBack;
use super::{
    ActionOutcome, Grant, Held, HeldModel, HolderEntry, HolderError, LoadRequest, Rate, WeightHolder, WeightStore,
    WeightsError,
};
use crate::operations::Progress;
use crate::sync::lock;
use memwarden_core::DeviceId;
use memwarden_protocol::api::WeightState;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use time::OffsetDateTime;

/// A model's name when the load gives none: a component's `group/component`; a file's stem; a
/// folder's (or an index's folder's) name.
fn default_name(file: &ModelFile) -> Option<String> {
    if let (Some(g), Some(c)) = (&file.group, &file.component) {
        return Some(format!("{g}/{c}"));
    }
    let p = &file.path;
    let named = if p.is_dir() {
        p.file_name()
    } else if p.to_string_lossy().ends_with(".index.json") {
        p.parent().and_then(|d| d.file_name())
    } else {
        p.file_stem()
    };
    named.map(|s| s.to_string_lossy().into_owned())
}

/// After a resume read the files again: each file's hash is the one it had when loaded
/// (`expected`, empty when loads are not hashed), else FILE_CHANGED naming the file.
fn check_hashes(file: &ModelFile, expected: &[String], got: &[String]) -> Result<(), WeightsError> {
    for ((shard, was), now) in file.shards.iter().zip(expected).zip(got) {
        if was != now {
            return Err(WeightsError::FileChanged(format!(
                "{} changed in place since it was loaded (hash {was} → {now}); nothing stale was loaded",
                shard.identity.path.display()
            )));
        }
    }
    Ok(())
}

pub(super) fn ms(t: Instant) -> f64 {
    ms_of(t.elapsed())
}

pub(super) fn ms_of(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WeightsError> + Send + 'static,
) -> Result<T, WeightsError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| WeightsError::Internal(format!("worker thread: {e}")))?
}

/// A grant for one holder, and the model it maps.
pub struct Attached {
    pub model: Arc<HeldModel>,
    pub grant: Option<Grant>,
    /// The bytes were already in memwarden (shared or re-attached): the file was not read.
    pub reused: bool,
}

impl WeightStore {
    /// Loads a file's tensors into memwarden memory on `req.device`, or, when the same file
    /// (path, size, mtime) is already held there, attaches to that copy (resuming it first if it
    /// was parked or dropped). With a holder, returns the grant it maps.
    pub async fn load(
        self: &Arc<Self>,
        req: LoadRequest,
        holder: Option<Arc<dyn WeightHolder>>,
    ) -> Result<Attached, WeightsError> {
        self.load_with_progress(req, holder, None).await
    }

    /// [`WeightStore::load`], reporting to `progress` the file's tensor bytes as its total once
    /// the header is read, then the bytes read as they come. Sharing the copy already held reads
    /// nothing: the total is then 0.
    pub async fn load_with_progress(
        self: &Arc<Self>,
        req: LoadRequest,
        holder: Option<Arc<dyn WeightHolder>>,
        progress: Option<Arc<Progress>>,
    ) -> Result<Attached, WeightsError> {
        self.check_device(req.device)?;
        let path = req.path.clone();
        let file = blocking(move || ModelFile::open(&path)).await?;
        self.load_file(file, req, holder, progress).await
    }

    /// [`WeightStore::load_with_progress`] of a file whose header the caller has read
    /// ([`ModelFile::open`]): the header is not read again.
    pub async fn load_file(
        self: &Arc<Self>,
        file: ModelFile,
        req: LoadRequest,
        holder: Option<Arc<dyn WeightHolder>>,
        progress: Option<Arc<Progress>>,
    ) -> Result<Attached, WeightsError> {
        let arena = self.arena(req.device)?;
        if let Some(p) = &progress {
            p.set_total(file.file_bytes());
        }
        let _loading = self.loading.lock().await;
        let identity = file.identity();
        let existing = self.models().into_iter().find(|m| m.file.identity() == identity && m.device() == req.device);
        if let Some(model) = existing {
            let _op = model.op.lock().await;
            self.still_held(&model)?;
            if matches!(model.state(), WeightState::Parked | WeightState::Dropped) {
                self.resume_locked(&model, None).await?;
            }
            let grant = self.attach(&model, holder, arena.handle_kind())?;
            if let Some(p) = &progress {
                // Nothing was read: the bytes were already here.
                p.set_total(0);
            }
            tracing::info!(model = %model.id, "weights shared: the same file is already held on {}", req.device);
            return Ok(Attached { model: model.clone(), grant, reused: true });
        }
        let _demand = self.load_demand(req.device, req.pinned, file.data_bytes);
        let threads = load::thread_count(self.config.load_threads, file.data_bytes);
        let hash_on_load = self.config.hash_on_load;
        let f = file.clone();
        let a = arena.clone();
        let (block, loaded) = blocking(move || {
            let block = a.alloc(f.data_bytes)?;
            let loaded = load::fill_counting(&*block, &f, threads, hash_on_load, progress.as_deref())?;
            Ok((block, loaded))
        })
        .await?;
        let id = format!("w-{}", self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let name = req.name.clone().unwrap_or_else(|| default_name(&file).unwrap_or_else(|| id.clone()));
        tracing::info!(
            model = %id, bytes = file.data_bytes, ms = loaded.elapsed.as_secs_f64() * 1e3, threads,
            "weights loaded into memwarden memory on {}", req.device
        );
        let sink = self.sink(&id, &name, file.data_bytes, req.pinned, arena.can_park());
        let model = Arc::new(HeldModel {
            id: id.clone(),
            name,
            priority: req.priority,
            pinned: req.pinned,
            keep_alive_ms: req.keep_alive_ms.or(Some(self.config.keep_alive_ms)).filter(|&ms| ms > 0),
            loaded_at: OffsetDateTime::now_utc(),
            op: tokio::sync::Mutex::new(()),
            held: Mutex::new(Held {
                state: WeightState::Resident,
                device: req.device,
                block: Some(block),
                parked: None,
                holders: BTreeMap::new(),
                last_used: Instant::now(),
                last_used_at: OffsetDateTime::now_utc(),
                state_since: Instant::now(),
                orphaned_since: None,
                orphaned_by: None,
                hash: loaded.hash,
                file_hashes: loaded.file_hashes,
                load: Some(Rate::now(file.data_bytes, loaded.elapsed)),
                park: None,
                resume: None,
                resumed_from: None,
                sink: Some(sink),
            }),
            file,
        });
        let grant = self.attach(&model, holder, arena.handle_kind())?;
        lock(&self.models).insert(id, model.clone());
        model.announce_loaded();
        Ok(Attached { model, grant, reused: false })
    }

    /// Adds a holder to a held model (resuming it first when parked or dropped); returns the
    /// grant it maps.
    pub async fn attach_holder(
        self: &Arc<Self>,
        model: &Arc<HeldModel>,
        holder: Arc<dyn WeightHolder>,
    ) -> Result<Grant, WeightsError> {
        let _op = model.op.lock().await;
        self.still_held(model)?;
        if matches!(model.state(), WeightState::Parked | WeightState::Dropped) {
            self.resume_locked(model, None).await?;
        }
        let handle = self.arena(model.device())?.handle_kind();
        self.attach(model, Some(holder), handle)?.ok_or_else(|| WeightsError::Internal("no grant".into()))
    }

    /// Removes a holder that could not map the model (it never held it).
    pub fn detach(&self, model: &HeldModel, holder_id: &str) {
        lock(&model.held).holders.remove(holder_id);
    }

    fn attach(
        &self,
        model: &HeldModel,
        holder: Option<Arc<dyn WeightHolder>>,
        handle: memwarden_protocol::HandleKind,
    ) -> Result<Option<Grant>, WeightsError> {
        let Some(holder) = holder else { return Ok(None) };
        let grant = model.grant(handle)?;
        let mut h = lock(&model.held);
        // A holder whose connection closed while the load ran would never answer an unmap.
        if holder.alive() {
            h.holders.insert(holder.holder_id(), HolderEntry { holder, marks_use: false });
            h.orphaned_by = None;
        }
        h.set_state(WeightState::Resident);
        h.touch();
        Ok(Some(grant))
    }

    /// Asks every holder to unmap, all at once (the wait is the longest open `use()`, not their
    /// sum), and waits until each has; on a refusal, maps the ones that already did back again.
    pub(super) async fn unmap_holders(&self, model: &HeldModel, r#final: bool) -> Result<(), WeightsError> {
        let unmapping = self.quiesce_holders(model, r#final).await?;
        self.await_unmaps(model, unmapping).await
    }

    /// Asks every holder to unmap, all at once, and waits until each has no `use()` open and
    /// lets none start: the memory's content is final from then on (a park copies it out while
    /// the holders unmap; [`Self::await_unmaps`] waits for them). On a refusal, waits for the
    /// others' unmaps and maps them back.
    pub(super) async fn quiesce_holders(&self, model: &HeldModel, r#final: bool) -> Result<Unmaps, WeightsError> {
        let holders: Vec<HolderEntry> = lock(&model.held).holders.values().cloned().collect();
        let (quiet, done): (Vec<_>, Vec<_>) = holders
            .iter()
            .map(|e| e.holder.unmap_early(self.unmap_request(&model.id, r#final)))
            .map(|u| (u.quiesced, u.done))
            .unzip();
        let answers = futures_util::future::join_all(quiet).await;
        let (mut pending, mut refused) = (Vec::new(), None);
        for ((entry, answer), done) in holders.iter().zip(answers).zip(done) {
            match answer {
                Ok(()) => pending.push((entry.holder.clone(), done)),
                Err(e) => refused = refused.or(self.unless_gone(model, &entry.holder, e)),
            }
        }
        let Some(e) = refused else { return Ok(pending) };
        self.map_back(model, pending).await;
        Err(self.refusal(model, e))
    }

    /// Waits for the unmaps under way and maps the memory back to the holders whose unmap went
    /// through (the model keeps its memory: a refused park, a failed copy).
    async fn map_back(&self, model: &HeldModel, unmapping: Unmaps) {
        let (unmapped, _) = self.settle(model, unmapping).await;
        self.remap_holders(model, unmapped).await;
    }

    /// Waits for the holders' unmaps; when one fails, maps back the ones that did.
    pub(super) async fn await_unmaps(&self, model: &HeldModel, unmapping: Unmaps) -> Result<(), WeightsError> {
        let (unmapped, refused) = self.settle(model, unmapping).await;
        let Some(e) = refused else { return Ok(()) };
        self.remap_holders(model, unmapped).await;
        Err(self.refusal(model, e))
    }

    /// The holders whose unmaps succeeded, and the first refusal (a holder that is gone no
    /// longer counts).
    async fn settle(&self, model: &HeldModel, unmapping: Unmaps) -> (Vec<Arc<dyn WeightHolder>>, Option<HolderError>) {
        let (holders, dones): (Vec<_>, Vec<_>) = unmapping.into_iter().unzip();
        let answers = futures_util::future::join_all(dones).await;
        let (mut unmapped, mut refused) = (Vec::new(), None);
        for (holder, answer) in holders.into_iter().zip(answers) {
            match answer {
                Ok(()) => unmapped.push(holder),
                Err(e) => refused = refused.or(self.unless_gone(model, &holder, e)),
            }
        }
        (unmapped, refused)
    }

    /// `e`, unless it says the holder is gone: then it no longer counts.
    fn unless_gone(&self, model: &HeldModel, holder: &Arc<dyn WeightHolder>, e: HolderError) -> Option<HolderError> {
        let HolderError::Gone(why) = e else { return Some(e) };
        tracing::info!(model = %model.id, "a holder is gone and no longer counts: {why}");
        lock(&model.held).holders.remove(&holder.holder_id());
        None
    }

    fn refusal(&self, model: &HeldModel, e: HolderError) -> WeightsError {
        match e {
            super::HolderError::InUse(m) => WeightsError::InUse(format!(
                "model {} is in use past {} ms ({m}); nothing was unmapped",
                model.id, self.config.use_bound_ms
            )),
            super::HolderError::Failed(m) | super::HolderError::Gone(m) => {
                WeightsError::Internal(format!("model {}: a holder could not unmap: {m}", model.id))
            }
        }
    }

    /// Sends each holder a grant of the model's resident memory, all at once; a holder that
    /// fails is dropped.
    pub(super) async fn remap_holders(&self, model: &HeldModel, holders: Vec<Arc<dyn WeightHolder>>) {
        let handle = match self.arena(model.device()) {
            Ok(a) => a.handle_kind(),
            Err(_) => return,
        };
        let remaps = holders.iter().map(|holder| {
            let grant = model.grant(handle);
            async move {
                match grant {
                    Ok((grant, fds)) => holder.remap(grant, fds).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
        });
        let answers = futures_util::future::join_all(remaps).await;
        for (holder, answer) in holders.iter().zip(answers) {
            if let Err(e) = answer {
                tracing::warn!(model = %model.id, holder = %holder.holder_id(), "remap failed, holder dropped: {e}");
                lock(&model.held).holders.remove(&holder.holder_id());
            }
        }
    }

    /// After waiting for a model's `op` lock: an unload may have removed it meanwhile.
    pub(super) fn still_held(&self, model: &Arc<HeldModel>) -> Result<(), WeightsError> {
        match lock(&self.models).get(&model.id) {
            Some(m) if Arc::ptr_eq(m, model) => Ok(()),
            _ => Err(WeightsError::ModelNotFound(model.id.clone())),
        }
    }

    pub async fn park(self: &Arc<Self>, id: &str) -> Result<ActionOutcome, WeightsError> {
        let model = self.get(id)?;
        let _op = model.op.lock().await;
        self.still_held(&model)?;
        self.park_locked(&model).await
    }

    async fn park_locked(&self, model: &Arc<HeldModel>) -> Result<ActionOutcome, WeightsError> {
        let (state, device) = model.with_held(|h| (h.state, h.device));
        if matches!(state, WeightState::Parked | WeightState::Dropped) {
            return Ok(ActionOutcome::none());
        }
        if !self.arena(device)?.can_park() {
            return Err(WeightsError::NotSupported(format!(
                "model {} is on {device}, where a model is resident or dropped; drop or unload it instead",
                model.id
            )));
        }
        if model.pinned {
            return Err(WeightsError::NotSupported(format!("model {} is pinned", model.id)));
        }
        // The holders' unmaps run while the bytes are copied out; the device memory goes back
        // once every holder has unmapped (a mapping keeps it alive).
        let unmap_started = Instant::now();
        let unmapping = self.quiesce_holders(model, false).await?;
        let unmap_ms = ms(unmap_started);
        let (pool, m) = (self.park_pool.clone(), model.clone());
        let copied = blocking(move || {
            let block = lock(&m.held).block.take();
            let Some(block) = block else { return Err(WeightsError::Internal("no resident memory".into())) };
            // From here the memory goes back to the model unless the park gets to free it.
            let block = BlockBack { model: m.clone(), block: Some(block) };
            let started = Instant::now();
            let taken = pool.take(m.file.data_bytes);
            let take_ms = ms(started);
            let copy_started = Instant::now();
            let saved = taken.and_then(|buf| block.save(&buf.pieces(m.file.data_bytes)).map(|()| buf));
            Ok((block, saved?, take_ms, copy_started.elapsed()))
        })
        .await;
        let (mut block, buf, take_ms, elapsed) = match copied {
            Ok(c) => c,
            Err(e) => {
                self.map_back(model, unmapping).await;
                return Err(e);
            }
        };
        let wait_started = Instant::now();
        let (unmapped, refused) = self.settle(model, unmapping).await;
        if let Some(e) = refused {
            // Still resident, as it was (`buf` goes back to the pool): the ones that unmapped
            // map it again.
            drop(block);
            self.remap_holders(model, unmapped).await;
            return Err(self.refusal(model, e));
        }
        let wait_ms = ms(wait_started);
        let (m, block) = (model.clone(), block.take()?);
        let (freed_bytes, rate, free_ms) = blocking(move || {
            let (freed, free_started) = (block.size_bytes(), Instant::now());
            drop(block);
            let free_ms = ms(free_started);
            let mut h = lock(&m.held);
            h.parked = Some(buf);
            h.set_state(WeightState::Parked);
            h.park = Some(Rate::now(m.file.data_bytes, elapsed));
            Ok((freed, h.park.clone(), free_ms))
        })
        .await?;
        let phases = vec![
            ("unmapHolders", unmap_ms),
            ("takePinned", take_ms),
            ("copy", ms_of(elapsed)),
            ("awaitUnmaps", wait_ms),
            ("freeDevice", free_ms),
        ];
        Ok(ActionOutcome { action: "park", freed_bytes, rate, phases })
    }

    /// Brings a parked or dropped model back to its device (or to `target`, another GPU).
    pub async fn resume(self: &Arc<Self>, id: &str, target: Option<DeviceId>) -> Result<ActionOutcome, WeightsError> {
        let model = self.get(id)?;
        let _op = model.op.lock().await;
        self.still_held(&model)?;
        self.resume_locked(&model, target).await
    }

    async fn resume_locked(
        &self,
        model: &Arc<HeldModel>,
        target: Option<DeviceId>,
    ) -> Result<ActionOutcome, WeightsError> {
        let (state, device) = model.with_held(|h| (h.state, h.device));
        let target = target.unwrap_or(device);
        let arena = self.arena(target)?;
        if target != device && !(arena.can_park() && self.arena(device)?.can_park()) {
            return Err(WeightsError::NotSupported(format!(
                "model {} moves only between GPUs (it is on {device})",
                model.id
            )));
        }
        if matches!(state, WeightState::Resident | WeightState::Orphaned) {
            if target == device {
                return Ok(ActionOutcome::none());
            }
            self.park_locked(model).await?;
        }
        let m = model.clone();
        let threads = load::thread_count(self.config.load_threads, model.file.data_bytes);
        let hash_on_load = self.config.hash_on_load;
        let (rate, mut phases) = blocking(move || {
            let parked = lock(&m.held).parked.take();
            let mut phases = Vec::new();
            let mut copy_started = Instant::now();
            let restored = (|| {
                let t = Instant::now();
                let block = arena.alloc(m.file.data_bytes)?;
                phases.push(("allocDevice", ms(t)));
                copy_started = Instant::now();
                match &parked {
                    Some(buf) => block.restore(&buf.pieces(m.file.data_bytes))?,
                    None => {
                        m.file.unchanged_on_disk()?;
                        let loaded = load::fill(&*block, &m.file, threads, hash_on_load)?;
                        let expected = lock(&m.held).file_hashes.clone();
                        check_hashes(&m.file, &expected, &loaded.file_hashes)?;
                    }
                }
                Ok(block)
            })();
            match restored {
                Ok(block) => {
                    let rate = Rate::now(m.file.data_bytes, copy_started.elapsed());
                    phases.push(("copy", ms(copy_started)));
                    let t = Instant::now();
                    drop(parked);
                    phases.push(("releasePinned", ms(t)));
                    let mut h = lock(&m.held);
                    h.block = Some(block);
                    h.device = target;
                    h.set_state(WeightState::Resident);
                    h.resume = Some(rate.clone());
                    h.touch();
                    Ok((rate, phases))
                }
                Err(e) => {
                    lock(&m.held).parked = parked;
                    Err(e)
                }
            }
        })
        .await?;
        let holders = model.with_held(|h| h.holders.values().map(|e| e.holder.clone()).collect());
        let t = Instant::now();
        self.remap_holders(model, holders).await;
        phases.push(("remapHolders", ms(t)));
        Ok(ActionOutcome { action: "resume", freed_bytes: 0, rate: Some(rate), phases })
    }

    /// Keeps only the file: frees the parked copy, or (after the holders unmapped) the
    /// resident memory.
    pub async fn drop_copy(self: &Arc<Self>, id: &str) -> Result<ActionOutcome, WeightsError> {
        let model = self.get(id)?;
        let _op = model.op.lock().await;
        self.still_held(&model)?;
        self.drop_locked(&model).await
    }

    async fn drop_locked(&self, model: &Arc<HeldModel>) -> Result<ActionOutcome, WeightsError> {
        if model.state() == WeightState::Dropped {
            return Ok(ActionOutcome::none());
        }
        if model.pinned {
            return Err(WeightsError::NotSupported(format!("model {} is pinned", model.id)));
        }
        if model.with_held(|h| h.block.is_some()) {
            self.unmap_holders(model, false).await?;
        }
        let (block, parked) = {
            let mut h = lock(&model.held);
            h.set_state(WeightState::Dropped);
            (h.block.take(), h.parked.take())
        };
        let freed_bytes = block.as_ref().map(|b| b.size_bytes()).unwrap_or(0);
        blocking(move || {
            drop(block);
            drop(parked);
            Ok(())
        })
        .await?;
        Ok(ActionOutcome { action: "drop", freed_bytes, rate: None, phases: Vec::new() })
    }

    /// Forgets the model: holders unmap for good, then every byte goes back.
    pub async fn unload(self: &Arc<Self>, id: &str) -> Result<(Arc<HeldModel>, u64), WeightsError> {
        let model = self.get(id)?;
        let _op = model.op.lock().await;
        self.still_held(&model)?;
        // Every holder lets go for good, parked or not (it keeps an address reservation).
        self.unmap_holders(&model, true).await?;
        lock(&self.models).remove(id);
        let (block, parked) = {
            let mut h = lock(&model.held);
            h.holders.clear();
            h.set_unloaded();
            (h.block.take(), h.parked.take())
        };
        let freed = block.as_ref().map(|b| b.size_bytes()).unwrap_or(0);
        blocking(move || {
            drop(block);
            drop(parked);
            Ok(())
        })
        .await?;
        Ok((model.clone(), freed))
    }

    /// Makes the model resident for a holder that wants to use it (`resumeWeights`). When it
    /// already was (the holder had unmapped alone, e.g. after a park it gave up on), the holder
    /// is sent the memory again and counted as a holder again.
    pub async fn ensure_resident(
        self: &Arc<Self>,
        id: &str,
        holder: Arc<dyn WeightHolder>,
    ) -> Result<ActionOutcome, WeightsError> {
        let outcome = self.resume(id, None).await?;
        let model = self.get(id)?;
        let remapped = outcome.action == "resume" && model.with_held(|h| h.holders.contains_key(&holder.holder_id()));
        if !remapped {
            let _op = model.op.lock().await;
            self.still_held(&model)?;
            let handle = self.arena(model.device())?.handle_kind();
            if let Some((grant, fds)) = self.attach(&model, Some(holder.clone()), handle)? {
                if let Err(e) = holder.remap(grant, fds).await {
                    tracing::info!(model = %id, "the holder that asked to resume did not remap: {e}");
                }
            }
        }
        Ok(outcome)
    }
}
