//! The REST API: `router(state)` builds every route. A handler parses the request, calls one
//! use case of the application layer ([`crate::app`]) and renders its answer; nothing else.
//! Handler files follow the URL tree under `/api/memory/`: `allocations.rs` (`/allocations…`,
//! `/allocation/{id}`), `owners.rs`, `transfer.rs` (`/transfer…`, `/copy`), `operations.rs`
//! (`/operations…`: defragment, clear, background operations), `pools.rs`, `pressure.rs`
//! (`/pressure…`, `/events`), `models/` (`/models…`), `analytics.rs` (`/usage…`,
//! `/analytics…`, `/optimization`, `/metrics`); `/health` and `/status…` are here.

pub mod allocations;
pub mod analytics;
pub mod dashboard;
pub mod dto;
pub mod envelope;
pub mod models;
pub mod openapi;
pub mod operations;
pub mod owners;
pub mod pools;
pub mod pressure;
pub mod transfer;

use crate::app::{devices, App, HttpMetrics};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use dto::*;
use envelope::{ApiError, ApiResponse, Data, CORRELATION_ID};
use memwarden_core::units::MIB;
use std::collections::HashMap;
use std::sync::Arc;
use time::OffsetDateTime;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// Largest body of `PUT …/data` and largest `length` of `GET …/data`.
pub const MAX_DATA_BYTES: usize = (64 * MIB) as usize;

/// What every handler has: the application (its use cases) and the HTTP layer's own settings.
#[derive(Clone)]
pub struct AppState {
    pub app: Arc<App>,
    /// Request latencies for `/metrics`.
    pub http_metrics: HttpMetrics,
    /// When set, `/api/` routes require `Authorization: Bearer <token>`.
    pub auth_token: Option<Arc<str>>,
    /// Largest JSON request body (`api.max_body_bytes`).
    pub max_body_bytes: u64,
    /// Turns true when the daemon shuts down; open event streams end then.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

type ApiResult<T> = Result<Data<T>, ApiError>;

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/memory/status", get(status_all))
        .route("/api/memory/status/{device_id}", get(status_device))
        .route("/api/memory/allocations", get(allocations::list_allocations))
        .route("/api/memory/allocations/allocate", post(allocations::allocate))
        .route("/api/memory/allocations/allocate/{device_id}", post(allocations::allocate_on_device))
        .route("/api/memory/allocations/device/{device_id}", get(allocations::list_device_allocations))
        .route("/api/memory/owners", get(owners::list_owners))
        .route("/api/memory/allocations/{allocation_id}", delete(allocations::free))
        .route("/api/memory/allocation/{allocation_id}", get(allocations::get_allocation))
        .route("/api/memory/allocations/{allocation_id}/export", post(allocations::export))
        .route("/api/memory/allocations/{allocation_id}/data", get(allocations::read_data).put(allocations::write_data))
        .route("/api/memory/transfer", post(transfer::transfer))
        .route("/api/memory/transfer/{transfer_id}", get(transfer::transfer_status))
        .route("/api/memory/copy", post(transfer::copy))
        .route("/api/memory/operations", get(operations::list_operations))
        .route("/api/memory/operations/{operation_id}", get(operations::get_operation))
        .route("/api/memory/operations/defragment", post(operations::defragment_all))
        .route("/api/memory/operations/defragment/{device_id}", post(operations::defragment_device))
        .route("/api/memory/pools", get(pools::pools_all))
        .route("/api/memory/pools/{device_id}", get(pools::pools_device))
        .route("/api/memory/pressure", get(pressure::pressure_all))
        .route("/api/memory/pressure/history", get(pressure::pressure_history))
        .route("/api/memory/pressure/{device_id}", get(pressure::pressure_device))
        .route("/api/memory/events", get(pressure::events))
        .route("/api/memory/models", get(models::list_models))
        .route("/api/memory/models/load", post(models::load::load_model))
        .route("/api/memory/models/optimize", post(models::optimize::optimize))
        .route("/api/memory/models/optimize/history", get(models::optimize::optimize_history))
        .route("/api/memory/models/groups/{group}/park", post(models::residency::park_group))
        .route("/api/memory/models/groups/{group}/resume", post(models::residency::resume_group))
        .route("/api/memory/models/groups/{group}/drop", post(models::residency::drop_group))
        .route("/api/memory/models/{model_id}", delete(models::unload_model))
        .route("/api/memory/models/{model_id}/move", post(models::move_model))
        .route("/api/memory/models/{model_id}/park", post(models::residency::park))
        .route("/api/memory/models/{model_id}/resume", post(models::residency::resume))
        .route("/api/memory/models/{model_id}/drop", post(models::residency::drop_copy))
        .route("/api/memory/usage", get(analytics::usage_all))
        .route("/api/memory/usage/{device_id}", get(analytics::usage_device))
        .route("/api/memory/analytics", get(analytics::analytics))
        .route("/api/memory/analytics/reset-peaks", post(analytics::reset_peaks))
        .route("/api/memory/analytics/events", get(analytics::events))
        .route("/api/memory/optimization", get(analytics::optimization))
        .route("/metrics", get(analytics::metrics))
        .route("/api/memory/operations/clear", post(operations::clear_all))
        .route("/api/memory/operations/clear/{device_id}", post(operations::clear_device))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(middleware::from_fn_with_state(state.clone(), limit_body))
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .merge(api)
        .route("/health", get(health))
        // The dashboard page and its assets: open, like /health (the page holds no data).
        .merge(dashboard::routes())
        .merge(SwaggerUi::new("/swagger-ui").url("/api/openapi.json", openapi::ApiDoc::openapi()))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), analytics::track_latency))
        .layer(middleware::from_fn(correlation))
        .with_state(state)
}

/// Takes the caller's `X-Correlation-Id` (or makes one), scopes it to the request so every
/// envelope carries it, and echoes it in the response header.
async fn correlation(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut response = CORRELATION_ID.scope(id.clone(), next.run(req)).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(CORRELATION_HEADER, v);
    }
    response
}

/// Refuses a body over the route's limit with 413 `PAYLOAD_TOO_LARGE` before reading it (by its
/// `Content-Length`), and caps a streamed body at the same limit (the extractors answer 413 when
/// it is cut). `PUT …/data` takes up to [`MAX_DATA_BYTES`]; every other route `api.max_body_bytes`.
async fn limit_body(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let limit = if req.uri().path().ends_with("/data") { MAX_DATA_BYTES as u64 } else { state.max_body_bytes };
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return ApiError::too_large(limit).into_response();
    }
    req.extensions_mut().insert(envelope::BodyLimit(limit));
    let (parts, body) = req.into_parts();
    let body = axum::body::Body::new(http_body_util::Limited::new(body, limit as usize));
    next.run(Request::from_parts(parts, body)).await
}

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.auth_token {
        let given =
            req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| token_matches(g, token)) {
            return ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "missing or wrong bearer token")
                .into_response();
        }
    }
    next.run(req).await
}

/// Compares the given token with the configured one in time that does not depend on where they
/// differ (only on their lengths), so response times do not leak the token byte by byte.
fn token_matches(given: &str, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

async fn route_not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "ROUTE_NOT_FOUND",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Daemon health: its devices and which backends are available (and why not).
#[utoipa::path(get, path = "/health", responses((status = 200, body = ApiResponse<HealthDto>)))]
async fn health(State(state): State<AppState>) -> ApiResult<HealthDto> {
    let h = devices::health(&state.app);
    let uptime = (OffsetDateTime::now_utc() - h.started_at).whole_seconds().max(0) as u64;
    Ok(Data(HealthDto {
        status: "healthy".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: envelope::rfc3339(h.started_at),
        uptime_seconds: uptime,
        pid: std::process::id(),
        devices: h.devices.iter().map(ToString::to_string).collect(),
        backends: h.backends.iter().map(backend_dto).collect(),
        workers: health_workers(&h),
    }))
}

fn health_workers(h: &devices::Health) -> HealthWorkersDto {
    let name = |v: serde_json::Result<serde_json::Value>| {
        v.ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
    };
    let workers: Vec<HealthWorkerDto> = h
        .workers
        .iter()
        .map(|slot| {
            let st = slot.snapshot();
            HealthWorkerDto {
                worker_id: slot.id.clone(),
                role: name(serde_json::to_value(slot.role)),
                state: name(serde_json::to_value(st.state)),
                pid: st.pid,
                restarts: st.restarts,
                last_error: st.last_error,
            }
        })
        .collect();
    let ready = h.workers.iter().filter(|s| s.conn().is_some()).count();
    HealthWorkersDto { enabled: h.workers_enabled, ready, reason: h.workers_unavailable.clone(), workers }
}

/// Memory status of every device, read from the OS or driver (sample at most 100 ms old).
#[utoipa::path(get, path = "/api/memory/status", responses((status = 200, body = ApiResponse<StatusListDto>)))]
async fn status_all(State(state): State<AppState>) -> ApiResult<StatusListDto> {
    let list = devices::status_all(&state.app)?;
    Ok(Data(StatusListDto {
        devices: list.iter().map(DeviceStatusDto::from).collect(),
        backends: devices::backends(&state.app).iter().map(backend_dto).collect(),
    }))
}

/// Memory status of one device (`cpu`, `cuda:N`, or an alias such as `gpu-0`). With
/// `?canAllocate=N` (and optionally `&memoryType=K`) it also answers whether N bytes fit now:
/// in the pool, in new memory from the OS or driver, or not at all.
#[utoipa::path(
    get, path = "/api/memory/status/{deviceId}",
    params(
        ("deviceId" = String, Path, description = "cpu, cuda:N, or an alias"),
        ("canAllocate" = Option<u64>, Query, description = "bytes to ask about"),
        ("memoryType" = Option<String>, Query, description = "kind for canAllocate; default the device's")
    ),
    responses((status = 200, body = ApiResponse<DeviceStatusDto>), (status = 404, description = "DEVICE_NOT_FOUND"))
)]
async fn status_device(
    State(state): State<AppState>,
    Path(device_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<DeviceStatusDto> {
    let id = crate::app::allocations::resolve(&state.app, &device_id)?;
    let kind = match q.get("memoryType") {
        None => None,
        Some(t) => Some(t.parse().map_err(|e| ApiError::invalid(format!("memoryType: {e}")))?),
    };
    let mut dto = DeviceStatusDto::from(&devices::status(&state.app, id)?);
    if q.contains_key("canAllocate") {
        let size = query_u64(&q, "canAllocate", None)?;
        dto.can_allocate = Some(CanAllocateDto::from(&devices::can_allocate(&state.app, id, size, kind)?));
    }
    Ok(Data(dto))
}

pub(crate) fn query_u64(
    q: &HashMap<String, String>,
    name: &'static str,
    default: Option<u64>,
) -> Result<u64, ApiError> {
    // The document gives these as int64 (JSON Schema has no unsigned 64-bit format): the range
    // taken is its non-negative half.
    match q.get(name) {
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| *n <= i64::MAX as u64)
            .ok_or_else(|| ApiError::invalid(format!("{name}: '{v}' is not an integer from 0 to {}", i64::MAX))),
        None => default.ok_or_else(|| ApiError::invalid(format!("{name}: required"))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_token_matches_only_itself() {
        assert!(super::token_matches("s3cret", "s3cret"));
        for wrong in ["", "s3cre", "s3cret!", "S3cret", "x3cret"] {
            assert!(!super::token_matches(wrong, "s3cret"), "{wrong}");
        }
    }
}
