//! The monitor's threads: the sampler, which reads each device at its interval, and the host's
//! PSI trigger, which wakes a sample the moment tasks stall on memory.

use super::PressureMonitor;
use crate::sync::lock;
use memwarden_core::DeviceId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

impl PressureMonitor {
    /// Starts the sampler thread (once). It stops when the monitor is dropped.
    pub fn start(self: &Arc<Self>) {
        if !self.config.enabled {
            return;
        }
        let weak: Weak<PressureMonitor> = Arc::downgrade(self);
        let host_every = Duration::from_millis(self.config.host_interval_ms.max(1));
        let gpu_every = Duration::from_millis(self.config.gpu_interval_ms.max(1));
        let spawned = std::thread::Builder::new().name("pressure-sampler".into()).spawn(move || {
            let start = Instant::now();
            let mut next: HashMap<DeviceId, Instant> = HashMap::new();
            loop {
                let Some(monitor) = weak.upgrade() else { return };
                let now = Instant::now();
                for id in monitor.service.device_ids() {
                    let due = next.get(&id).is_none_or(|t| *t <= now);
                    if due {
                        monitor.sample(id, start);
                        let every = if id == DeviceId::Cpu { host_every } else { gpu_every };
                        next.insert(id, now + every);
                    }
                }
                let wake = next.values().min().copied().unwrap_or(now + host_every);
                drop(monitor);
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
        let c = &self.config;
        if c.psi_trigger_stall_ms == 0 {
            *lock(&self.trigger) = Err("disabled (pressure.psi_trigger_stall_ms = 0)".into());
            return;
        }
        let spec = format!("some {} {}", c.psi_trigger_stall_ms * 1000, c.psi_trigger_window_ms * 1000);
        let trigger = match self.host.as_ref().map(|h| h.stall_trigger(&spec)) {
            Some(Ok(t)) => t,
            Some(Err(reason)) => {
                tracing::info!("PSI trigger unavailable ({reason}); pressure relies on the sampler");
                *lock(&self.trigger) = Err(reason);
                return;
            }
            None => {
                *lock(&self.trigger) = Err("no host PSI source".into());
                return;
            }
        };
        let fired = Arc::new(AtomicU64::new(0));
        *lock(&self.trigger) = Ok(fired.clone());
        let weak: Weak<PressureMonitor> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("psi-trigger".into()).spawn(move || {
            let epoch = Instant::now();
            loop {
                match trigger.wait(1000) {
                    Ok(fired_now) => {
                        let Some(monitor) = weak.upgrade() else { return };
                        if fired_now {
                            fired.fetch_add(1, Ordering::Relaxed);
                            monitor.sample(DeviceId::Cpu, epoch);
                        }
                    }
                    Err(e) => {
                        if let Some(monitor) = weak.upgrade() {
                            *lock(&monitor.trigger) = Err(e.to_string());
                        }
                        return;
                    }
                }
            }
        });
        if let Err(e) = spawned {
            *lock(&self.trigger) = Err(e.to_string());
        }
    }
}
