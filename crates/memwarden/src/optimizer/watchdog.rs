//! The watchdog: on a device reaching `high` it runs the balanced ladder, on `critical` the
//! aggressive one, at most once per `cooldown_ms` per device and level (a rise to a higher
//! level runs at once).

use super::{OptimizeRequest, Optimizer};
use crate::pressure::PressureEvent;
use crate::util::lock;
use memwarden_core::eviction::EvictionStrategy;
use memwarden_core::pressure::Level;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast::{self, error::RecvError};

impl Optimizer {
    /// Runs the ladder on the pressure changes `events` brings (when the watchdog is on).
    pub fn start_watchdog(self: &Arc<Self>, mut events: broadcast::Receiver<PressureEvent>) {
        if !self.config.watchdog {
            return;
        }
        let me = self.clone();
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
                let me2 = me.clone();
                tokio::spawn(async move {
                    let mut req = OptimizeRequest::new(event.device, strategy, "watchdog", &me2.config);
                    // Not forced: a level that fell back before the run needs nothing freed
                    // (a forced run below the target would still release a model).
                    req.target_pressure_level = me2.config.target_pressure_level;
                    me2.run(req).await;
                });
            }
        });
    }

    /// The cooldown keeps a device hovering at one level from thrashing; a rise to a higher
    /// level than the last run's does not wait. Records the run when it may go.
    fn cooled_down(&self, event: &PressureEvent) -> bool {
        let mut last = lock(&self.last_auto);
        let cooldown = Duration::from_millis(self.config.cooldown_ms);
        if last.get(&event.device).is_some_and(|(t, l)| t.elapsed() < cooldown && event.new <= *l) {
            return false;
        }
        last.insert(event.device, (Instant::now(), event.new));
        true
    }
}
