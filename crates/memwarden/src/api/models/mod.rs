//! `/api/memory/models…`: the models on every device (what the Python processes that hold
//! models report, next to what the OS and the driver say those processes hold, and the weights
//! memwarden holds), unload and move. Loads ([`load`]), the optimizer ([`optimize`]) and a
//! held model's park, resume and drop ([`residency`]) have files of their own.

pub mod load;
pub mod optimize;
pub mod residency;

use super::envelope::{ApiError, ApiJson, ApiQuery, ApiResponse, Data};
use super::{ApiResult, AppState};
use crate::app::allocations::resolve;
use crate::app::residency::{self as use_case, Moved};
use crate::app::{models, AdmissionError, SupervisorError};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use memwarden_protocol::api::{ModelsDto, MoveBody, MovedDto, UnloadedDto};
use memwarden_protocol::codes;
use serde::Deserialize;

impl From<SupervisorError> for ApiError {
    fn from(e: SupervisorError) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            SupervisorError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "WORKER_UNAVAILABLE"),
            SupervisorError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "TIMEOUT"),
            SupervisorError::ModelNotFound(_) => (StatusCode::NOT_FOUND, "MODEL_NOT_FOUND"),
            SupervisorError::Invalid(_) => (StatusCode::BAD_GATEWAY, "WORKER_ERROR"),
            SupervisorError::Worker { code, message, .. } => match code.as_str() {
                codes::FILE_NOT_FOUND => (StatusCode::NOT_FOUND, "FILE_NOT_FOUND"),
                codes::MODEL_NOT_FOUND => (StatusCode::NOT_FOUND, "MODEL_NOT_FOUND"),
                codes::INVALID_DATA => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
                codes::DEVICE_UNAVAILABLE => (StatusCode::CONFLICT, "DEVICE_UNAVAILABLE"),
                codes::NOT_SUPPORTED => (StatusCode::CONFLICT, "NOT_SUPPORTED"),
                codes::LOAD_FAILED if message.to_ascii_lowercase().contains("out of memory") => {
                    (StatusCode::INSUFFICIENT_STORAGE, "INSUFFICIENT_MEMORY")
                }
                codes::LOAD_FAILED => (StatusCode::UNPROCESSABLE_ENTITY, "LOAD_FAILED"),
                _ => (StatusCode::BAD_GATEWAY, "WORKER_ERROR"),
            },
        };
        ApiError::new(status, code, message)
    }
}

impl From<AdmissionError> for ApiError {
    fn from(e: AdmissionError) -> Self {
        match e {
            AdmissionError::InsufficientMemory(message) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "INSUFFICIENT_MEMORY", message)
            }
            AdmissionError::Service(e) => e.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelsQuery {
    device_id: Option<String>,
}

/// Every model held by every worker and attached client, per device, with each device's system
/// status and, per worker, what the OS and NVML say it holds (`unattributedBytes` is the rest).
/// With no worker or client to ask (none configured, attached or ready), the listing still
/// answers: system memory only, `coordinationStatus.mode` `fallback` with the reason. A worker
/// still `starting` is waited for, at most `workers.ready_wait_ms`.
#[utoipa::path(
    get, path = "/api/memory/models", params(("deviceId" = Option<String>, Query, description = "only this device")),
    responses(
        (status = 200, body = ApiResponse<ModelsDto>,
            description = "the models; `coordinationStatus.mode` `fallback` (system memory only, with the reason) when no worker can be asked"),
        (status = 404, description = "DEVICE_NOT_FOUND: `deviceId` names no device of this host"),
        (status = 502, description = "WORKER_ERROR: every connected worker answered with an error"),
        (status = 503, description = "BACKEND_UNAVAILABLE: `deviceId` names a device whose backend is not available here"),
        (status = 504, description = "TIMEOUT: the connected workers did not answer in time")
    )
)]
pub async fn list_models(State(state): State<AppState>, ApiQuery(q): ApiQuery<ModelsQuery>) -> ApiResult<ModelsDto> {
    let device = q.device_id.as_deref().map(|d| resolve(&state.app, d)).transpose()?;
    Ok(Data(models::list(&state.app, device).await?))
}

/// Unloads a model from the process that holds it (a worker, or a client through its callback).
#[utoipa::path(
    delete, path = "/api/memory/models/{modelId}", params(("modelId" = String, Path)),
    responses(
        (status = 200, body = ApiResponse<UnloadedDto>), (status = 404, description = "MODEL_NOT_FOUND"),
        (status = 409, description = "NOT_SUPPORTED: a client's pinned or callback-less model"),
        (status = 503, description = "WORKER_UNAVAILABLE"), (status = 504, description = "TIMEOUT")
    )
)]
pub async fn unload_model(State(state): State<AppState>, Path(model_id): Path<String>) -> ApiResult<UnloadedDto> {
    let u = use_case::unload(&state.app, &model_id).await?;
    Ok(Data(UnloadedDto {
        model_id,
        worker_id: u.worker_id,
        device_id: u.device_id,
        freed_bytes: u.freed_bytes,
        process_bytes_before: u.process_bytes_before,
        process_bytes_after: u.process_bytes_after,
    }))
}

/// Moves a model that a supervised worker loaded from a file to another device: loads it there
/// first (through admission, like any load), then unloads it from where it was. If the load
/// fails, the model stays where it was. The moved model gets a new id.
#[utoipa::path(
    post, path = "/api/memory/models/{modelId}/move", params(("modelId" = String, Path)), request_body = MoveBody,
    responses(
        (status = 200, body = ApiResponse<MovedDto>), (status = 400, description = "INVALID_ARGUMENT (already there)"),
        (status = 404, description = "MODEL_NOT_FOUND / DEVICE_NOT_FOUND"),
        (status = 409, description = "INVALID_OPERATION: not a worker's file-backed model"),
        (status = 503, description = "WORKER_UNAVAILABLE"), (status = 507, description = "INSUFFICIENT_MEMORY")
    )
)]
pub async fn move_model(
    State(state): State<AppState>,
    Path(model_id): Path<String>,
    ApiJson(body): ApiJson<MoveBody>,
) -> ApiResult<MovedDto> {
    let target = resolve(&state.app, &body.target_device_id)?;
    Ok(Data(match use_case::move_model(&state.app, &model_id, target).await? {
        Moved::Held { model, previous_device, freed_bytes } => MovedDto {
            model: residency::as_loaded(&model, &use_case::held_dto(&state.app, &model)),
            previous_model_id: model_id,
            previous_device_id: previous_device.to_string(),
            freed_bytes,
        },
        Moved::Worker { model, previous_device_id, freed_bytes } => {
            MovedDto { model: *model, previous_model_id: model_id, previous_device_id, freed_bytes }
        }
    }))
}
