//! `/api/memory/transfer…` and `/api/memory/copy` (a transfer that only copies): bytes between
//! allocations, on any devices.

use super::dto::*;
use super::envelope::{ApiError, ApiJson, ApiResponse, Data};
use super::{ApiResult, AppState};
use crate::app::transfers as use_case;
use crate::app::{TransferRequest, TransferStatus, TransferTarget};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;

fn non_negative(v: Option<i64>, field: &'static str) -> Result<Option<u64>, ApiError> {
    match v {
        Some(x) if x < 0 => Err(ApiError::invalid(format!("{field}: must not be negative (got {x})"))),
        Some(x) => Ok(Some(x as u64)),
        None => Ok(None),
    }
}

fn parse_transfer(body: TransferBody, copy_only: bool) -> Result<TransferRequest, ApiError> {
    let source_id = body.source_allocation_id.ok_or_else(|| ApiError::invalid("sourceAllocationId: required"))?;
    let move_source = match body.transfer_type.as_deref() {
        None | Some("copy") => false,
        Some("move") if !copy_only => true,
        Some("move") => {
            return Err(ApiError::invalid(
                "transferType: /api/memory/copy only copies; use /api/memory/transfer to move",
            ))
        }
        Some(other) => return Err(ApiError::invalid(format!("transferType: '{other}' is not copy or move"))),
    };
    let size_bytes = non_negative(body.size_bytes, "sizeBytes")?;
    if size_bytes == Some(0) {
        return Err(ApiError::invalid("sizeBytes: must be greater than 0"));
    }
    let target = match (body.destination_allocation_id, body.target_device_id) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "targetDeviceId: give either destinationAllocationId or targetDeviceId, not both",
            ))
        }
        (Some(id), None) => TransferTarget::Allocation {
            id,
            offset: non_negative(body.destination_offset, "destinationOffset")?.unwrap_or(0),
        },
        (None, Some(_)) if copy_only => {
            return Err(ApiError::invalid(
                "destinationAllocationId: required (copy works between existing allocations)",
            ))
        }
        (None, Some(device)) => TransferTarget::NewOn {
            device,
            kind: match body.target_memory_type.as_deref() {
                None => None,
                Some(t) => Some(t.parse().map_err(|e| ApiError::invalid(format!("targetMemoryType: {e}")))?),
            },
        },
        (None, None) => return Err(ApiError::invalid("destinationAllocationId: required (or targetDeviceId)")),
    };
    Ok(TransferRequest {
        source_id,
        source_offset: non_negative(body.source_offset, "sourceOffset")?.unwrap_or(0),
        target,
        size_bytes,
        move_source,
    })
}

fn transfer_response(state: &AppState, req: TransferRequest) -> Result<(StatusCode, Data<TransferDto>), ApiError> {
    let record = use_case::transfer(&state.app, req)?;
    let status = if record.status == TransferStatus::Running { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((status, Data(TransferDto::from(&record))))
}

/// Copies or moves bytes from one allocation into another, or into a new allocation on
/// `targetDeviceId`. Up to `transfer.sync_max_bytes` (64 MiB) it answers when done (200);
/// larger transfers answer 202 with `status: running` and a `transferId` to poll.
#[utoipa::path(
    post, path = "/api/memory/transfer", request_body = TransferBody,
    responses(
        (status = 200, body = ApiResponse<TransferDto>), (status = 202, body = ApiResponse<TransferDto>),
        (status = 400, description = "INVALID_ARGUMENT, naming the field"), (status = 404, description = "ALLOCATION_NOT_FOUND"),
        (status = 500, description = "TRANSFER_FAILED"), (status = 507, description = "INSUFFICIENT_MEMORY, or QUOTA_EXCEEDED (the source's owner), for a new destination")
    )
)]
pub async fn transfer(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<TransferBody>,
) -> Result<impl IntoResponse, ApiError> {
    transfer_response(&state, parse_transfer(body, false)?)
}

/// A transfer's status, progress, bytes done and achieved bytes/s.
#[utoipa::path(
    get, path = "/api/memory/transfer/{transferId}", params(("transferId" = String, Path)),
    responses((status = 200, body = ApiResponse<TransferDto>), (status = 404, description = "TRANSFER_NOT_FOUND"))
)]
pub async fn transfer_status(State(state): State<AppState>, Path(transfer_id): Path<String>) -> ApiResult<TransferDto> {
    Ok(Data(TransferDto::from(&use_case::status(&state.app, &transfer_id)?)))
}

/// Copies bytes between two existing allocations (same fields as a transfer).
#[utoipa::path(
    post, path = "/api/memory/copy", request_body = TransferBody,
    responses(
        (status = 200, body = ApiResponse<TransferDto>), (status = 202, body = ApiResponse<TransferDto>),
        (status = 400, description = "INVALID_ARGUMENT"), (status = 404, description = "ALLOCATION_NOT_FOUND")
    )
)]
pub async fn copy(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<TransferBody>,
) -> Result<impl IntoResponse, ApiError> {
    transfer_response(&state, parse_transfer(body, true)?)
}
