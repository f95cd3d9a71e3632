//! Routes over the analytics: usage, analytics over a window, peak reset, the allocation event
//! log, recommendations, and the Prometheus exposition.

use super::envelope::{ApiError, ApiResponse, Data};
use super::{ApiResult, AppState};
use crate::app::{allocations, observe};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use memwarden_protocol::api::analytics::{
    AnalyticsDto, EventListDto, RecommendationsDto, ResetDto, UsageDto, UsageListDto,
};
use std::collections::HashMap;
use std::time::Instant;

const DEFAULT_WINDOW: &str = "1h";
const DEFAULT_EVENTS: usize = 100;

fn window(state: &AppState, q: &HashMap<String, String>) -> Result<(u64, String), ApiError> {
    let text = q.get("window").map(String::as_str).unwrap_or(DEFAULT_WINDOW);
    Ok((observe::window_ms(&state.app, text)?, text.to_string()))
}

/// Usage of every device over a window (`?window=1h`; s, m, h or d; at most the history's
/// coarse span, a day by default): current and peak usage, allocation counts and rates,
/// average allocation size.
#[utoipa::path(
    get, path = "/api/memory/usage", params(("window" = Option<String>, Query, description = "e.g. 30s, 15m, 1h (default), 1d")),
    responses((status = 200, body = ApiResponse<UsageListDto>), (status = 400, description = "INVALID_ARGUMENT"))
)]
pub async fn usage_all(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<UsageListDto> {
    let (ms, text) = window(&state, &q)?;
    Ok(Data(UsageListDto { window: text, devices: observe::usage(&state.app, None, ms)? }))
}

/// Usage of one device over a window.
#[utoipa::path(
    get, path = "/api/memory/usage/{deviceId}",
    params(("deviceId" = String, Path), ("window" = Option<String>, Query)),
    responses(
        (status = 200, body = ApiResponse<UsageDto>), (status = 400, description = "INVALID_ARGUMENT"),
        (status = 404, description = "DEVICE_NOT_FOUND")
    )
)]
pub async fn usage_device(
    State(state): State<AppState>,
    Path(device_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<UsageDto> {
    let id = allocations::resolve(&state.app, &device_id)?;
    let (ms, _) = window(&state, &q)?;
    let mut list = observe::usage(&state.app, Some(id), ms)?;
    list.pop().map(Data).ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "no usage"))
}

/// Analytics over a window (`?window=1h`): per device peaks (resettable), usage percentiles,
/// allocation activity and size histogram, fragmentation trend, transfer throughput,
/// defragmentation, time per pressure level; top owners, purposes and models by bytes; leak
/// suspects. Every figure is computed from the recorded history.
#[utoipa::path(
    get, path = "/api/memory/analytics", params(("window" = Option<String>, Query)),
    responses((status = 200, body = ApiResponse<AnalyticsDto>), (status = 400, description = "INVALID_ARGUMENT"))
)]
pub async fn analytics(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<AnalyticsDto> {
    let (ms, text) = window(&state, &q)?;
    Ok(Data(observe::analytics(&state.app, ms, &text)?))
}

/// Starts every peak over from its current value (used bytes, memwarden's allocated bytes,
/// each model's bytes).
#[utoipa::path(post, path = "/api/memory/analytics/reset-peaks", responses((status = 200, body = ApiResponse<ResetDto>)))]
pub async fn reset_peaks(State(state): State<AppState>, _: super::envelope::NoBody) -> ApiResult<ResetDto> {
    Ok(Data(ResetDto { since: super::envelope::rfc3339(observe::reset_peaks(&state.app)) }))
}

/// The newest entries of the allocation event log (allocated, freed, moved, exported), oldest
/// first: `?deviceId=` narrows it, `?limit=` (default 100) bounds it.
#[utoipa::path(
    get, path = "/api/memory/analytics/events",
    params(("deviceId" = Option<String>, Query), ("limit" = Option<u64>, Query)),
    responses((status = 200, body = ApiResponse<EventListDto>), (status = 400, description = "INVALID_ARGUMENT"))
)]
pub async fn events(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<EventListDto> {
    let device = q.get("deviceId").map(|d| allocations::resolve(&state.app, d)).transpose()?;
    let limit = super::query_u64(&q, "limit", Some(DEFAULT_EVENTS as u64))?;
    Ok(Data(observe::events(&state.app, device, limit as usize)))
}

/// Recommendations from the measured state: each with its evidence, its estimated savings and
/// the request that applies it. Rules without evidence emit nothing.
#[utoipa::path(get, path = "/api/memory/optimization", responses((status = 200, body = ApiResponse<RecommendationsDto>)))]
pub async fn optimization(State(state): State<AppState>) -> ApiResult<RecommendationsDto> {
    Ok(Data(observe::recommendations(&state.app)?))
}

/// Prometheus metrics, text format 0.0.4 (requires the bearer token when one is configured).
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    match observe::metrics(&state.app, &state.http_metrics) {
        Ok(text) => {
            let mut r = text.into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::app::METRICS_CONTENT_TYPE));
            r
        }
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", format!("encoding metrics: {e}"))
            .into_response(),
    }
}

/// Records each request's latency under its route template.
pub async fn track_latency(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_string();
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string());
    let response = next.run(req).await;
    let route = route.as_deref().unwrap_or("unmatched");
    state.http_metrics.observe(&method, route, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}
