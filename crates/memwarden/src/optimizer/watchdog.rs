//! The watchdog: on a device reaching `high` it runs the balanced ladder, on `critical` the
//! aggressive one, at most once per `cooldown_ms` per device and level (a rise to a higher
//! level runs at once).

use super::{OptimizeRequest, Optimizer};
use crate::pressure::PressureEvent;
use crate::sync::lock;
use memwarden_core::eviction::EvictionStrategy;
use memwarden_core::pressure::Level;
use memwarden_core::DeviceId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast::{self, error::RecvError};

/// The optimizer's watchdog. Owns, per device, when it last ran the ladder and for which level
/// (its cooldown, behind its own lock), and the task that listens to pressure events; the
/// ladder it runs is the [`Optimizer`]'s.
pub(super) struct Watchdog {
    optimizer: Arc<Optimizer>,
    /// Per device: when the watchdog last ran, and for which level.
    last_auto: Mutex<HashMap<DeviceId, (Instant, Level)>>,
}

impl Watchdog {
    /// Runs `optimizer`'s ladder on the pressure changes `events` brings (when the watchdog is
    /// on).
    pub(super) fn start(optimizer: &Arc<Optimizer>, mut events: broadcast::Receiver<PressureEvent>) {
        if !optimizer.config.watchdog {
            return;
        }
        let me = Arc::new(Watchdog { optimizer: optimizer.clone(), last_auto: Mutex::new(HashMap::new()) });
        tokio::spawn(async move {
            loop {
                let event = match events.recv().await {
                    Ok(e) => e,
                    Err(RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                };
                if event.new < Level::High || event.new <= event.old {
                    continue;
                }
                let strategy = if event.new >= Level::Critical {
                    EvictionStrategy::Aggressive
                } else {
                    EvictionStrategy::Balanced
                };
                if !me.cooled_down(&event) {
                    tracing::info!(device = %event.device, "pressure {} but the optimizer is cooling down", event.new.as_str());
                    continue;
                }
                let optimizer = me.optimizer.clone();
                tokio::spawn(async move {
                    let mut req = OptimizeRequest::new(event.device, strategy, "watchdog", &optimizer.config);
                    // Not forced: a level that fell back before the run needs nothing freed
                    // (a forced run below the target would still release a model).
                    req.target_pressure_level = optimizer.config.target_pressure_level;
                    optimizer.run(req).await;
                });
            }
        });
    }

    /// The cooldown keeps a device hovering at one level from thrashing; a rise to a higher
    /// level than the last run's does not wait. Records the run when it may go.
    fn cooled_down(&self, event: &PressureEvent) -> bool {
        let mut last = lock(&self.last_auto);
        let cooldown = Duration::from_millis(self.optimizer.config.cooldown_ms);
        if last.get(&event.device).is_some_and(|(t, l)| t.elapsed() < cooldown && event.new <= *l) {
            return false;
        }
        last.insert(event.device, (Instant::now(), event.new));
        true
    }
}
