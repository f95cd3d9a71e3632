//! Pressure-driven model memory optimization: the release ladder executed against the workers,
//! every step re-measured against the OS or driver, the manual trigger, the watchdog that runs it
//! on pressure events ([`watchdog`]), and admission before a model load ([`admission`]).
//!
//! Measurement: for a GPU, the driver's free memory (`cuMemGetInfo`, read fresh after each
//! step); for `cpu`, the host memory of the processes holding models (their own resident sets,
//! shared memory left out) plus memwarden's own (its pools and the held weights on the host):
//! the machine's MemAvailable moves with everything else running. `memoryFreed` is that change, not the workers' claims
//! (0 when the change is no gain; `memoryMeasured` keeps the signed figure).

pub mod admission;
mod held;
pub mod room;
mod watchdog;

use crate::config::OptimizerSection;
use crate::models::ModelView;
use crate::service::Service;
use crate::supervisor::{Slot, Supervisor, SupervisorError};
use crate::sync::lock;
use memwarden_core::eviction::{self, Candidate, EvictionStrategy, StepAction};
use memwarden_core::pressure::{Level, PressureThresholds};
use memwarden_core::DeviceId;
use memwarden_protocol::api::{OptimizeOutcome, SkippedRung, StepRecord, WeightState};
use memwarden_protocol::{ActionData, OffloadModel, Released, Role, TrimCache, UnloadModel};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// What a run was asked to do.
#[derive(Debug, Clone)]
pub struct OptimizeRequest {
    pub device: DeviceId,
    /// 0–100: utilization to bring the device down to.
    pub target_pressure_level: f64,
    pub strategy: EvictionStrategy,
    /// `None`: no limit.
    pub max_models: Option<usize>,
    pub min_memory_to_free: u64,
    pub force: bool,
    pub exclude: Vec<String>,
    /// When not empty, only these models may be offloaded or unloaded.
    pub only: Vec<String>,
    pub max_time: Duration,
    /// `manual`, `watchdog` or `admission`.
    pub trigger: &'static str,
}

impl OptimizeRequest {
    /// A run on `device` with no limits beyond the configured time: no target above 100 %, no
    /// minimum, not forced, no model excluded.
    pub fn new(device: DeviceId, strategy: EvictionStrategy, trigger: &'static str, config: &OptimizerSection) -> Self {
        OptimizeRequest {
            device,
            target_pressure_level: 100.0,
            strategy,
            max_models: None,
            min_memory_to_free: 0,
            force: false,
            exclude: Vec::new(),
            only: Vec::new(),
            max_time: Duration::from_millis(config.max_time_ms),
            trigger,
        }
    }
}

/// The model memory optimizer. Owns the release ladder and its runs: one run at a time (its
/// own lock), the history of the last runs and the channel that announces each, its settings
/// and the pressure thresholds it reports levels by. It releases through the parts it is given
/// (the service's pools, the supervisor's workers, the weights memwarden holds) and owns none
/// of them. Admission before a load is in `admission.rs`; the watchdog (`watchdog.rs`) and the
/// held-weights rungs, ranked with the worker models on a GPU (`held.rs`), are their own; making room for one model, and the lock that
/// serializes it per device, in `room.rs`.
pub struct Optimizer {
    service: Arc<Service>,
    supervisor: Arc<Supervisor>,
    config: OptimizerSection,
    /// Levels, for the before/after figures of a run (the pressure monitor's thresholds).
    thresholds: PressureThresholds,
    /// One run at a time: runs measure the device, and two at once would count each other.
    running: tokio::sync::Mutex<()>,
    history: Mutex<VecDeque<OptimizeOutcome>>,
    events: tokio::sync::broadcast::Sender<OptimizeOutcome>,
    /// Model weights memwarden holds: parked (or dropped) in one ranking with the worker models.
    weights: Option<Arc<crate::weights::WeightStore>>,
    /// One "make room, then take it" section at a time per device ([`room::room_lock`]).
    rooms: Mutex<BTreeMap<DeviceId, Arc<tokio::sync::Mutex<()>>>>,
}

const HISTORY: usize = 100;

impl Optimizer {
    /// The optimizer over `service`'s devices, the models `supervisor`'s workers and clients
    /// hold and, when memwarden holds weights, `weights` (its ladder's held rung).
    pub fn new(
        service: Arc<Service>,
        supervisor: Arc<Supervisor>,
        weights: Option<Arc<crate::weights::WeightStore>>,
        config: OptimizerSection,
        thresholds: PressureThresholds,
    ) -> Arc<Optimizer> {
        Arc::new(Optimizer {
            service,
            supervisor,
            config,
            thresholds,
            running: tokio::sync::Mutex::new(()),
            history: Mutex::new(VecDeque::new()),
            events: tokio::sync::broadcast::channel(64).0,
            weights,
            rooms: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn config(&self) -> &OptimizerSection {
        &self.config
    }

    pub fn history(&self) -> Vec<OptimizeOutcome> {
        lock(&self.history).iter().cloned().collect()
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<OptimizeOutcome> {
        self.events.subscribe()
    }

    /// Runs the ladder on the pressure changes `events` brings (when the watchdog is on).
    pub fn start_watchdog(self: &Arc<Self>, events: tokio::sync::broadcast::Receiver<crate::pressure::PressureEvent>) {
        watchdog::Watchdog::start(self, events);
    }

    /// The device's "free" figure for step measurements (see the module doc).
    fn measure(&self, device: DeviceId) -> i64 {
        if device.is_gpu() {
            self.service.measure_now(device).map(|(_, a)| a as i64).unwrap_or(0)
        } else {
            let pools = self.service.status(device).map(|s| s.pool_totals().0).unwrap_or(0);
            let held = self.weights.as_ref().map_or(0, |w| w.host_bytes());
            -((model_processes_rss_bytes(&self.supervisor) + pools + held) as i64)
        }
    }

    /// Re-measures until the gain since `before` reaches half of `claimed` or `verify_ms` passes.
    async fn verify(&self, device: DeviceId, before: i64, claimed: u64) -> (i64, bool) {
        let deadline = Instant::now() + Duration::from_millis(self.config.verify_ms);
        loop {
            let gained = self.measure(device) - before;
            if claimed == 0 || gained >= (claimed / 2) as i64 {
                return (gained, true);
            }
            if Instant::now() >= deadline {
                return (gained, false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `(total, available)` of `device`, read afresh; `(0, 0)` when it cannot be read.
    fn read(&self, device: DeviceId) -> (u64, u64) {
        self.service.measure_now(device).unwrap_or((0, 0))
    }

    /// Pressure (0–100) and level of a reading, by the configured thresholds.
    fn level(&self, (total, available): (u64, u64)) -> (u8, Level) {
        if total == 0 {
            return (0, Level::Low);
        }
        let u = 1.0 - available as f64 / total as f64;
        ((u * 100.0).round().clamp(0.0, 100.0) as u8, self.thresholds.level_of(u))
    }

    /// Bytes the host can take for offloads: none while it is at `high` or above, else up to its
    /// `moderate` threshold.
    fn host_room(&self) -> u64 {
        let (total, available) = self.read(DeviceId::Cpu);
        if total == 0 || self.level((total, available)).1 >= Level::High {
            return 0;
        }
        let limit = (total as f64 * self.thresholds.moderate) as u64;
        limit.saturating_sub(total - available)
    }

    /// Models on `device` from every connected holder, as eviction candidates.
    fn candidates(&self, device: DeviceId) -> Vec<(Candidate, Arc<Slot>)> {
        ModelView::snapshot(&self.supervisor).candidates(device)
    }

    /// Bytes the ladder could release on `device` at most ([`room::room`] with nothing
    /// excluded): idle held models, unpinned worker and client models, cached empty pool blocks.
    pub fn releasable_bytes(&self, device: DeviceId) -> u64 {
        room::room(self, device, &[]).releasable_bytes
    }

    /// Devices an optimize request without a device applies to: those above
    /// `target_percent` or at `high` or above, most pressured first (level, then utilization).
    /// When none is and the request must run anyway (`forced`, or bytes asked for), the most
    /// pressured device alone.
    pub fn pressured_devices(&self, target_percent: f64, forced: bool) -> Vec<DeviceId> {
        let mut all: Vec<(DeviceId, u8, Level)> = self
            .service
            .device_ids()
            .into_iter()
            .map(|d| {
                let (percent, level) = self.level(self.read(d));
                (d, percent, level)
            })
            .collect();
        all.sort_by(|a, b| b.2.cmp(&a.2).then(b.1.cmp(&a.1)).then_with(|| a.0.to_string().cmp(&b.0.to_string())));
        let above: Vec<DeviceId> = all
            .iter()
            .filter(|(_, percent, level)| f64::from(*percent) > target_percent || *level >= Level::High)
            .map(|(d, _, _)| *d)
            .collect();
        if above.is_empty() && forced {
            return all.first().map(|(d, _, _)| vec![*d]).unwrap_or_default();
        }
        above
    }

    /// Runs the ladder once. Never fails: what went wrong is in the steps and the message.
    ///
    /// A forced run always climbs: until `target` bytes are measurably back when there is
    /// something to free (`minMemoryToFree`, or down to the target); otherwise, below the
    /// target, through the cache rungs and then the single least valuable unpinned model.
    pub async fn run(&self, req: OptimizeRequest) -> OptimizeOutcome {
        self.run_noting(req).await.0
    }

    /// [`Optimizer::run`], with the models its steps tried and could not release, and why (a
    /// holder's `use()` past the bound, a worker's refusal): what a refusal names.
    pub(crate) async fn run_noting(&self, req: OptimizeRequest) -> (OptimizeOutcome, Vec<room::HeldBack>) {
        let mut held_back = Vec::new();
        let out = self.run_inner(req, &mut held_back).await;
        (out, held_back)
    }

    async fn run_inner(&self, req: OptimizeRequest, held_back: &mut Vec<room::HeldBack>) -> OptimizeOutcome {
        let _guard = self.running.lock().await;
        let started = Instant::now();
        let started_at = memwarden_protocol::api::rfc3339(OffsetDateTime::now_utc());
        let deadline = started + req.max_time;
        let device = req.device;
        let dev = device.to_string();
        let (total, available) = self.read(device);
        let (level_before, category_before) = self.level((total, available));
        let need = eviction::need_bytes(total, available, req.target_pressure_level, req.min_memory_to_free);
        let target = req.strategy.target_bytes(need);
        let mut out = OptimizeOutcome {
            device_id: dev.clone(),
            trigger: req.trigger.to_string(),
            optimization_triggered: false,
            optimization_strategy: req.strategy.name().to_string(),
            memory_freed: 0,
            memory_measured: 0,
            memory_claimed: 0,
            target_bytes: target,
            models_unloaded: Vec::new(),
            models_offloaded: Vec::new(),
            steps: Vec::new(),
            rungs_skipped: Vec::new(),
            new_pressure_level: level_before,
            new_pressure_category: category_before.as_str().to_string(),
            previous_pressure_level: level_before,
            optimization_time_ms: 0.0,
            message: String::new(),
            started_at,
        };
        let above = f64::from(level_before) > req.target_pressure_level || category_before >= Level::High;
        if !req.force && !above && req.min_memory_to_free == 0 {
            out.message = format!(
                "{dev} is at {level_before} ({}), not above the target {} and below high; not forced",
                category_before.as_str(),
                req.target_pressure_level
            );
            return self.finish(out, started);
        }
        // Forced with nothing to free: the caches, then one model (the least valuable).
        let one_model = req.force && target == 0;
        if target == 0 && !one_model {
            out.message = format!("{dev} needs nothing freed to reach {}", req.target_pressure_level);
            return self.finish(out, started);
        }
        let mut req = req;
        let climb_to = if one_model {
            req.max_models = Some(req.max_models.map_or(1, |m| m.min(1)));
            u64::MAX
        } else {
            target
        };
        out.optimization_triggered = true;
        self.supervisor.sync().await;
        let base = self.measure(device);

        // With no worker or client to ask, the rungs that need one are left out and the others
        // (memwarden's own caches and the weights it holds) run: the seed's degraded mode.
        let nobody = self.note_out_of_reach(&mut out);
        self.trim_caches(device, &mut out).await;
        let stopped_by_time = if device.is_gpu() {
            held::release_ranked(self, &req, climb_to, base, deadline, &mut out, held_back).await
        } else {
            held::release_on_host(self, &req, climb_to, base, deadline, &mut out, held_back).await
                || (!nobody && self.release_models(&req, climb_to, base, deadline, &mut out, held_back).await)
        };
        out.memory_measured = self.measure(device) - base;
        out.memory_freed = out.memory_measured.max(0) as u64;
        out.memory_claimed = out.steps.iter().map(|s| s.claimed_bytes).sum();
        let (level_after, category_after) = self.level(self.read(device));
        out.new_pressure_level = level_after;
        out.new_pressure_category = category_after.as_str().to_string();
        out.message = self.summary(&req, &out, one_model, target, stopped_by_time);
        self.finish(out, started)
    }

    /// With no worker or client to ask: notes the rungs that need one as skipped, with the
    /// reason, and says so.
    fn note_out_of_reach(&self, out: &mut OptimizeOutcome) -> bool {
        if !out_of_reach(self) {
            return false;
        }
        let reason = self.supervisor.unavailable_reason();
        for rung in ["trimCache", "offload", "unload"] {
            out.rungs_skipped.push(SkippedRung { rung: rung.into(), reason: reason.clone() });
        }
        true
    }

    /// A climbed run's message: what it freed of what it wanted and, when short, what limited it.
    fn summary(
        &self,
        req: &OptimizeRequest,
        out: &OptimizeOutcome,
        one_model: bool,
        target: u64,
        timed_out: bool,
    ) -> String {
        let dev = &out.device_id;
        let touched = out.models_unloaded.len() + out.models_offloaded.len();
        let short = if one_model { touched == 0 } else { out.memory_freed < target };
        let limit = if timed_out {
            "; stopped at the time limit".to_string()
        } else if short {
            format!("; {}", self.shortfall(req, touched))
        } else {
            String::new()
        };
        let (unloaded, offloaded) = (out.models_unloaded.len(), out.models_offloaded.len());
        if one_model {
            format!(
                "forced below the target: the caches and the least valuable model freed {} ({} claimed) on {dev}: \
                 {unloaded} unloaded, {offloaded} offloaded{limit}",
                out.memory_freed, out.memory_claimed,
            )
        } else {
            format!(
                "freed {} of {target} wanted ({} claimed) on {dev}: {unloaded} unloaded, {offloaded} offloaded{limit}",
                out.memory_freed, out.memory_claimed,
            )
        }
    }

    /// What limited a run that released less than it set out to, in words: the model limit,
    /// the strategy, or the models that are left and why none of them may go.
    fn shortfall(&self, req: &OptimizeRequest, touched: usize) -> String {
        let left: Vec<Candidate> = self.candidates(req.device).into_iter().map(|(c, _)| c).collect();
        let loaded = left.len();
        if let Some(max) = req.max_models.filter(|m| touched >= *m && loaded > 0) {
            return format!("maxModelsToUnload ({max}) reached; {loaded} model(s) still loaded");
        }
        let resident = |m: &&Arc<crate::weights::HeldModel>| {
            m.device() == req.device && matches!(m.state(), WeightState::Resident | WeightState::Orphaned)
        };
        let held_left = self.weights.as_ref().map_or(0, |w| w.models().iter().filter(resident).count());
        if loaded == 0 && held_left > 0 {
            return "the held models left could not be released (pinned, excluded, in use or not parkable)".into();
        }
        if loaded == 0 && !out_of_reach(self) {
            return "no model is loaded here, nothing left that may be released".into();
        }
        if loaded == 0 {
            return format!("no worker or client to ask ({})", self.supervisor.unavailable_reason());
        }
        let pinned = left.iter().filter(|c| c.pinned).count();
        let excluded = left.iter().filter(|c| !c.pinned && req.exclude.contains(&c.model_id)).count();
        let not_listed = left
            .iter()
            .filter(|c| !c.pinned && !req.exclude.contains(&c.model_id))
            .filter(|c| !req.only.is_empty() && !req.only.contains(&c.model_id))
            .count();
        let releasable = loaded - pinned - excluded - not_listed;
        if releasable == 0 {
            return format!(
                "{loaded} model(s) still loaded, none of them releasable ({pinned} pinned, {excluded} excluded, \
                 {not_listed} not in models)"
            );
        }
        if !req.strategy.may_unload() {
            return format!(
                "{releasable} releasable model(s) still loaded; the {} strategy only offloads, and the host has no \
                 room for them",
                req.strategy.name()
            );
        }
        format!("{releasable} releasable model(s) still loaded; releasing them failed (see the steps)")
    }

    /// (1) Caches: memwarden's own empty pool blocks, then each holder's allocator caches.
    async fn trim_caches(&self, device: DeviceId, out: &mut OptimizeOutcome) {
        let t = Instant::now();
        let before = self.measure(device);
        let (cleared, error) = match self.service.clear(Some(device)) {
            Ok(v) => (v.iter().map(|c| c.cleared_bytes).sum(), None),
            Err(e) => (0, Some(e.to_string())),
        };
        let (gained, verified) = self.verify(device, before, cleared).await;
        out.steps.push(StepRecord {
            action: "clear".into(),
            target: "memwarden".into(),
            worker_id: None,
            claimed_bytes: cleared,
            measured_bytes: gained,
            duration_ms: ms(t),
            verified: verified && error.is_none(),
            error,
        });
        for slot in self.supervisor.slots().into_iter().filter(|s| s.conn().is_some()) {
            let trim = TrimCache { device_id: Some(device.to_string()) };
            let (step, _) = self.worker_step(device, &slot, &trim, "trimCache", &slot.id).await;
            out.steps.push(step);
        }
    }

    /// On the host, after the held rung: unload worker and client models, ranked, until `target`
    /// bytes are measurably free since `base`, touching at most what is left of `max_models`
    /// (a GPU ranks them with the held models: `held::release_ranked`). Returns whether the
    /// time limit stopped it.
    async fn release_models(
        &self,
        req: &OptimizeRequest,
        target: u64,
        base: i64,
        deadline: Instant,
        out: &mut OptimizeOutcome,
        held_back: &mut Vec<room::HeldBack>,
    ) -> bool {
        let device = req.device;
        let freed_so_far = (self.measure(device) - base).max(0) as u64;
        let candidates = self.candidates(device);
        let cands: Vec<Candidate> = candidates
            .iter()
            .map(|(c, _)| c.clone())
            .filter(|c| req.only.is_empty() || req.only.contains(&c.model_id))
            .collect();
        let touched = out.models_unloaded.len() + out.models_offloaded.len();
        let planned = eviction::plan(
            &cands,
            &req.exclude,
            target.saturating_sub(freed_so_far),
            req.strategy,
            0, // on the host itself there is nowhere to offload to
            req.max_models.map(|m| m.saturating_sub(touched)),
        );
        for p in planned {
            if (self.measure(device) - base).max(0) as u64 >= target {
                break;
            }
            if Instant::now() >= deadline {
                return true;
            }
            let Some((_, slot)) = candidates.iter().find(|(c, _)| c.model_id == p.model_id) else { continue };
            self.release_planned(device, slot, &p, out, held_back).await;
        }
        false
    }

    /// Offloads or unloads one worker or client model as planned, as one step of `out`; a
    /// refusal is noted in `held_back`.
    async fn release_planned(
        &self,
        device: DeviceId,
        slot: &Slot,
        p: &eviction::Planned,
        out: &mut OptimizeOutcome,
        held_back: &mut Vec<room::HeldBack>,
    ) {
        let (step, ok) = match p.action {
            StepAction::Offload => {
                let offload = OffloadModel { model_id: p.model_id.clone(), target: DeviceId::Cpu.to_string() };
                self.worker_step(device, slot, &offload, "offload", &p.model_id).await
            }
            _ => {
                let unload = UnloadModel { model_id: p.model_id.clone() };
                self.worker_step(device, slot, &unload, "unload", &p.model_id).await
            }
        };
        if ok {
            if p.action == StepAction::Offload {
                out.models_offloaded.push(p.model_id.clone());
            } else {
                out.models_unloaded.push(p.model_id.clone());
            }
            if !step.verified {
                self.unverified(slot, &p.model_id, step.claimed_bytes, step.measured_bytes);
            }
        } else {
            let why = step.error.clone().unwrap_or_else(|| "no reason given".into());
            held_back.push(room::HeldBack { model_id: p.model_id.clone(), reason: room::HoldReason::Failed(why) });
        }
        out.steps.push(step);
    }

    /// One call to a worker, with its claim re-measured on `device`; the bool says whether the
    /// worker answered with success.
    async fn worker_step<R: ActionData>(
        &self,
        device: DeviceId,
        slot: &Slot,
        request: &R,
        name: &str,
        target: &str,
    ) -> (StepRecord, bool) {
        let t = Instant::now();
        let before = self.measure(device);
        let r = self.supervisor.request(slot, request).await;
        let released = released(&r);
        let claimed = released.freed_by_device.get(&device.to_string()).copied().unwrap_or(released.freed_bytes);
        let (gained, verified) = self.verify(device, before, claimed).await;
        let step = StepRecord {
            action: name.into(),
            target: target.to_string(),
            worker_id: Some(slot.id.clone()),
            claimed_bytes: claimed,
            measured_bytes: gained,
            duration_ms: ms(t),
            // A failed call claims nothing, which "verifies" trivially: it is not verified.
            verified: verified && r.is_ok(),
            error: r.as_ref().err().map(|e| e.to_string()),
        };
        (step, r.is_ok())
    }

    /// A claim that did not show up: reported on the worker and, when configured, the worker is
    /// restarted (its models die with it, which is certain to free them).
    fn unverified(&self, slot: &Slot, model_id: &str, claimed: u64, gained: i64) {
        let msg = format!(
            "released {model_id} claiming {claimed} bytes, but only {gained} showed up within {} ms",
            self.config.verify_ms
        );
        tracing::warn!(worker = %slot.id, "{msg}");
        slot.note_unverified(msg);
        if self.config.restart_unverified && slot.role == Role::Worker {
            slot.request_restart();
        }
    }

    fn finish(&self, mut out: OptimizeOutcome, started: Instant) -> OptimizeOutcome {
        out.optimization_time_ms = ms(started);
        if out.optimization_triggered {
            tracing::info!(device = %out.device_id, trigger = %out.trigger, freed = out.memory_freed, "{}", out.message);
        }
        {
            let mut h = lock(&self.history);
            h.push_back(out.clone());
            while h.len() > HISTORY {
                h.pop_front();
            }
        }
        let _ = self.events.send(out.clone());
        out
    }
}

/// Summed own host bytes (`ProcessMeter::own_host_bytes`) of the processes holding models that
/// take calls now: with memwarden's own host memory, the ladder's measure on `cpu`.
fn model_processes_rss_bytes(supervisor: &Supervisor) -> u64 {
    supervisor
        .slots()
        .iter()
        .filter_map(|s| s.conn().map(|c| c.pid))
        .filter_map(|pid| supervisor.meter().own_host_bytes(pid))
        .sum()
}

/// No worker or client is connected: the rungs that ask one cannot run.
pub(super) fn out_of_reach(o: &Optimizer) -> bool {
    o.supervisor.slots().iter().all(|s| s.conn().is_none())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn released(r: &Result<serde_json::Value, SupervisorError>) -> Released {
    r.as_ref().ok().and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default()
}
