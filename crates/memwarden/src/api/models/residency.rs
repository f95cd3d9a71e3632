//! `/api/memory/models/{id}/park`, `…/resume` and `…/drop`: where a held model's weights live.

use super::super::envelope::{ApiError, ApiResponse, Data, NoBody, OptionalJson};
use super::super::{ApiResult, AppState};
use crate::app::allocations::resolve;
use crate::app::residency::{self as use_case, Acted, GroupAction};
use crate::app::{HeldModel, WeightsError};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use memwarden_protocol::api::{GroupActionDto, HeldModelDto, LoadedModelDto, PhaseDto, ResumeBody, WeightsActionDto};
use memwarden_protocol::codes;
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
            WeightsError::GroupNotFound(_) => (StatusCode::NOT_FOUND, codes::GROUP_NOT_FOUND),
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

fn outcome(state: &AppState, acted: Acted, started: Instant) -> WeightsActionDto {
    let o = acted.outcome;
    WeightsActionDto {
        action: o.action.to_string(),
        model: use_case::held_dto(&state.app, &acted.model),
        freed_bytes: o.freed_bytes,
        rate: o.rate.as_ref().map(|r| r.dto()),
        total_ms: started.elapsed().as_secs_f64() * 1e3,
        phases_ms: o.phases.iter().map(|(p, ms)| PhaseDto { phase: p.to_string(), ms: *ms }).collect(),
        switched_with: acted.switched_with,
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
    let acted = use_case::park(&state.app, &model_id).await?;
    Ok(Data(outcome(&state, acted, started)))
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
    let target = body.target_device_id.map(|t| resolve(&state.app, &t)).transpose()?;
    let acted = use_case::resume(&state.app, &model_id, target).await?;
    Ok(Data(outcome(&state, acted, started)))
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
    let acted = use_case::drop_copy(&state.app, &model_id).await?;
    Ok(Data(outcome(&state, acted, started)))
}

/// Parks every component of a group (a diffusers pipeline loaded as one), in the order of their ids.
#[utoipa::path(
    post, path = "/api/memory/models/groups/{group}/park", params(("group" = String, Path)),
    responses(
        (status = 200, body = ApiResponse<GroupActionDto>), (status = 404, description = "GROUP_NOT_FOUND"),
        (status = 409, description = "NOT_SUPPORTED / IN_USE of a component: it and the ones after it stay resident")
    )
)]
pub async fn park_group(
    State(state): State<AppState>,
    Path(group): Path<String>,
    _: NoBody,
) -> ApiResult<GroupActionDto> {
    group_action(&state, &group, GroupAction::Park).await
}

/// Resumes every component of a group, each making room as its own resume would.
#[utoipa::path(
    post, path = "/api/memory/models/groups/{group}/resume", params(("group" = String, Path)),
    responses(
        (status = 200, body = ApiResponse<GroupActionDto>), (status = 404, description = "GROUP_NOT_FOUND"),
        (status = 409, description = "FILE_CHANGED of a component"),
        (status = 507, description = "INSUFFICIENT_MEMORY for a component: the ones before it stay resident")
    )
)]
pub async fn resume_group(
    State(state): State<AppState>,
    Path(group): Path<String>,
    _: NoBody,
) -> ApiResult<GroupActionDto> {
    group_action(&state, &group, GroupAction::Resume).await
}

/// Drops the copies of every component of a group (each keeps its file).
#[utoipa::path(
    post, path = "/api/memory/models/groups/{group}/drop", params(("group" = String, Path)),
    responses(
        (status = 200, body = ApiResponse<GroupActionDto>), (status = 404, description = "GROUP_NOT_FOUND"),
        (status = 409, description = "NOT_SUPPORTED (pinned) / IN_USE of a component")
    )
)]
pub async fn drop_group(
    State(state): State<AppState>,
    Path(group): Path<String>,
    _: NoBody,
) -> ApiResult<GroupActionDto> {
    group_action(&state, &group, GroupAction::Drop).await
}

async fn group_action(state: &AppState, group: &str, action: GroupAction) -> ApiResult<GroupActionDto> {
    let started = Instant::now();
    let done = use_case::for_group(&state.app, group, action).await?;
    let actions: Vec<WeightsActionDto> =
        done.into_iter().map(|(a, at_ms)| WeightsActionDto { total_ms: at_ms, ..outcome(state, a, started) }).collect();
    Ok(Data(GroupActionDto {
        group: group.to_string(),
        freed_bytes: actions.iter().map(|a| a.freed_bytes).sum(),
        actions,
        total_ms: started.elapsed().as_secs_f64() * 1e3,
    }))
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
