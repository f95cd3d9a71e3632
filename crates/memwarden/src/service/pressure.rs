//! The pressure monitor: a sampler thread reads every device at its interval (GPUs through
//! `cuMemGetInfo`, ≈ 5 µs; the host through /proc/meminfo, the cgroup and PSI), feeds the pure
//! level trackers, and pushes level changes to subscribers and a bounded history.

use super::{lock, Service};
use crate::config::PressureSection;
use memwarden_core::pressure::{Level, Sample, Thresholds, Tracker};
use memwarden_core::DeviceId;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::sync::broadcast;

/// A pressure level change, as pushed on `/api/memory/events` and kept in the history.
#[derive(Debug, Clone, PartialEq)]
pub struct PressureEvent {
    pub device: DeviceId,
    pub old: Level,
    pub new: Level,
    pub utilization: f64,
    pub available_bytes: u64,
    pub total_bytes: u64,
    pub psi_some10: Option<f64>,
    pub psi_full10: Option<f64>,
    pub at: OffsetDateTime,
}

/// A device's pressure now.
#[derive(Debug, Clone, PartialEq)]
pub struct PressureReport {
    pub device: DeviceId,
    pub level: Level,
    pub pressure_level: u8,
    pub utilization: f64,
    pub available_bytes: u64,
    pub total_bytes: u64,
    pub thresholds: Thresholds,
    pub time_to_critical_secs: Option<f64>,
    pub psi_some10: Option<f64>,
    pub psi_full10: Option<f64>,
    pub psi_some_total_us: Option<u64>,
    pub allocation_failures: u64,
    /// Host in a memory cgroup with a limit: limit hits + OOM kills so far.
    pub limit_events: Option<u64>,
    /// Host: the PSI trigger's state (`Ok(times fired)`, or why there is none).
    pub psi_trigger: Option<Result<u64, String>>,
    pub sampled_at: Option<OffsetDateTime>,
    pub recommended_actions: Vec<String>,
}

pub(crate) struct PressureState {
    trackers: Mutex<HashMap<DeviceId, DeviceTracker>>,
    history: Mutex<VecDeque<PressureEvent>>,
    events: broadcast::Sender<PressureEvent>,
    config: PressureSection,
    pub(crate) failures: Mutex<HashMap<DeviceId, Arc<AtomicU64>>>,
    /// Host PSI trigger: `Ok(fired count)` while registered, `Err(reason)` when the kernel
    /// refused or there is none.
    trigger: Mutex<Result<Arc<AtomicU64>, String>>,
}

struct DeviceTracker {
    tracker: Tracker,
    psi_some_total_us: Option<u64>,
    sampled_at: Option<OffsetDateTime>,
}

impl PressureState {
    pub(crate) fn new(config: PressureSection) -> Self {
        PressureState {
            trackers: Mutex::new(HashMap::new()),
            history: Mutex::new(VecDeque::new()),
            events: broadcast::channel(1024).0,
            config,
            failures: Mutex::new(HashMap::new()),
            trigger: Mutex::new(Err("not started".into())),
        }
    }
}

impl Service {
    /// Starts the sampler thread (once). It stops when the service is dropped.
    pub fn start_pressure_monitor(self: &Arc<Self>) {
        if !self.pressure.config.enabled {
            return;
        }
        let weak: Weak<Service> = Arc::downgrade(self);
        let host_every = Duration::from_millis(self.pressure.config.host_interval_ms.max(1));
        let gpu_every = Duration::from_millis(self.pressure.config.gpu_interval_ms.max(1));
        let spawned = std::thread::Builder::new().name("pressure-sampler".into()).spawn(move || {
            let start = Instant::now();
            let mut next: HashMap<DeviceId, Instant> = HashMap::new();
            loop {
                let Some(service) = weak.upgrade() else { return };
                let now = Instant::now();
                for id in service.device_ids() {
                    let due = next.get(&id).is_none_or(|t| *t <= now);
                    if due {
                        service.sample_pressure(id, start);
                        let every = if id == DeviceId::Cpu { host_every } else { gpu_every };
                        next.insert(id, now + every);
                    }
                }
                let wake = next.values().min().copied().unwrap_or(now + host_every);
                drop(service);
                std::thread::sleep(wake.saturating_duration_since(Instant::now()).max(Duration::from_micros(200)));
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "pressure sampler not started");
        }
        self.start_stall_trigger();
    }

    /// Registers the host PSI trigger and a thread that samples the host the moment it fires
    /// (the sampler's interval is then no longer the bound on escalation by stall).
    fn start_stall_trigger(self: &Arc<Self>) {
        let c = &self.pressure.config;
        if c.psi_trigger_stall_ms == 0 {
            *lock(&self.pressure.trigger) = Err("disabled (pressure.psi_trigger_stall_ms = 0)".into());
            return;
        }
        let spec = format!("some {} {}", c.psi_trigger_stall_ms * 1000, c.psi_trigger_window_ms * 1000);
        let trigger = match self.device(DeviceId::Cpu).and_then(|d| d.backend.stall_trigger(&spec)) {
            Some(Ok(t)) => t,
            Some(Err(reason)) => {
                tracing::info!("PSI trigger unavailable ({reason}); pressure relies on the sampler");
                *lock(&self.pressure.trigger) = Err(reason);
                return;
            }
            None => {
                *lock(&self.pressure.trigger) = Err("no host PSI source".into());
                return;
            }
        };
        let fired = Arc::new(AtomicU64::new(0));
        *lock(&self.pressure.trigger) = Ok(fired.clone());
        let weak: Weak<Service> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("psi-trigger".into()).spawn(move || {
            let epoch = Instant::now();
            loop {
                match trigger.wait(1000) {
                    Ok(fired_now) => {
                        let Some(service) = weak.upgrade() else { return };
                        if fired_now {
                            fired.fetch_add(1, Ordering::Relaxed);
                            service.sample_pressure(DeviceId::Cpu, epoch);
                        }
                    }
                    Err(e) => {
                        if let Some(service) = weak.upgrade() {
                            *lock(&service.pressure.trigger) = Err(e.to_string());
                        }
                        return;
                    }
                }
            }
        });
        if let Err(e) = spawned {
            *lock(&self.pressure.trigger) = Err(e.to_string());
        }
    }

    /// Takes one sample of `device` and updates its level (the sampler calls this).
    pub fn sample_pressure(&self, device: DeviceId, epoch: Instant) -> Option<PressureEvent> {
        let dev = self.device(device)?;
        let (total, available) = match dev.backend.sample() {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(device = %device, error = %e, "pressure sample failed");
                return None;
            }
        };
        let psi = dev.backend.pressure_stall();
        let sample = Sample {
            at_secs: epoch.elapsed().as_secs_f64(),
            total_bytes: total,
            available_bytes: available,
            psi_some10: psi.map(|p| p.some_avg10),
            psi_full10: psi.map(|p| p.full_avg10),
            limit_events: dev.backend.limit_events(),
        };
        let change = {
            let mut trackers = lock(&self.pressure.trackers);
            let t = trackers.entry(device).or_insert_with(|| DeviceTracker {
                tracker: Tracker::new(self.pressure_thresholds()),
                psi_some_total_us: None,
                sampled_at: None,
            });
            t.psi_some_total_us = psi.map(|p| p.some_total_us);
            t.sampled_at = Some(OffsetDateTime::now_utc());
            t.tracker.update(sample)
        }?;
        let event = PressureEvent {
            device,
            old: change.old,
            new: change.new,
            utilization: sample.utilization(),
            available_bytes: available,
            total_bytes: total,
            psi_some10: sample.psi_some10,
            psi_full10: sample.psi_full10,
            at: OffsetDateTime::now_utc(),
        };
        tracing::info!(device = %device, old = %change.old, new = %change.new, utilization = sample.utilization(), "memory pressure level changed");
        {
            let mut h = lock(&self.pressure.history);
            h.push_back(event.clone());
            while h.len() > self.pressure.config.history_size.max(1) {
                h.pop_front();
            }
        }
        let _ = self.pressure.events.send(event.clone());
        Some(event)
    }

    pub fn pressure_thresholds(&self) -> Thresholds {
        self.pressure.config.thresholds()
    }

    /// `(total, available)` bytes of `device` read from the OS or driver now (no cached sample;
    /// the status cache is dropped too, so the next status shows the change).
    pub fn measure_now(&self, device: DeviceId) -> Result<(u64, u64), super::ServiceError> {
        let dev = self.device_or_404(device)?;
        dev.backend.refresh();
        let reading = dev.backend.sample().map_err(|e| super::ServiceError::from_backend(device, e))?;
        lock(&dev.state).invalidate_sample();
        Ok(reading)
    }

    /// Subscribes to level changes.
    pub fn pressure_events(&self) -> broadcast::Receiver<PressureEvent> {
        self.pressure.events.subscribe()
    }

    /// The last level changes, oldest first.
    pub fn pressure_history(&self) -> Vec<PressureEvent> {
        lock(&self.pressure.history).iter().cloned().collect()
    }

    /// Counts an allocation that did not fit (a pressure signal of its own).
    pub(super) fn note_allocation_failure(&self, device: DeviceId) {
        lock(&self.pressure.failures).entry(device).or_default().fetch_add(1, Ordering::Relaxed);
    }

    /// Pressure of one device now (sampling it if the monitor has not yet).
    pub fn pressure(&self, device: DeviceId) -> Result<PressureReport, super::ServiceError> {
        let status = self.status(device)?;
        if !lock(&self.pressure.trackers).contains_key(&device) {
            self.sample_pressure(device, Instant::now());
        }
        let trackers = lock(&self.pressure.trackers);
        let t = trackers.get(&device);
        let last = t.and_then(|t| t.tracker.last().copied());
        let level = t.map(|t| t.tracker.level()).unwrap_or(Level::Low);
        let mut actions = Vec::new();
        if level >= Level::High {
            let empty: u64 = status.pools.iter().map(|(_, s)| s.empty_block_bytes).sum();
            if empty > 0 {
                actions.push(format!(
                    "clear {device}: {empty} bytes of cached empty pool blocks go back (POST /api/memory/operations/clear/{device})"
                ));
            }
            let frag = status.fragmentation();
            if frag >= 0.3 {
                actions.push(format!(
                    "defragment {device}: fragmentation {frag:.2} (POST /api/memory/operations/defragment/{device})"
                ));
            }
        }
        Ok(PressureReport {
            device,
            level,
            pressure_level: t.map(|t| t.tracker.pressure_level()).unwrap_or(0),
            utilization: last.map(|s| s.utilization()).unwrap_or_else(|| status.utilization()),
            available_bytes: last.map(|s| s.available_bytes).unwrap_or(status.available_bytes),
            total_bytes: last.map(|s| s.total_bytes).unwrap_or(status.total_bytes),
            thresholds: self.pressure_thresholds(),
            time_to_critical_secs: t.and_then(|t| t.tracker.time_to_critical()),
            psi_some10: last.and_then(|s| s.psi_some10),
            psi_full10: last.and_then(|s| s.psi_full10),
            psi_some_total_us: t.and_then(|t| t.psi_some_total_us),
            limit_events: last.and_then(|s| s.limit_events),
            allocation_failures: lock(&self.pressure.failures)
                .get(&device)
                .map(|c| c.load(Ordering::Relaxed))
                .unwrap_or(0),
            psi_trigger: (device == DeviceId::Cpu).then(|| match &*lock(&self.pressure.trigger) {
                Ok(n) => Ok(n.load(Ordering::Relaxed)),
                Err(e) => Err(e.clone()),
            }),
            sampled_at: t.and_then(|t| t.sampled_at),
            recommended_actions: actions,
        })
    }
}
