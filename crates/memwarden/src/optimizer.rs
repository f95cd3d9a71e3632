//! Pressure-driven model memory optimization: the release ladder executed against the workers,
//! every step re-measured against the OS or driver, the manual trigger, the watchdog that runs it
//! on pressure events, and admission before a model load.
//!
//! Measurement: for a GPU, the driver's free memory (`cuMemGetInfo`, read fresh after each
//! step); for `cpu`, the summed RSS of the processes holding models (the machine's MemAvailable
//! moves with everything else running). `memoryFreed` is that change, not the workers' claims.

use crate::api::models::rss_bytes;
use crate::config::OptimizerSection;
use crate::service::Service;
use crate::supervisor::{Slot, Supervisor, SupervisorError};
use memwarden_core::eviction::{self, Candidate, StepAction, Strategy};
use memwarden_core::pressure::Level;
use memwarden_core::DeviceId;
use memwarden_protocol::api::{OptimizeOutcome, StepRecord};
use memwarden_protocol::{Action, Released, Role};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// What a run was asked to do.
#[derive(Debug, Clone)]
pub struct OptimizeRequest {
    pub device: DeviceId,
    /// 0–100: utilization to bring the device down to.
    pub target_pressure_level: f64,
    pub strategy: Strategy,
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

pub struct Optimizer {
    service: Arc<Service>,
    supervisor: Arc<Supervisor>,
    config: OptimizerSection,
    /// One run at a time: runs measure the device, and two at once would count each other.
    running: tokio::sync::Mutex<()>,
    history: Mutex<VecDeque<OptimizeOutcome>>,
    events: tokio::sync::broadcast::Sender<OptimizeOutcome>,
    /// Per device: when the watchdog last ran, and for which level.
    last_auto: Mutex<HashMap<DeviceId, (Instant, Level)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const HISTORY: usize = 100;

impl Optimizer {
    pub fn new(service: Arc<Service>, supervisor: Arc<Supervisor>, config: OptimizerSection) -> Arc<Optimizer> {
        Arc::new(Optimizer {
            service,
            supervisor,
            config,
            running: tokio::sync::Mutex::new(()),
            history: Mutex::new(VecDeque::new()),
            events: tokio::sync::broadcast::channel(64).0,
            last_auto: Mutex::new(HashMap::new()),
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

    /// The device's "free" figure for step measurements (see the module doc).
    fn measure(&self, device: DeviceId) -> i64 {
        match device {
            DeviceId::Cuda(_) => self.service.measure_now(device).map(|(_, a)| a as i64).unwrap_or(0),
            DeviceId::Cpu => {
                let pids: Vec<u32> = self.supervisor.slots().iter().filter_map(|s| s.conn().map(|c| c.pid)).collect();
                -(pids.iter().filter_map(|p| rss_bytes(self.supervisor.proc_root(), *p)).sum::<u64>() as i64)
            }
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
        ((u * 100.0).round().clamp(0.0, 100.0) as u8, self.service.pressure_thresholds().level_of(u))
    }

    /// Bytes the host can take for offloads: none while it is at `high` or above, else up to its
    /// `moderate` threshold.
    fn host_room(&self) -> u64 {
        let (total, available) = self.read(DeviceId::Cpu);
        if total == 0 || self.level((total, available)).1 >= Level::High {
            return 0;
        }
        let limit = (total as f64 * self.service.pressure_thresholds().moderate) as u64;
        limit.saturating_sub(total - available)
    }

    /// Models on `device` from every connected holder, as eviction candidates.
    fn candidates(&self, device: DeviceId) -> Vec<(Candidate, Arc<Slot>)> {
        let dev = device.to_string();
        let now = OffsetDateTime::now_utc();
        let mut out = Vec::new();
        for slot in self.supervisor.slots() {
            let Some(conn) = slot.conn() else { continue };
            for m in conn.model_list() {
                let on_device = crate::analytics::model_bytes_on(&m, &dev);
                if on_device == 0 {
                    continue;
                }
                let offloadable = matches!(device, DeviceId::Cuda(_))
                    && (m.backend.as_deref() == Some("torch") || slot.role == Role::Client);
                out.push((
                    Candidate {
                        model_id: m.model_id.clone(),
                        worker_id: slot.id.clone(),
                        size_bytes: m.reserved_bytes.unwrap_or(on_device).max(on_device),
                        priority: m.priority,
                        pinned: m.pinned,
                        idle_secs: (now - m.last_access).as_seconds_f64(),
                        load_time_ms: m.load_time_ms,
                        offloadable,
                    },
                    slot.clone(),
                ));
            }
        }
        out
    }

    /// Bytes the ladder could release on `device` at most: every unpinned model there that is
    /// not excluded (offloads or unloads), and memwarden's cached empty pool blocks.
    pub fn releasable_bytes(&self, device: DeviceId) -> u64 {
        let models: u64 = self.candidates(device).iter().filter(|(c, _)| !c.pinned).map(|(c, _)| c.size_bytes).sum();
        let cached: u64 =
            self.service.status(device).map(|s| s.pools.iter().map(|(_, p)| p.empty_block_bytes).sum()).unwrap_or(0);
        models + cached
    }

    /// Runs the ladder once. Never fails: what went wrong is in the steps and the message.
    pub async fn run(&self, req: OptimizeRequest) -> OptimizeOutcome {
        let _guard = self.running.lock().await;
        let started = Instant::now();
        let started_at = crate::api::envelope::rfc3339(OffsetDateTime::now_utc());
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
            memory_claimed: 0,
            target_bytes: target,
            models_unloaded: Vec::new(),
            models_offloaded: Vec::new(),
            steps: Vec::new(),
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
        if target == 0 {
            out.message = format!("{dev} needs nothing freed to reach {}", req.target_pressure_level);
            return self.finish(out, started);
        }
        out.optimization_triggered = true;
        self.supervisor.sync().await;
        let base = self.measure(device);

        // (1) Caches: memwarden's own empty pool blocks, then each holder's allocator caches.
        let t = Instant::now();
        let before = self.measure(device);
        let cleared = self.service.clear(Some(device)).map(|v| v.iter().map(|c| c.cleared_bytes).sum()).unwrap_or(0u64);
        let (gained, verified) = self.verify(device, before, if device == DeviceId::Cpu { 0 } else { cleared }).await;
        out.steps.push(StepRecord {
            action: "clear".into(),
            target: "memwarden".into(),
            worker_id: None,
            claimed_bytes: cleared,
            measured_bytes: if device == DeviceId::Cpu { 0 } else { gained },
            duration_ms: ms(t),
            verified,
            error: None,
        });
        for slot in self.supervisor.slots().into_iter().filter(|s| s.conn().is_some()) {
            let data = serde_json::json!({ "deviceId": dev });
            let (step, _) = self.worker_step(device, &slot, Action::TrimCache, data, "trimCache", &slot.id).await;
            out.steps.push(step);
        }

        // (2, 3) Offload and unload, ranked, until the target is met.
        let freed_so_far = (self.measure(device) - base).max(0) as u64;
        let candidates = self.candidates(device);
        let host_room = if matches!(device, DeviceId::Cuda(_)) { self.host_room() } else { 0 };
        let cands: Vec<Candidate> = candidates
            .iter()
            .map(|(c, _)| c.clone())
            .filter(|c| req.only.is_empty() || req.only.contains(&c.model_id))
            .collect();
        let planned = eviction::plan(
            &cands,
            &req.exclude,
            target.saturating_sub(freed_so_far),
            req.strategy,
            host_room,
            req.max_models,
        );
        let mut stopped_by_time = false;
        for p in planned {
            if (self.measure(device) - base).max(0) as u64 >= target {
                break;
            }
            if Instant::now() >= deadline {
                stopped_by_time = true;
                break;
            }
            let Some((_, slot)) = candidates.iter().find(|(c, _)| c.model_id == p.model_id) else { continue };
            let (action, name, data) = match p.action {
                StepAction::Offload => {
                    (Action::OffloadModel, "offload", serde_json::json!({"modelId": p.model_id, "target": "cpu"}))
                }
                _ => (Action::UnloadModel, "unload", serde_json::json!({"modelId": p.model_id})),
            };
            let (step, ok) = self.worker_step(device, slot, action, data, name, &p.model_id).await;
            if ok {
                if p.action == StepAction::Offload {
                    out.models_offloaded.push(p.model_id.clone());
                } else {
                    out.models_unloaded.push(p.model_id.clone());
                }
                if !step.verified {
                    self.unverified(slot, &p.model_id, step.claimed_bytes, step.measured_bytes);
                }
            }
            out.steps.push(step);
        }
        out.memory_freed = self.measure(device) - base;
        out.memory_claimed = out.steps.iter().map(|s| s.claimed_bytes).sum();
        let (level_after, category_after) = self.level(self.read(device));
        out.new_pressure_level = level_after;
        out.new_pressure_category = category_after.as_str().to_string();
        let touched = out.models_unloaded.len() + out.models_offloaded.len();
        out.message = format!(
            "freed {} of {} wanted ({} claimed) on {dev}: {} unloaded, {} offloaded{}{}",
            out.memory_freed,
            target,
            out.memory_claimed,
            out.models_unloaded.len(),
            out.models_offloaded.len(),
            if stopped_by_time { "; stopped at the time limit" } else { "" },
            if out.memory_freed < target as i64 && touched == 0 { "; nothing left that may be released" } else { "" },
        );
        self.finish(out, started)
    }

    /// One call to a worker, with its claim re-measured on `device`; the bool says whether the
    /// worker answered with success.
    async fn worker_step(
        &self,
        device: DeviceId,
        slot: &Slot,
        action: Action,
        data: serde_json::Value,
        name: &str,
        target: &str,
    ) -> (StepRecord, bool) {
        let t = Instant::now();
        let before = self.measure(device);
        let r = self.supervisor.call_ok(slot, action, data).await;
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
            verified,
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

    /// The watchdog: on a device reaching `high` runs the balanced ladder, on `critical` the
    /// aggressive one, at most once per `cooldown_ms` per device and level (a rise to a higher
    /// level runs at once).
    pub fn start_watchdog(self: &Arc<Self>) {
        if !self.config.watchdog {
            return;
        }
        let me = self.clone();
        let mut rx = self.service.pressure_events();
        tokio::spawn(async move {
            loop {
                let event = match rx.recv().await {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                };
                if event.new < Level::High || event.new <= event.old {
                    continue;
                }
                let strategy = if event.new >= Level::Critical { Strategy::Aggressive } else { Strategy::Balanced };
                {
                    // The cooldown keeps a device hovering at one level from thrashing; a rise to a
                    // higher level than the last run's does not wait.
                    let mut last = lock(&me.last_auto);
                    let cooldown = Duration::from_millis(me.config.cooldown_ms);
                    if last.get(&event.device).is_some_and(|(t, l)| t.elapsed() < cooldown && event.new <= *l) {
                        tracing::info!(device = %event.device, "pressure {} but the optimizer is cooling down", event.new.as_str());
                        continue;
                    }
                    last.insert(event.device, (Instant::now(), event.new));
                }
                let me2 = me.clone();
                tokio::spawn(async move {
                    me2.run(OptimizeRequest {
                        device: event.device,
                        target_pressure_level: me2.config.target_pressure_level,
                        strategy,
                        max_models: None,
                        min_memory_to_free: 0,
                        force: true,
                        exclude: Vec::new(),
                        only: Vec::new(),
                        max_time: Duration::from_millis(me2.config.max_time_ms),
                        trigger: "watchdog",
                    })
                    .await;
                });
            }
        });
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn released(r: &Result<serde_json::Value, SupervisorError>) -> Released {
    r.as_ref().ok().and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default()
}
