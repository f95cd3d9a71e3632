//! `/api/memory/models/optimize…`: the release ladder on request, and its recent runs.

use super::super::envelope::{ApiError, ApiJson, ApiResponse, Data};
use super::super::{ApiResult, AppState};
use crate::app::allocations::resolve;
use crate::app::optimize::{self, Order};
use axum::extract::State;
use memwarden_core::eviction::EvictionStrategy;
use memwarden_protocol::api::{OptimizeBody, OptimizeHistoryDto, OptimizeReply};
use std::time::Duration;

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
    let device = body.device_id.as_deref().map(|d| resolve(&state.app, d)).transpose()?;
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
    Ok(Data(optimize::run(&state.app, order).await.map_err(|e| ApiError::invalid(e.0))?))
}

/// The last 100 optimizer runs (manual, watchdog, admission), oldest first.
#[utoipa::path(get, path = "/api/memory/models/optimize/history", responses((status = 200, body = ApiResponse<OptimizeHistoryDto>)))]
pub async fn optimize_history(State(state): State<AppState>) -> ApiResult<OptimizeHistoryDto> {
    Ok(Data(OptimizeHistoryDto { runs: optimize::history(&state.app) }))
}
