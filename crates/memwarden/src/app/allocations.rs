//! Allocations: allocate (placed where the request names, else where placement says), free,
//! look up, list, export, and read and write their bytes.

use super::App;
use crate::service::{
    AllocateRequest, Allocation, AllocationFilter, AllocationPage, ExportInfo, ExportVia, FreedAllocation,
    ListPosition, ServiceError,
};
use memwarden_core::DeviceId;
use time::OffsetDateTime;

/// Runs blocking service work (page commits, munmap: milliseconds per GiB) on this thread after
/// handing the async worker's other tasks to another thread. That costs about 10 µs, so the
/// microsecond paths (pool hits, reservations, frees into shared blocks) run inline instead.
/// Outside a multi-threaded runtime (a plain thread) it just runs `f`.
pub(super) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Allocates `req` on the device `device` names, or, without one, on the device placement
/// picks for its kind. `req.device` is replaced by the decision.
pub fn allocate(app: &App, device: Option<&str>, mut req: AllocateRequest) -> Result<Allocation, ServiceError> {
    req.device = app.placement.device_for_allocation(device, req.kind)?.to_string();
    // Checked and placed once; only an allocation that needs new memory (page commits, a
    // driver call) leaves the async worker.
    match app.service.allocate_or_defer(req)? {
        Ok(record) => Ok(record),
        Err(pending) => blocking(|| app.service.allocate_pending(pending)),
    }
}

/// Frees an allocation; what it held comes back.
pub fn free(app: &App, allocation_id: &str) -> Result<FreedAllocation, ServiceError> {
    if app.service.free_is_quick(allocation_id) {
        app.service.free(allocation_id)
    } else {
        blocking(|| app.service.free(allocation_id))
    }
}

pub fn get(app: &App, allocation_id: &str) -> Result<Allocation, ServiceError> {
    app.service.allocation(allocation_id)
}

/// One page of the live allocations that match `filter`, after `after`.
pub fn page(app: &App, filter: &AllocationFilter, after: Option<&ListPosition>, limit: usize) -> AllocationPage {
    app.service.allocation_page(filter, after, limit)
}

/// When this run of the daemon started: listing cursors name it.
pub fn run_started_at(app: &App) -> OffsetDateTime {
    app.service.started_at()
}

/// Shares an allocation with another process (it is never moved afterwards). May wait for a
/// defragmentation batch that is moving it.
pub fn export(app: &App, allocation_id: &str, via: ExportVia) -> Result<ExportInfo, ServiceError> {
    blocking(|| app.service.export(allocation_id, via))
}

pub fn read(app: &App, allocation_id: &str, offset: u64, length: u64) -> Result<Vec<u8>, ServiceError> {
    blocking(|| app.service.read_bytes(allocation_id, offset, length))
}

pub fn write(app: &App, allocation_id: &str, offset: u64, data: &[u8]) -> Result<(), ServiceError> {
    blocking(|| app.service.write_bytes(allocation_id, offset, data))
}

/// The device a request names (`cpu`, `cuda:N`, or an alias).
pub fn resolve(app: &App, text: &str) -> Result<DeviceId, ServiceError> {
    app.service.resolve(text)
}
