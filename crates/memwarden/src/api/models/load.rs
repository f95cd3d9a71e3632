//! `POST /api/memory/models/load`: a model loaded from a `.safetensors` file, held by memwarden
//! or by a worker, now or as a background operation.

use super::super::envelope::{ApiError, ApiJson, ApiResponse, Data};
use super::super::operations::{accepted, spawn};
use super::super::AppState;
use crate::app::load;
use crate::app::observe::start_operation;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use memwarden_core::DeviceId;
use memwarden_protocol::api::{LoadBody, LoadedDto, OperationDto, OperationKind, OperationResult};

/// Loads a `.safetensors` model. By default memwarden holds the weights in its own memory
/// (processes map them with `memwarden.client`); with `heldBy: worker`, on the least loaded ready
/// worker that serves the device, waiting for a `starting` one at most `workers.ready_wait_ms`.
/// With `"async": true` the body is checked, then it answers 202 with the operation at once
/// (`Location`: where to follow it); what would have been an error answer fails the operation.
#[utoipa::path(
    post, path = "/api/memory/models/load", request_body = LoadBody,
    responses(
        (status = 200, body = ApiResponse<LoadedDto>),
        (status = 202, body = ApiResponse<OperationDto>, description = "`async`: the operation, running",
            headers(("Location" = String, description = "/api/memory/operations/{operationId}"))),
        (status = 400, description = "INVALID_ARGUMENT"), (status = 404, description = "FILE_NOT_FOUND / DEVICE_NOT_FOUND"),
        (status = 422, description = "LOAD_FAILED / INVALID_MODEL_FILE: not a valid safetensors file (nothing allocated)"),
        (status = 503, description = "WORKER_UNAVAILABLE: `heldBy: worker` and no worker is ready (after waiting for a starting one)"),
        (status = 504, description = "TIMEOUT"), (status = 507, description = "INSUFFICIENT_MEMORY")
    )
)]
pub async fn load_model(State(state): State<AppState>, ApiJson(body): ApiJson<LoadBody>) -> Result<Response, ApiError> {
    if !std::path::Path::new(&body.path).is_absolute() {
        return Err(ApiError::invalid(format!("path must be absolute, got {:?}", body.path)));
    }
    if body.priority.is_some_and(|p| p > 100) {
        return Err(ApiError::invalid("priority must be 0-100"));
    }
    let device = load::device_for(&state.app, body.device_id.as_deref())?;
    let held = load::held_by_memwarden(&state.app, device, body.held_by.as_deref())?;
    if body.run_async {
        return Ok(start_load(state, device, held, body));
    }
    let loaded: LoadedDto = load::load(&state.app, device, held, body, None).await?;
    Ok(Data(loaded).into_response())
}

/// Starts a checked load in the background and answers 202 with the operation. Its total is the
/// model's tensor bytes (the file's size when the header cannot be read here); a load memwarden
/// holds counts the bytes read as they come, a worker's reports nothing until it ends (then all
/// of them).
fn start_load(state: AppState, device: DeviceId, held: bool, body: LoadBody) -> Response {
    let op = start_operation(&state.app, OperationKind::ModelLoad, Some(device.to_string()));
    let progress = op.progress();
    spawn(op.clone(), async move {
        let loaded = load::load(&state.app, device, held, body, Some(progress)).await?;
        Ok(OperationResult::Load(Box::new(loaded)))
    });
    accepted(&op)
}
