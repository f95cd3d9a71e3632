//! Routes for model weights held by memwarden: load (the default of `/models/load`), park,
//! resume, drop, unload and move keep one model id throughout.

use super::envelope::{ApiError, ApiResponse, Data, NoBody, OptionalJson};
use super::{ApiResult, AppState};
use crate::app::load::{LoadError, Loads};
use crate::operations::Progress;
use crate::weights::{ActionOutcome, HeldModel, LoadRequest, WeightsError};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use memwarden_core::DeviceId;
use memwarden_protocol::api::{HeldModelDto, LoadBody, LoadedModelDto, PhaseDto, ResumeBody, WeightsActionDto};
use memwarden_protocol::{codes, DEFAULT_PRIORITY};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

impl From<WeightsError> for ApiError {
    fn from(e: WeightsError) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            WeightsError::FileNotFound(_) => (StatusCode::NOT_FOUND, "FILE_NOT_FOUND"),
            WeightsError::InvalidFile(_) => (StatusCode::UNPROCESSABLE_ENTITY, codes::INVALID_MODEL_FILE),
            WeightsError::FileChanged(_) => (StatusCode::CONFLICT, codes::FILE_CHANGED),
            WeightsError::ModelNotFound(_) => (StatusCode::NOT_FOUND, "MODEL_NOT_FOUND"),
            WeightsError::NotSupported(_) => (StatusCode::CONFLICT, "NOT_SUPPORTED"),
            WeightsError::InUse(_) => (StatusCode::CONFLICT, codes::IN_USE),
            WeightsError::InsufficientMemory { .. } => (StatusCode::INSUFFICIENT_STORAGE, "INSUFFICIENT_MEMORY"),
            WeightsError::DeviceUnavailable(_) => (StatusCode::CONFLICT, "DEVICE_UNAVAILABLE"),
            WeightsError::LoadFailed(_) => (StatusCode::UNPROCESSABLE_ENTITY, "LOAD_FAILED"),
            WeightsError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR"),
        };
        ApiError::new(status, code, message)
    }
}

/// Loads through admission (the ladder makes room first; 507 when it cannot) into memwarden's
/// own memory. A second load of the same file on the same device returns the model already
/// held.
pub async fn load_held(
    state: &AppState,
    device: DeviceId,
    body: LoadBody,
    progress: Option<Arc<Progress>>,
) -> ApiResult<HeldModelDto> {
    let req = LoadRequest {
        path: body.path.into(),
        device,
        name: body.name,
        priority: body.priority.unwrap_or(DEFAULT_PRIORITY),
        pinned: body.pinned,
        keep_alive_ms: body.keep_alive_ms,
    };
    let loads = Loads { optimizer: &state.optimizer, weights: &state.weights };
    let result = loads.held(req, None, progress, Some(&state.supervisor)).await;
    refresh(state, device);
    Ok(Data(state.weights.dto(&result?.model)))
}

impl From<LoadError> for ApiError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Admission(e) => e.into(),
            LoadError::Weights(e) => e.into(),
        }
    }
}

/// Runs a weights operation on its own task, so a client that hangs up cannot cancel it half-way
/// (holders unmapped, nothing parked).
pub async fn detached<T: Send + 'static>(
    op: impl std::future::Future<Output = Result<T, WeightsError>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(op).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", e.to_string())),
    }
}

/// Takes fresh readings of the devices a weights operation changed, so the status that follows
/// shows the change rather than a sample from before it.
pub fn refresh(state: &AppState, device: DeviceId) {
    let _ = state.service.measure_now(device);
    let _ = state.service.measure_now(DeviceId::Cpu);
}

fn outcome(state: &AppState, model: &HeldModel, o: ActionOutcome, started: Instant) -> WeightsActionDto {
    refresh(state, model.device());
    WeightsActionDto {
        action: o.action.to_string(),
        model: state.weights.dto(model),
        freed_bytes: o.freed_bytes,
        rate: o.rate.as_ref().map(|r| r.dto()),
        total_ms: started.elapsed().as_secs_f64() * 1e3,
        phases_ms: o.phases.iter().map(|(p, ms)| PhaseDto { phase: p.to_string(), ms: *ms }).collect(),
    }
}

/// Parks a model: its holders unmap (waiting for their `use()`s), its bytes go to pinned host
/// memory, its device memory back to the driver.
#[utoipa::path(
    post, path = "/api/memory/models/{modelId}/park", params(("modelId" = String, Path)),
    responses(
        (status = 200, body = ApiResponse<WeightsActionDto>), (status = 404, description = "MODEL_NOT_FOUND"),
        (status = 409, description = "NOT_SUPPORTED (cpu, pinned) / IN_USE (a holder's use() outlasted weights.use_bound_ms)")
    )
)]
pub async fn park(
    State(state): State<AppState>,
    Path(model_id): Path<String>,
    _: NoBody,
) -> ApiResult<WeightsActionDto> {
    let started = Instant::now();
    let model = state.weights.get(&model_id)?;
    let (store, id) = (state.weights.clone(), model_id.clone());
    let o = detached(async move { store.park(&id).await }).await?;
    Ok(Data(outcome(&state, &model, o, started)))
}

/// Brings a parked or dropped model back (to `targetDeviceId`, another GPU, when given); its
/// holders map it again, at their old addresses on the same device.
#[utoipa::path(
    post, path = "/api/memory/models/{modelId}/resume", params(("modelId" = String, Path)),
    request_body(content = Option<ResumeBody>, description = "optional"),
    responses(
        (status = 200, body = ApiResponse<WeightsActionDto>), (status = 404, description = "MODEL_NOT_FOUND"),
        (status = 409, description = "FILE_CHANGED: the file changed since it was loaded; nothing stale is loaded"),
        (status = 507, description = "INSUFFICIENT_MEMORY, after the ladder ran")
    )
)]
pub async fn resume(
    State(state): State<AppState>,
    Path(model_id): Path<String>,
    // The body is optional: empty means "back to its own device".
    OptionalJson(body): OptionalJson<ResumeBody>,
) -> ApiResult<WeightsActionDto> {
    let started = Instant::now();
    let target = match body.target_device_id {
        Some(t) => Some(state.service.resolve(&t)?),
        None => None,
    };
    let model = state.weights.get(&model_id)?;
    let device = target.unwrap_or_else(|| model.device());
    let resume = || {
        let (store, id) = (state.weights.clone(), model_id.clone());
        detached(async move { store.resume(&id, target).await })
    };
    let o = match resume().await {
        Err(e) if e.code == "INSUFFICIENT_MEMORY" => {
            make_room(&state, device, model.file.data_bytes, &model_id).await?;
            resume().await?
        }
        other => other?,
    };
    Ok(Data(outcome(&state, &model, o, started)))
}

/// Runs the ladder for `bytes` on `device` (never touching `exclude`); 507 with both numbers
/// when it could not free them.
async fn make_room(state: &AppState, device: DeviceId, bytes: u64, exclude: &str) -> Result<(), ApiError> {
    state
        .optimizer
        .make_room(device, bytes, exclude)
        .await
        .map_err(|message| ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "INSUFFICIENT_MEMORY", message))
}

/// Keeps only the file: the parked copy (or, after the holders unmapped, the resident memory)
/// is freed; a resume reads the file again and checks it did not change.
#[utoipa::path(
    post, path = "/api/memory/models/{modelId}/drop", params(("modelId" = String, Path)),
    responses(
        (status = 200, body = ApiResponse<WeightsActionDto>), (status = 404, description = "MODEL_NOT_FOUND"),
        (status = 409, description = "NOT_SUPPORTED (pinned) / IN_USE")
    )
)]
pub async fn drop_copy(
    State(state): State<AppState>,
    Path(model_id): Path<String>,
    _: NoBody,
) -> ApiResult<WeightsActionDto> {
    let started = Instant::now();
    let model = state.weights.get(&model_id)?;
    let (store, id) = (state.weights.clone(), model_id.clone());
    let o = detached(async move { store.drop_copy(&id).await }).await?;
    Ok(Data(outcome(&state, &model, o, started)))
}

/// A held model in the worker listing's shape (for `move`, whose reply predates held weights).
pub fn as_loaded(m: &Arc<HeldModel>, dto: &HeldModelDto) -> LoadedModelDto {
    LoadedModelDto {
        model_id: dto.model_id.clone(),
        model_name: dto.name.clone(),
        worker_id: "memwarden".into(),
        pid: std::process::id(),
        device_id: dto.device_id.clone(),
        size_bytes: dto.size_bytes,
        bytes_by_device: BTreeMap::from([(dto.device_id.clone(), dto.size_bytes)]),
        loaded_at: dto.loaded_at.clone(),
        last_access: dto.last_used.clone(),
        load_time_ms: dto.load.as_ref().map(|r| r.ms).unwrap_or(0.0),
        priority: m.priority,
        pinned: m.pinned,
        path: Some(dto.path.clone()),
        backend: Some("memwarden".into()),
        reserved_bytes: Some(dto.resident_bytes),
    }
}
