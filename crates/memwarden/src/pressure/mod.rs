//! The pressure monitor: a sampler thread reads every device at its interval (GPUs through
//! `cuMemGetInfo`, ≈ 5 µs; the host through /proc/meminfo, the cgroup and PSI), feeds the pure
//! level trackers, and pushes level changes to subscribers and a bounded history. It reads the
//! devices through the service and the host's stall and limit signals through
//! `memwarden_backends::HostSignals`, and owns nothing else; the watchdog (optimizer), the history
//! (analytics) and the event stream (api) subscribe to it.

mod sampler;

use crate::config::PressureSection;
use crate::service::{Service, ServiceError};
use crate::sync::lock;
use memwarden_backends::HostSignals;
use memwarden_core::pressure::{Level, PressureThresholds, Sample, Tracker};
use memwarden_core::DeviceId;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
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
    pub thresholds: PressureThresholds,
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
}

/// The pressure monitor. Owns, per device, the level tracker with its hysteresis and last
/// sample (behind one lock), the history of level changes and the channel that announces each
/// (the optimizer's watchdog and analytics listen), the host's PSI trigger, and its thresholds
/// and settings. It reads the devices through the service's backends, and the host's stall and
/// limit signals through [`HostSignals`], given to it on their own; it changes nothing on them.
/// The sampler task that drives it is in `sampler.rs`.
pub struct PressureMonitor {
    service: Arc<Service>,
    /// PSI, cgroup limit events and the stall trigger of the host (`None`: no such source).
    host: Option<Arc<dyn HostSignals>>,
    config: PressureSection,
    thresholds: PressureThresholds,
    trackers: Mutex<HashMap<DeviceId, DeviceTracker>>,
    history: Mutex<VecDeque<PressureEvent>>,
    events: broadcast::Sender<PressureEvent>,
    /// Host PSI trigger: `Ok(fired count)` while registered, `Err(reason)` when the kernel
    /// refused or there is none.
    trigger: Mutex<Result<Arc<AtomicU64>, String>>,
}

struct DeviceTracker {
    tracker: Tracker,
    psi_some_total_us: Option<u64>,
    sampled_at: Option<OffsetDateTime>,
}

impl PressureMonitor {
    /// A monitor over the service's devices and the host's signals; [`PressureMonitor::start`]
    /// starts its threads.
    pub fn new(
        service: Arc<Service>,
        host: Option<Arc<dyn HostSignals>>,
        config: PressureSection,
    ) -> Arc<PressureMonitor> {
        Arc::new(PressureMonitor {
            service,
            host,
            thresholds: config.thresholds,
            config,
            trackers: Mutex::new(HashMap::new()),
            history: Mutex::new(VecDeque::new()),
            events: broadcast::channel(1024).0,
            trigger: Mutex::new(Err("not started".into())),
        })
    }

    pub fn thresholds(&self) -> PressureThresholds {
        self.thresholds
    }

    /// Takes one sample of `device` and updates its level (the sampler calls this).
    pub fn sample(&self, device: DeviceId, epoch: Instant) -> Option<PressureEvent> {
        let backend = self.service.backend(device)?;
        let (total, available) = match backend.sample() {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(device = %device, error = %e, "pressure sample failed");
                return None;
            }
        };
        let host = self.host.as_ref().filter(|_| device == DeviceId::Cpu);
        let psi = host.and_then(|h| h.pressure_stall());
        let sample = Sample {
            at_secs: epoch.elapsed().as_secs_f64(),
            total_bytes: total,
            available_bytes: available,
            psi_some10: psi.map(|p| p.some_avg10),
            psi_full10: psi.map(|p| p.full_avg10),
            limit_events: host.and_then(|h| h.limit_events()),
        };
        let change = {
            let mut trackers = lock(&self.trackers);
            let t = trackers.entry(device).or_insert_with(|| DeviceTracker {
                tracker: Tracker::new(self.thresholds),
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
            let mut h = lock(&self.history);
            h.push_back(event.clone());
            while h.len() > self.config.history_size.max(1) {
                h.pop_front();
            }
        }
        let _ = self.events.send(event.clone());
        Some(event)
    }

    /// Subscribes to level changes.
    pub fn subscribe(&self) -> broadcast::Receiver<PressureEvent> {
        self.events.subscribe()
    }

    /// The last level changes, oldest first.
    pub fn history(&self) -> Vec<PressureEvent> {
        lock(&self.history).iter().cloned().collect()
    }

    /// The level of `device` now (`low` before its first sample).
    pub fn level(&self, device: DeviceId) -> Level {
        lock(&self.trackers).get(&device).map(|t| t.tracker.level()).unwrap_or(Level::Low)
    }

    /// Pressure of one device now (sampling it if the monitor has not yet).
    pub fn report(&self, device: DeviceId) -> Result<PressureReport, ServiceError> {
        let status = self.service.status(device)?;
        if !lock(&self.trackers).contains_key(&device) {
            self.sample(device, Instant::now());
        }
        let trackers = lock(&self.trackers);
        let t = trackers.get(&device);
        let last = t.and_then(|t| t.tracker.last().copied());
        Ok(PressureReport {
            device,
            level: t.map(|t| t.tracker.level()).unwrap_or(Level::Low),
            pressure_level: t.map(|t| t.tracker.pressure_level()).unwrap_or(0),
            utilization: last.map(|s| s.utilization()).unwrap_or_else(|| status.utilization()),
            available_bytes: last.map(|s| s.available_bytes).unwrap_or(status.available_bytes),
            total_bytes: last.map(|s| s.total_bytes).unwrap_or(status.total_bytes),
            thresholds: self.thresholds,
            time_to_critical_secs: t.and_then(|t| t.tracker.time_to_critical()),
            psi_some10: last.and_then(|s| s.psi_some10),
            psi_full10: last.and_then(|s| s.psi_full10),
            psi_some_total_us: t.and_then(|t| t.psi_some_total_us),
            limit_events: last.and_then(|s| s.limit_events),
            allocation_failures: self.service.allocation_failures(device),
            psi_trigger: (device == DeviceId::Cpu).then(|| match &*lock(&self.trigger) {
                Ok(n) => Ok(n.load(Ordering::Relaxed)),
                Err(e) => Err(e.clone()),
            }),
            sampled_at: t.and_then(|t| t.sampled_at),
        })
    }
}
