//! `/api/memory/pools…`: memwarden's pools, their blocks and free ranges.

use super::dto::*;
use super::envelope::{ApiError, ApiResponse, Data};
use super::{ApiResult, AppState};
use crate::app::{allocations, devices, pools};
use axum::extract::{Path, State};

/// Every pool block of every device with its used and free ranges (for drawing).
#[utoipa::path(get, path = "/api/memory/pools", responses((status = 200, body = ApiResponse<PoolsDto>)))]
pub async fn pools_all(State(state): State<AppState>) -> ApiResult<PoolsDto> {
    let devices = devices::device_ids(&state.app)
        .into_iter()
        .map(|d| Ok(device_pools(d, &pools::pools(&state.app, d)?)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Data(PoolsDto { devices }))
}

/// The pool blocks of one device.
#[utoipa::path(
    get, path = "/api/memory/pools/{deviceId}", params(("deviceId" = String, Path)),
    responses((status = 200, body = ApiResponse<DevicePoolsDto>), (status = 404, description = "DEVICE_NOT_FOUND"))
)]
pub async fn pools_device(State(state): State<AppState>, Path(device_id): Path<String>) -> ApiResult<DevicePoolsDto> {
    let id = allocations::resolve(&state.app, &device_id)?;
    Ok(Data(device_pools(id, &pools::pools(&state.app, id)?)))
}
