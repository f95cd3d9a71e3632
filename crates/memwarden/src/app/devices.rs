//! Devices: what the daemon runs on (health), each device's memory status read from the OS or
//! driver, whether a size fits now, and the allocations' owners with their quotas.

use super::allocations::blocking;
use super::App;
use crate::service::{BackendHealth, CanAllocate, DeviceStatus, OwnersReport, ServiceError};
use crate::supervisor::Slot;
use memwarden_core::{DeviceId, MemoryKind};
use std::sync::Arc;
use time::OffsetDateTime;

/// The daemon's own facts: when it started, its devices and backends, its workers.
pub struct Health {
    pub started_at: OffsetDateTime,
    pub devices: Vec<DeviceId>,
    pub backends: Vec<BackendHealth>,
    pub workers_enabled: bool,
    pub workers: Vec<Arc<Slot>>,
    /// Why no worker is ready, when none is.
    pub workers_unavailable: Option<String>,
}

pub fn health(app: &App) -> Health {
    let workers = app.supervisor.slots();
    let ready = workers.iter().any(|s| s.conn().is_some());
    Health {
        started_at: app.service.started_at(),
        devices: app.service.device_ids(),
        backends: app.service.backends().to_vec(),
        workers_enabled: app.supervisor.config().enabled,
        workers_unavailable: (!ready).then(|| app.supervisor.unavailable_reason()),
        workers,
    }
}

pub fn device_ids(app: &App) -> Vec<DeviceId> {
    app.service.device_ids()
}

pub fn backends(app: &App) -> Vec<BackendHealth> {
    app.service.backends().to_vec()
}

/// Memory status of every device (sample at most 100 ms old).
pub fn status_all(app: &App) -> Result<Vec<DeviceStatus>, ServiceError> {
    app.service.status_all()
}

pub fn status(app: &App, device: DeviceId) -> Result<DeviceStatus, ServiceError> {
    app.service.status(device)
}

/// Whether `size_bytes` of `kind` fit on `device` now: in the pool, in new memory, or not at all.
pub fn can_allocate(
    app: &App,
    device: DeviceId,
    size_bytes: u64,
    kind: Option<MemoryKind>,
) -> Result<CanAllocate, ServiceError> {
    blocking(|| app.service.can_allocate(device, size_bytes, kind))
}

/// What each allocation owner holds per device and kind, with the quotas.
pub fn owners(app: &App) -> OwnersReport {
    app.service.owners()
}
