//! memwarden's pools: their blocks and ranges, defragmentation (one device or every device,
//! reporting progress) and giving cached empty blocks back (`clear`).

use super::allocations::blocking;
use super::App;
use crate::operations::Progress;
use crate::service::{ClearOutcome, DefragReport, PoolDump, ServiceError};
use memwarden_core::defrag::DefragOptions;
use memwarden_core::DeviceId;
use std::time::Duration;

pub fn pools(app: &App, device: DeviceId) -> Result<Vec<PoolDump>, ServiceError> {
    app.service.pools(device)
}

/// Defragments `devices` (every device without one) in turn, each within `max_time`;
/// `progress`, when given, counts the bytes moved against the bytes planned over all of them.
pub fn defragment(
    app: &App,
    devices: Option<DeviceId>,
    options: DefragOptions,
    max_time: Option<Duration>,
    progress: Option<&Progress>,
) -> Result<Vec<DefragReport>, ServiceError> {
    let devices = devices.map_or_else(|| app.service.device_ids(), |d| vec![d]);
    blocking(|| {
        let mut reports = Vec::new();
        // What the devices already done moved.
        let mut before = 0;
        for d in devices {
            let report = app.service.defragment_with_progress(d, options, max_time, &mut |moved, planned| {
                if let Some(p) = progress {
                    p.set(before + moved, before + planned)
                }
            })?;
            before += report.bytes_moved;
            reports.push(report);
        }
        Ok(reports)
    })
}

/// Returns the cached empty pool blocks of `device` (every device without one) to the OS or
/// driver.
pub fn clear(app: &App, device: Option<DeviceId>) -> Result<Vec<ClearOutcome>, ServiceError> {
    blocking(|| app.service.clear(device))
}
