//! `/api/memory/operations…`: the operations run on request on every device's pools
//! (`defragment`, `clear`), and those run in the background: a model load or a
//! defragmentation asked for with `"async": true` answers 202 with the operation at once;
//! `GET /api/memory/operations/{id}` follows its progress and, once it ends, gives the
//! synchronous request's answer (`result`) or its error.

use super::dto::*;
use super::envelope::{ApiError, ApiResponse, Data, NoBody, OptionalJson};
use super::{ApiResult, AppState};
use crate::app::observe::{operation, operations, start_operation};
use crate::app::{allocations, pools, Operation, FINISHED_KEPT, KEEP_FOR};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use memwarden_core::defrag::{DefragOptions, DefragStrategy};
use memwarden_core::DeviceId;
use memwarden_protocol::api::{OperationDto, OperationKind, OperationResult, OperationsDto};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// One operation: its status, bytes done and to do, progress (0–1), achieved bytes/s, and once it
/// ended its `result` (the synchronous request's `data`) or its `error` and `errorCode`. Finished
/// operations are kept for 10 minutes, the last 256 at most.
#[utoipa::path(
    get, path = "/api/memory/operations/{operationId}", params(("operationId" = String, Path)),
    responses(
        (status = 200, body = ApiResponse<OperationDto>),
        (status = 404, description = "OPERATION_NOT_FOUND: unknown, or finished long enough ago to be forgotten")
    )
)]
pub async fn get_operation(State(state): State<AppState>, Path(operation_id): Path<String>) -> ApiResult<OperationDto> {
    match operation(&state.app, &operation_id) {
        Some(op) => Ok(Data(op.dto())),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "OPERATION_NOT_FOUND",
            format!(
                "no operation '{operation_id}' (finished ones are kept for {} s, the last {FINISHED_KEPT})",
                KEEP_FOR.as_secs()
            ),
        )),
    }
}

/// The operations running and the recently finished ones, oldest first.
#[utoipa::path(get, path = "/api/memory/operations", responses((status = 200, body = ApiResponse<OperationsDto>)))]
pub async fn list_operations(State(state): State<AppState>) -> ApiResult<OperationsDto> {
    Ok(Data(OperationsDto { operations: operations(&state.app).iter().map(|op| op.dto()).collect() }))
}

/// The 202 answer: the operation, and where to follow it (`Location`).
pub fn accepted(op: &Operation) -> Response {
    let mut response = (StatusCode::ACCEPTED, Data(op.dto())).into_response();
    if let Ok(v) = HeaderValue::from_str(&op.location()) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

/// Runs `work` on a task of its own (a client that hangs up cannot cancel it) and ends `op` with
/// its outcome; a panic fails the operation.
pub fn spawn(op: Arc<Operation>, work: impl Future<Output = Result<OperationResult, ApiError>> + Send + 'static) {
    tokio::spawn(async move {
        match tokio::spawn(work).await {
            Ok(Ok(result)) => op.complete(result),
            Ok(Err(e)) => {
                let kind = op.kind.as_str();
                tracing::info!(operation = %op.id, kind, code = e.code, "operation failed: {}", e.message);
                op.fail(e.code, e.message)
            }
            Err(e) => op.fail("INTERNAL_ERROR", format!("the operation stopped: {e}")),
        }
    });
}

/// Starts a defragmentation of `device` (every device without one) in the background and
/// answers 202 with the operation; its progress counts bytes moved against bytes planned.
fn start_defragment(
    state: AppState,
    device: Option<DeviceId>,
    options: DefragOptions,
    max_time: Option<Duration>,
) -> Response {
    let op = start_operation(&state.app, OperationKind::Defragment, device.map(|d| d.to_string()));
    let progress = op.progress();
    spawn(op.clone(), async move {
        let app = state.app.clone();
        let reports =
            tokio::task::spawn_blocking(move || pools::defragment(&app, device, options, max_time, Some(&progress)))
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", e.to_string()))??;
        let devices: Vec<DefragDto> = reports.iter().map(DefragDto::from).collect();
        Ok(match (device.is_some(), devices.as_slice()) {
            (true, [d]) => OperationResult::Defragment(d.clone()),
            _ => OperationResult::DefragmentAll(DefragAllDto {
                bytes_moved: devices.iter().map(|d| d.bytes_moved).sum(),
                bytes_released: devices.iter().map(|d| d.bytes_released).sum(),
                devices,
            }),
        })
    });
    accepted(&op)
}

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
        return Ok(start_defragment(state, None, options, max_time));
    }
    let reports = pools::defragment(&state.app, None, options, max_time, None)?;
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
    let id = allocations::resolve(&state.app, &device_id)?;
    let (options, max_time) = parse_defrag(&body)?;
    if body.run_async {
        return Ok(start_defragment(state, Some(id), options, max_time));
    }
    let report = pools::defragment(&state.app, Some(id), options, max_time, None)?.remove(0);
    Ok(Data(DefragDto::from(&report)).into_response())
}

/// Returns every cached empty pool block on every device to the OS or driver.
#[utoipa::path(post, path = "/api/memory/operations/clear", responses((status = 200, body = ApiResponse<ClearDto>)))]
pub async fn clear_all(State(state): State<AppState>, _: NoBody) -> ApiResult<ClearDto> {
    Ok(Data(clear_dto(&pools::clear(&state.app, None)?)))
}

/// Returns the cached empty pool blocks of one device to the OS or driver.
#[utoipa::path(
    post, path = "/api/memory/operations/clear/{deviceId}", params(("deviceId" = String, Path)),
    responses((status = 200, body = ApiResponse<ClearDto>), (status = 404, description = "DEVICE_NOT_FOUND"))
)]
pub async fn clear_device(
    State(state): State<AppState>,
    Path(device_id): Path<String>,
    _: NoBody,
) -> ApiResult<ClearDto> {
    let id = allocations::resolve(&state.app, &device_id)?;
    Ok(Data(clear_dto(&pools::clear(&state.app, Some(id))?)))
}
