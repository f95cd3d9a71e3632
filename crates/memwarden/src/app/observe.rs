//! What the daemon observes, read without changing anything: pressure levels, their history
//! and changes, analytics over a window, the allocation event log, recommendations, the
//! Prometheus exposition, and the operations running in the background.

use super::allocations::blocking;
use super::App;
use crate::analytics::metrics::HttpMetrics;
use crate::operations::Operation;
use crate::pressure::{PressureEvent, PressureReport};
use crate::service::ServiceError;
use memwarden_core::DeviceId;
use memwarden_protocol::api::analytics::{AnalyticsDto, EventListDto, RecommendationsDto, UsageDto};
use memwarden_protocol::api::{OperationKind, OptimizeOutcome};
use std::sync::Arc;
use time::OffsetDateTime;
use tokio::sync::broadcast;

/// A device's pressure now, with the actions the advice recommends for it.
pub struct Pressure {
    pub report: PressureReport,
    pub actions: Vec<String>,
}

/// The pressure of `device` (every device without one), each with its recommended actions.
pub fn pressure(app: &App, device: Option<DeviceId>) -> Result<Vec<Pressure>, ServiceError> {
    let devices = device.map_or_else(|| app.service.device_ids(), |d| vec![d]);
    let reports: Vec<PressureReport> = devices.into_iter().map(|d| app.pressure.report(d)).collect::<Result<_, _>>()?;
    let actions = app.analytics.pressure_actions(&reports.iter().collect::<Vec<_>>());
    Ok(reports.into_iter().zip(actions).map(|(report, actions)| Pressure { report, actions }).collect())
}

pub fn pressure_history(app: &App) -> Vec<PressureEvent> {
    app.pressure.history()
}

/// Pressure level changes as they happen.
pub fn pressure_changes(app: &App) -> broadcast::Receiver<PressureEvent> {
    app.pressure.subscribe()
}

/// Held models' state changes as they happen (loads, parks, resumes, drops, unloads).
pub fn model_states(app: &App) -> broadcast::Receiver<memwarden_protocol::api::ModelStateEventDto> {
    app.weights.subscribe()
}

/// Optimizer runs as they end (watchdog, manual, admission).
pub fn optimizer_runs(app: &App) -> broadcast::Receiver<OptimizeOutcome> {
    app.optimizer.subscribe()
}

/// A window's length in ms from its text (`30s`, `15m`, `1h`, `1d`), within what history keeps.
pub fn window_ms(app: &App, text: &str) -> Result<u64, ServiceError> {
    app.analytics.parse_window(text)
}

pub fn usage(app: &App, device: Option<DeviceId>, window_ms: u64) -> Result<Vec<UsageDto>, ServiceError> {
    blocking(|| app.analytics.usage(device, window_ms))
}

pub fn analytics(app: &App, window_ms: u64, window_text: &str) -> Result<AnalyticsDto, ServiceError> {
    blocking(|| app.analytics.analytics(window_ms, window_text))
}

/// Starts the peaks afresh; when.
pub fn reset_peaks(app: &App) -> OffsetDateTime {
    app.analytics.reset_peaks()
}

pub fn events(app: &App, device: Option<DeviceId>, limit: usize) -> EventListDto {
    app.analytics.events(device, limit)
}

pub fn recommendations(app: &App) -> Result<RecommendationsDto, ServiceError> {
    blocking(|| app.analytics.recommendations())
}

/// The Prometheus text exposition, with the HTTP latencies `http` counted.
pub fn metrics(app: &App, http: &HttpMetrics) -> Result<String, std::fmt::Error> {
    let weights = app.weights.list();
    let pool = app.weights.park_pool_stats();
    blocking(|| app.analytics.render_metrics(http, &weights, Some(pool)))
}

/// Starts tracking a background operation.
pub fn start_operation(app: &App, kind: OperationKind, device: Option<String>) -> Arc<Operation> {
    app.operations.start(kind, device)
}

pub fn operation(app: &App, id: &str) -> Option<Arc<Operation>> {
    app.operations.get(id)
}

pub fn operations(app: &App) -> Vec<Arc<Operation>> {
    app.operations.list()
}
