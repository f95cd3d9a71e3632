//! Defragmentation and pool routes.

use super::dto::*;
use super::envelope::{ApiError, ApiResponse, Data, OptionalJson};
use super::{blocking, ApiResult, AppState};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use memwarden_core::defrag::{DefragOptions, DefragStrategy};
use memwarden_protocol::api::OperationDto;
use std::time::Duration;

fn parse_defrag(b: &DefragBody) -> Result<(DefragOptions, Option<Duration>), ApiError> {
    let strategy = match &b.strategy {
        None => DefragStrategy::Balanced,
        Some(t) => t.parse().map_err(|e: String| ApiError::invalid(format!("strategy: {e}")))?,
    };
    Ok((
        DefragOptions {
            strategy,
            max_bytes_to_move: b.max_bytes_to_move.unwrap_or(u64::MAX),
            max_allocations_to_move: b.max_allocations_to_move.map(|n| n as usize).unwrap_or(usize::MAX),
        },
        b.max_time_ms.map(Duration::from_millis),
    ))
}

/// Defragments every device: moves movable allocations (never exported or `movable: false`
/// ones) to compact the pools, then returns emptied blocks to the OS or driver. With
/// `"async": true` it answers 202 with the operation at once (`Location`: where to follow it).
#[utoipa::path(
    post, path = "/api/memory/operations/defragment", request_body(content = Option<DefragBody>),
    responses(
        (status = 200, body = ApiResponse<DefragAllDto>),
        (status = 202, body = ApiResponse<OperationDto>, description = "`async`: the operation, running",
            headers(("Location" = String, description = "/api/memory/operations/{operationId}"))),
        (status = 400, description = "INVALID_ARGUMENT")
    )
)]
pub async fn defragment_all(
    State(state): State<AppState>,
    OptionalJson(body): OptionalJson<DefragBody>,
) -> Result<Response, ApiError> {
    let (options, max_time) = parse_defrag(&body)?;
    if body.run_async {
        return Ok(super::operations::start_defragment(state, None, options, max_time));
    }
    let reports = blocking(|| {
        state
            .service
            .device_ids()
            .into_iter()
            .map(|d| state.service.defragment(d, options, max_time))
            .collect::<Result<Vec<_>, _>>()
    })?;
    Ok(Data(DefragAllDto {
        bytes_moved: reports.iter().map(|r| r.bytes_moved).sum(),
        bytes_released: reports.iter().map(|r| r.bytes_released).sum(),
        devices: reports.iter().map(DefragDto::from).collect(),
    })
    .into_response())
}

/// Defragments one device (fields as for all devices; `"async": true` answers 202 with the
/// operation).
#[utoipa::path(
    post, path = "/api/memory/operations/defragment/{deviceId}", params(("deviceId" = String, Path)),
    request_body(content = Option<DefragBody>),
    responses(
        (status = 200, body = ApiResponse<DefragDto>),
        (status = 202, body = ApiResponse<OperationDto>, description = "`async`: the operation, running",
            headers(("Location" = String, description = "/api/memory/operations/{operationId}"))),
        (status = 400, description = "INVALID_ARGUMENT"),
        (status = 404, description = "DEVICE_NOT_FOUND")
    )
)]
pub async fn defragment_device(
    State(state): State<AppState>,
    Path(device_id): Path<String>,
    OptionalJson(body): OptionalJson<DefragBody>,
) -> Result<Response, ApiError> {
    let id = state.service.resolve(&device_id)?;
    let (options, max_time) = parse_defrag(&body)?;
    if body.run_async {
        return Ok(super::operations::start_defragment(state, Some(id), options, max_time));
    }
    let report = blocking(|| state.service.defragment(id, options, max_time))?;
    Ok(Data(DefragDto::from(&report)).into_response())
}

/// Every pool block of every device with its used and free ranges (for drawing).
#[utoipa::path(get, path = "/api/memory/pools", responses((status = 200, body = ApiResponse<PoolsDto>)))]
pub async fn pools_all(State(state): State<AppState>) -> ApiResult<PoolsDto> {
    let devices = state
        .service
        .device_ids()
        .into_iter()
        .map(|d| Ok(device_pools(d, &state.service.pools(d)?)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Data(PoolsDto { devices }))
}

/// The pool blocks of one device.
#[utoipa::path(
    get, path = "/api/memory/pools/{deviceId}", params(("deviceId" = String, Path)),
    responses((status = 200, body = ApiResponse<DevicePoolsDto>), (status = 404, description = "DEVICE_NOT_FOUND"))
)]
pub async fn pools_device(State(state): State<AppState>, Path(device_id): Path<String>) -> ApiResult<DevicePoolsDto> {
    let id = state.service.resolve(&device_id)?;
    Ok(Data(device_pools(id, &state.service.pools(id)?)))
}
