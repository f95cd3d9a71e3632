//! Model memory routes: what the Python processes that hold models report, next to what the OS
//! and the driver say those processes hold.

use super::envelope::{ApiError, ApiJson, ApiQuery, ApiResponse, Data};
use super::{blocking, ApiResult, AppState};
use crate::app::optimize::{Optimize, Order};
use crate::operations::Progress;
use crate::optimizer::admission::AdmissionError;
use crate::supervisor::SupervisorError;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use memwarden_core::eviction::EvictionStrategy;
use memwarden_core::DeviceId;
use memwarden_protocol::api::{
    LoadBody, LoadedDto, LoadedModelDto, ModelsDto, MoveBody, MovedDto, OperationDto, OperationKind, OperationResult,
    OptimizeBody, OptimizeHistoryDto, OptimizeReply, UnloadedDto,
};
use memwarden_protocol::{codes, LoadModel, Role, DEFAULT_PRIORITY};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

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

impl From<crate::app::models::ListError> for ApiError {
    fn from(e: crate::app::models::ListError) -> Self {
        match e {
            crate::app::models::ListError::Supervisor(e) => e.into(),
            crate::app::models::ListError::Service(e) => e.into(),
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
    let device = q.device_id.as_deref().map(|d| state.service.resolve(d)).transpose()?;
    let listing =
        crate::app::models::Listing { service: &state.service, supervisor: &state.supervisor, weights: &state.weights };
    Ok(Data(listing.list(device).await?))
}

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
    let device = state.service.resolve(body.device_id.as_deref().unwrap_or("cpu"))?;
    let held = match body.held_by.as_deref() {
        None | Some("memwarden") if state.weights.holds_device(device) => true,
        Some("memwarden") => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "DEVICE_UNAVAILABLE",
                format!("memwarden cannot hold weights on {device}; use heldBy: worker"),
            ))
        }
        None | Some("worker") => false,
        Some(other) => return Err(ApiError::invalid(format!("heldBy must be memwarden or worker, got {other:?}"))),
    };
    if body.run_async {
        return Ok(start_load(state, device, held, body));
    }
    Ok(Data(load_checked(&state, device, held, body, None).await?).into_response())
}

/// Starts a checked load in the background and answers 202 with the operation. Its total is the
/// model's tensor bytes (the file's size when the header cannot be read here); a load memwarden
/// holds counts the bytes read as they come, a worker's reports nothing until it ends (then all
/// of them).
fn start_load(state: AppState, device: DeviceId, held: bool, body: LoadBody) -> Response {
    let op = state.operations.start(OperationKind::ModelLoad, Some(device.to_string()));
    let progress = op.progress();
    super::operations::spawn(op.clone(), async move {
        let loaded = load_checked(&state, device, held, body, Some(progress.clone())).await?;
        if !held {
            // The worker says nothing until it is done: then every byte is in.
            progress.set(progress.total(), progress.total());
        }
        Ok(OperationResult::Load(Box::new(loaded)))
    });
    super::operations::accepted(&op)
}

/// A load whose body was checked: into memwarden's memory (`held`), counting the bytes read in
/// `progress`, or by a worker (`progress`' total is then the header's tensor bytes, or the file's
/// size when the header cannot be read here).
pub async fn load_checked(
    state: &AppState,
    device: DeviceId,
    held: bool,
    body: LoadBody,
    progress: Option<Arc<Progress>>,
) -> Result<LoadedDto, ApiError> {
    if held {
        let Data(m) = super::weights::load_held(state, device, body, progress).await?;
        return Ok(LoadedDto::Held(m));
    }
    let dev = device.to_string();
    state.supervisor.wait_while_starting(|s| s.role == Role::Worker && s.serves(&dev)).await;
    if state.supervisor.slots().iter().all(|s| s.conn().is_none()) {
        return Err(SupervisorError::Unavailable(state.supervisor.unavailable_reason()).into());
    }
    let Data(m) = load_with_admission(state, device, body, progress).await?;
    Ok(LoadedDto::Worker(m))
}

/// A worker's load through admission (the ticket held while the worker loads). The header is
/// read here once, for the estimate and `progress`' total (the file's size when it cannot be
/// read here); the worker reads the file itself.
async fn load_with_admission(
    state: &AppState,
    device: DeviceId,
    body: LoadBody,
    progress: Option<Arc<Progress>>,
) -> ApiResult<LoadedModelDto> {
    let declared = crate::app::load::declared_bytes(std::path::Path::new(&body.path)).await;
    if let Some(p) = &progress {
        let size = || std::fs::metadata(&body.path).map(|m| m.len()).ok();
        if let Some(total) = declared.or_else(size) {
            p.set_total(total);
        }
    }
    let estimate = declared.map(|b| crate::models::estimate::model_bytes_of(b, device));
    let label = body.name.clone().unwrap_or_else(|| body.path.clone());
    let load = load_admitted(state, device, body);
    crate::app::load::admitted(&state.optimizer, device, estimate, &label, load).await
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

async fn load_admitted(state: &AppState, device: DeviceId, body: LoadBody) -> ApiResult<LoadedModelDto> {
    let req = LoadModel {
        path: body.path,
        name: body.name,
        device_id: device.to_string(),
        priority: body.priority.unwrap_or(DEFAULT_PRIORITY),
        pinned: body.pinned,
        model_id: None,
        weights: None,
    };
    let (info, slot) = state.supervisor.load(req).await?;
    let pid = slot.snapshot().pid.unwrap_or(0);
    Ok(Data(LoadedModelDto::new(&info, &slot.id, pid)))
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
    if state.weights.contains(&model_id) {
        let (store, id) = (state.weights.clone(), model_id.clone());
        let (model, freed) = super::weights::detached(async move { store.unload(&id).await }).await?;
        super::weights::refresh(&state, model.device());
        return Ok(Data(UnloadedDto {
            model_id,
            worker_id: "memwarden".into(),
            device_id: model.device().to_string(),
            freed_bytes: freed,
            process_bytes_before: None,
            process_bytes_after: None,
        }));
    }
    let (slot, info) = state.supervisor.find_model(&model_id).await?;
    let pid = slot.snapshot().pid;
    let measure = |state: &AppState| -> Option<u64> {
        let pid = pid?;
        let dev = state.service.resolve(&info.device_id).ok()?;
        // A fresh reading: the cached status sample may predate the unload.
        let _ = state.service.measure_now(dev);
        let status = blocking(|| state.service.status(dev)).ok()?;
        state.supervisor.meter().process_bytes(pid, std::slice::from_ref(&status)).remove(&info.device_id)
    };
    let before = measure(&state);
    let (released, slot, info) = state.supervisor.unload(&model_id).await?;
    let after = measure(&state);
    Ok(Data(UnloadedDto {
        model_id,
        worker_id: slot.id.clone(),
        device_id: info.device_id,
        freed_bytes: released.freed_bytes,
        process_bytes_before: before,
        process_bytes_after: after,
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
    let target = state.service.resolve(&body.target_device_id)?;
    if let Ok(held) = state.weights.get(&model_id) {
        // Memwarden's own weights move by park and resume: the id stays.
        let from = held.device();
        if from == target {
            return Err(ApiError::invalid(format!("targetDeviceId: model {model_id} is already on {target}")));
        }
        let freed = state.weights.park(&model_id).await?.freed_bytes;
        state.weights.resume(&model_id, Some(target)).await?;
        let dto = state.weights.dto(&held);
        return Ok(Data(MovedDto {
            model: super::weights::as_loaded(&held, &dto),
            previous_model_id: model_id,
            previous_device_id: from.to_string(),
            freed_bytes: freed,
        }));
    }
    let (slot, info) = state.supervisor.find_model(&model_id).await?;
    let path = match (&info.path, slot.role) {
        (Some(p), Role::Worker) => p.clone(),
        _ => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "INVALID_OPERATION",
                format!("model {model_id} is held by {} without a file to load it from elsewhere", slot.id),
            ))
        }
    };
    if info.device_id == target.to_string() {
        return Err(ApiError::invalid(format!("targetDeviceId: model {model_id} is already on {target}")));
    }
    let load = LoadBody {
        path,
        name: Some(info.model_name.clone()),
        device_id: Some(target.to_string()),
        priority: Some(info.priority),
        pinned: info.pinned,
        held_by: Some("worker".into()),
        keep_alive_ms: None,
        run_async: false,
    };
    let Data(model) = load_with_admission(&state, target, load, None).await?;
    let (released, _, _) = state.supervisor.unload(&model_id).await?;
    Ok(Data(MovedDto {
        model,
        previous_model_id: model_id,
        previous_device_id: info.device_id,
        freed_bytes: released.freed_bytes,
    }))
}

/// Frees model memory on a device, cheapest first: caches (memwarden's empty pool blocks, each
/// worker's allocator caches), then the weights memwarden holds (parked, or dropped on `cpu`),
/// then offloads idle models to the CPU (when the host is not under pressure), then unloads
/// models, ranked by idle time, priority, size and reload cost; pinned and excluded models are
/// never touched. With no worker or client to ask it still runs: the rungs that need one are
/// named in `rungsSkipped` with the reason. `memoryFreed` is measured (the driver's free memory for a
/// GPU, the model processes' RSS for `cpu`), never negative (`memoryMeasured` is the signed
/// change), each step's claim beside its measured gain. `forceOptimization` below the target
/// runs the caches and releases the least valuable unpinned model.
///
/// With `deviceId`, `data` is that device's run. Without it, every device above the target (or
/// at `high` or above) is optimized, most pressured first, under one time limit (when none is
/// and the request is forced or names `minMemoryToFree`, the most pressured device), and `data`
/// is `{optimizationTriggered, memoryFreed, modelsUnloaded, modelsOffloaded, message, runs}`.
#[utoipa::path(
    post, path = "/api/memory/models/optimize", request_body = OptimizeBody,
    responses(
        (status = 200, body = ApiResponse<OptimizeReply>,
            description = "one `OptimizeOutcome` with `deviceId`; `OptimizeRunsDto` (the runs, most pressured device first) without"),
        (status = 400, description = "INVALID_ARGUMENT"), (status = 404, description = "DEVICE_NOT_FOUND")
    )
)]
pub async fn optimize(State(state): State<AppState>, ApiJson(body): ApiJson<OptimizeBody>) -> ApiResult<OptimizeReply> {
    let device = body.device_id.as_deref().map(|d| state.service.resolve(d)).transpose()?;
    let target = body.target_pressure_level.unwrap_or(50.0);
    if !(0.0..=100.0).contains(&target) {
        return Err(ApiError::invalid("targetPressureLevel must be between 0 and 100"));
    }
    let strategy: EvictionStrategy =
        body.strategy.as_deref().unwrap_or("balanced").parse().map_err(ApiError::invalid)?;
    let max_models = match body.max_models_to_unload.unwrap_or(-1) {
        -1 => None,
        n if n >= 0 => Some(n as usize),
        n => return Err(ApiError::invalid(format!("maxModelsToUnload must be -1 or more, got {n}"))),
    };
    let max_time = body.max_optimization_time_ms.unwrap_or(30_000);
    if max_time == 0 || max_time > 600_000 {
        return Err(ApiError::invalid("maxOptimizationTimeMs must be between 1 and 600000"));
    }
    let order = Order {
        device,
        target_pressure_level: target,
        strategy,
        max_models,
        min_memory_to_free: body.min_memory_to_free.unwrap_or(0),
        force: body.force_optimization,
        exclude: body.exclude_models,
        only: body.models,
        max_time: Duration::from_millis(max_time),
    };
    let optimize = Optimize { optimizer: &state.optimizer, supervisor: &state.supervisor, weights: &state.weights };
    Ok(Data(optimize.run(order).await.map_err(|e| ApiError::invalid(e.0))?))
}

/// The last 100 optimizer runs (manual, watchdog, admission), oldest first.
#[utoipa::path(get, path = "/api/memory/models/optimize/history", responses((status = 200, body = ApiResponse<OptimizeHistoryDto>)))]
pub async fn optimize_history(State(state): State<AppState>) -> ApiResult<OptimizeHistoryDto> {
    Ok(Data(OptimizeHistoryDto { runs: state.optimizer.history() }))
}
