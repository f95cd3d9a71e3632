//! Transfers and copies: bytes between allocations on any devices, or into a new allocation.

use super::allocations::blocking;
use super::App;
use crate::service::{ServiceError, TransferRecord, TransferRequest};

/// Starts or runs a transfer; a running one (answered at once, finished on the service's transfer
/// thread) is followed with [`status`].
pub fn transfer(app: &App, req: TransferRequest) -> Result<TransferRecord, ServiceError> {
    let service = app.service.clone();
    blocking(move || service.transfer(req))
}

pub fn status(app: &App, transfer_id: &str) -> Result<TransferRecord, ServiceError> {
    app.service.transfer_status(transfer_id)
}
