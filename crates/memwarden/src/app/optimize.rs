//! Optimizing model memory on request (`POST /api/memory/models/optimize`): one device's run, or
//! every pressured device's, most pressured first, under one time limit.

use crate::models::ModelView;
use crate::optimizer::{OptimizeRequest, Optimizer};
use crate::supervisor::Supervisor;
use crate::weights::WeightStore;
use memwarden_core::eviction::EvictionStrategy;
use memwarden_core::DeviceId;
use memwarden_protocol::api::{OptimizeReply, OptimizeRunsDto};
use std::time::{Duration, Instant};

/// A checked request: what to free, where, and within what.
#[derive(Debug, Clone)]
pub struct Order {
    /// `None`: every device above the target or at `high`, most pressured first.
    pub device: Option<DeviceId>,
    pub target_pressure_level: f64,
    pub strategy: EvictionStrategy,
    pub max_models: Option<usize>,
    pub min_memory_to_free: u64,
    pub force: bool,
    pub exclude: Vec<String>,
    /// When not empty, only these models (on `device`) may be released.
    pub only: Vec<String>,
    pub max_time: Duration,
}

/// A request that names models the device does not hold, or names models without a device.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidOrder(pub String);

/// What an optimize request needs of the daemon.
pub struct Optimize<'a> {
    pub optimizer: &'a Optimizer,
    pub supervisor: &'a Supervisor,
    pub weights: &'a WeightStore,
}

/// Runs the release ladder as `order` asks.
pub async fn run(app: &super::App, order: Order) -> Result<OptimizeReply, InvalidOrder> {
    Optimize { optimizer: &app.optimizer, supervisor: &app.supervisor, weights: &app.weights }.run(order).await
}

/// The optimizer's recent runs, newest last.
pub fn history(app: &super::App) -> Vec<memwarden_protocol::api::OptimizeOutcome> {
    app.optimizer.history()
}

impl Optimize<'_> {
    /// Runs the ladder on `order.device`, or on every pressured device in turn (when none is
    /// and the order is forced or names bytes, the most pressured one) until the time is up.
    pub async fn run(&self, order: Order) -> Result<OptimizeReply, InvalidOrder> {
        self.check_models(&order)?;
        if let Some(device) = order.device {
            return Ok(OptimizeReply::Device(self.optimizer.run(self.request(&order, device, order.max_time)).await));
        }
        let forced = order.force || order.min_memory_to_free > 0;
        let devices = self.optimizer.pressured_devices(order.target_pressure_level, forced);
        let deadline = Instant::now() + order.max_time;
        let mut runs = Vec::new();
        for d in devices {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            runs.push(self.optimizer.run(self.request(&order, d, left)).await);
        }
        let names: Vec<String> = runs.iter().map(|r| r.device_id.clone()).collect();
        let message = if runs.is_empty() {
            format!("no device is above the target {} or at high; not forced", order.target_pressure_level)
        } else {
            format!("optimized {}, most pressured first", names.join(", "))
        };
        Ok(OptimizeReply::Devices(OptimizeRunsDto {
            optimization_triggered: runs.iter().any(|r| r.optimization_triggered),
            memory_freed: runs.iter().map(|r| r.memory_freed).sum(),
            models_unloaded: runs.iter().flat_map(|r| r.models_unloaded.iter().cloned()).collect(),
            models_offloaded: runs.iter().flat_map(|r| r.models_offloaded.iter().cloned()).collect(),
            message,
            runs,
        }))
    }

    /// `models` must name models on the order's device: a worker's, a client's or held weights.
    fn check_models(&self, order: &Order) -> Result<(), InvalidOrder> {
        if order.only.is_empty() {
            return Ok(());
        }
        let Some(device) = order.device else {
            return Err(InvalidOrder("models: name the device they are on (deviceId)".into()));
        };
        let mut here: Vec<String> =
            ModelView::snapshot(self.supervisor).facts(device).into_iter().map(|m| m.model_id).collect();
        here.extend(self.weights.models().into_iter().filter(|m| m.device() == device).map(|m| m.id.clone()));
        let missing: Vec<&str> = order.only.iter().filter(|m| !here.contains(m)).map(String::as_str).collect();
        if !missing.is_empty() {
            return Err(InvalidOrder(format!("models: not loaded on {device}: {}", missing.join(", "))));
        }
        Ok(())
    }

    fn request(&self, order: &Order, device: DeviceId, max_time: Duration) -> OptimizeRequest {
        OptimizeRequest {
            target_pressure_level: order.target_pressure_level,
            max_models: order.max_models,
            min_memory_to_free: order.min_memory_to_free,
            force: order.force,
            exclude: order.exclude.clone(),
            only: order.only.clone(),
            max_time,
            ..OptimizeRequest::new(device, order.strategy, "manual", self.optimizer.config())
        }
    }
}
