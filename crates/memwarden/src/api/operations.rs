//! Operations run in the background: a model load or a defragmentation asked for with
//! `"async": true` answers 202 with the operation at once; `GET /api/memory/operations/{id}`
//! follows its progress and, once it ends, gives the synchronous request's answer (`result`) or
//! its error.

use super::envelope::{ApiError, ApiResponse, Data};
use super::{ApiResult, AppState};
use crate::operations::{Operation, Progress, FINISHED_KEPT, KEEP_FOR};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use memwarden_core::defrag::DefragOptions;
use memwarden_core::DeviceId;
use memwarden_protocol::api::{DefragAllDto, DefragDto, OperationDto, OperationKind, OperationResult, OperationsDto};
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
    match state.operations.get(&operation_id) {
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
    Ok(Data(OperationsDto { operations: state.operations.list().iter().map(|op| op.dto()).collect() }))
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

/// Starts a defragmentation of `device` (every device when `None`) in the background: bytes
/// moved against bytes planned, summed over the devices done so far.
pub fn start_defragment(
    state: AppState,
    device: Option<DeviceId>,
    options: DefragOptions,
    max_time: Option<Duration>,
) -> Response {
    let op = state.operations.start(OperationKind::Defragment, device.map(|d| d.to_string()));
    let progress = op.progress();
    let one = device.is_some();
    let devices = device.map_or_else(|| state.service.device_ids(), |d| vec![d]);
    spawn(op.clone(), async move {
        let service = state.service.clone();
        let reports = tokio::task::spawn_blocking(move || defragment(&service, &devices, options, max_time, &progress))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", e.to_string()))??;
        let devices: Vec<DefragDto> = reports.iter().map(DefragDto::from).collect();
        Ok(match (one, devices.as_slice()) {
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

fn defragment(
    service: &crate::service::Service,
    devices: &[DeviceId],
    options: DefragOptions,
    max_time: Option<Duration>,
    progress: &Progress,
) -> Result<Vec<crate::service::DefragReport>, ApiError> {
    let mut reports = Vec::new();
    // What the devices already done moved.
    let mut before = 0;
    for d in devices {
        let report = service.defragment_with_progress(*d, options, max_time, &mut |moved, planned| {
            progress.set(before + moved, before + planned)
        })?;
        before += report.bytes_moved;
        reports.push(report);
    }
    Ok(reports)
}
