//! The REST API: `router(state)` builds every route; handlers translate HTTP to service calls.

pub mod analytics;
pub mod dto;
pub mod envelope;
pub mod models;

use crate::service::{
    AllocateRequest, Service, TransferRequest, TransferStatus, TransferTarget, DEFAULT_ALIGNMENT_BYTES,
};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use base64::Engine as _;
use dto::*;
use envelope::{ApiError, ApiJson, ApiResponse, Data, ErrorBody, CORRELATION_ID};
use memwarden_core::defrag::{DefragOptions, Strategy};
use memwarden_core::MemoryKind;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// Largest body of `PUT …/data` and largest `length` of `GET …/data`.
pub const MAX_DATA_BYTES: usize = 64 << 20;

#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    /// The model workers and attached clients.
    pub supervisor: Arc<crate::supervisor::Supervisor>,
    /// Pressure levels, their history and the change stream.
    pub pressure: Arc<crate::pressure::PressureMonitor>,
    /// The release ladder (manual, watchdog, admission).
    pub optimizer: Arc<crate::optimizer::Optimizer>,
    /// History, analytics, recommendations and `/metrics`.
    pub analytics: Arc<crate::analytics::Analytics>,
    /// Request latencies for `/metrics`.
    pub http_metrics: crate::analytics::metrics::HttpMetrics,
    /// When set, `/api/` routes require `Authorization: Bearer <token>`.
    pub auth_token: Option<Arc<str>>,
    /// Turns true when the daemon shuts down; open event streams end then.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

type ApiResult<T> = Result<Data<T>, ApiError>;

/// Runs blocking service work (page commits, munmap: milliseconds per GiB) on this thread after
/// handing the async worker's other tasks to another thread. That costs about 10 µs, so the
/// microsecond paths (pool hits, reservations, frees into shared blocks) run inline instead.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "memwarden",
        description = "Host, GPU and model memory daemon. Every /api/ response is an ApiResponse envelope."
    ),
    paths(
        health,
        status_all,
        status_device,
        allocate,
        allocate_on_device,
        free,
        list_allocations,
        list_device_allocations,
        get_allocation,
        clear_all,
        clear_device,
        export,
        read_data,
        write_data,
        transfer,
        transfer_status,
        copy,
        defragment_all,
        defragment_device,
        pools_all,
        pools_device,
        pressure_all,
        pressure_device,
        pressure_history,
        events,
        models::list_models,
        models::load_model,
        models::unload_model,
        models::optimize,
        models::optimize_history,
        models::move_model,
        analytics::usage_all,
        analytics::usage_device,
        analytics::analytics,
        analytics::reset_peaks,
        analytics::events,
        analytics::optimization,
        analytics::metrics
    ),
    components(schemas(
        ErrorBody,
        AllocateBody,
        TransferBody,
        DefragBody,
        memwarden_protocol::api::LoadBody,
        memwarden_protocol::api::OptimizeBody,
        memwarden_protocol::api::MoveBody
    ))
)]
pub struct ApiDoc;

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/memory/status", get(status_all))
        .route("/api/memory/status/{device_id}", get(status_device))
        .route("/api/memory/allocations", get(list_allocations))
        .route("/api/memory/allocations/allocate", post(allocate))
        .route("/api/memory/allocations/allocate/{device_id}", post(allocate_on_device))
        .route("/api/memory/allocations/device/{device_id}", get(list_device_allocations))
        .route("/api/memory/allocations/{allocation_id}", delete(free))
        .route("/api/memory/allocation/{allocation_id}", get(get_allocation))
        .route("/api/memory/allocations/{allocation_id}/export", post(export))
        .route(
            "/api/memory/allocations/{allocation_id}/data",
            get(read_data).put(write_data).layer(DefaultBodyLimit::max(MAX_DATA_BYTES)),
        )
        .route("/api/memory/transfer", post(transfer))
        .route("/api/memory/transfer/{transfer_id}", get(transfer_status))
        .route("/api/memory/copy", post(copy))
        .route("/api/memory/operations/defragment", post(defragment_all))
        .route("/api/memory/operations/defragment/{device_id}", post(defragment_device))
        .route("/api/memory/pools", get(pools_all))
        .route("/api/memory/pools/{device_id}", get(pools_device))
        .route("/api/memory/pressure", get(pressure_all))
        .route("/api/memory/pressure/history", get(pressure_history))
        .route("/api/memory/pressure/{device_id}", get(pressure_device))
        .route("/api/memory/events", get(events))
        .route("/api/memory/models", get(models::list_models))
        .route("/api/memory/models/load", post(models::load_model))
        .route("/api/memory/models/optimize", post(models::optimize))
        .route("/api/memory/models/optimize/history", get(models::optimize_history))
        .route("/api/memory/models/{model_id}", delete(models::unload_model))
        .route("/api/memory/models/{model_id}/move", post(models::move_model))
        .route("/api/memory/usage", get(analytics::usage_all))
        .route("/api/memory/usage/{device_id}", get(analytics::usage_device))
        .route("/api/memory/analytics", get(analytics::analytics))
        .route("/api/memory/analytics/reset-peaks", post(analytics::reset_peaks))
        .route("/api/memory/analytics/events", get(analytics::events))
        .route("/api/memory/optimization", get(analytics::optimization))
        .route("/metrics", get(analytics::metrics))
        .route("/api/memory/operations/clear", post(clear_all))
        .route("/api/memory/operations/clear/{device_id}", post(clear_device))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .merge(SwaggerUi::new("/swagger-ui").url("/api/openapi.json", ApiDoc::openapi()))
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

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.auth_token {
        let given =
            req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token.as_ref()) {
            return ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "missing or wrong bearer token")
                .into_response();
        }
    }
    next.run(req).await
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
    let s = &state.service;
    let uptime = (OffsetDateTime::now_utc() - s.started_at()).whole_seconds().max(0) as u64;
    Ok(Data(HealthDto {
        status: "healthy".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: envelope::rfc3339(s.started_at()),
        uptime_seconds: uptime,
        devices: s.device_ids().iter().map(ToString::to_string).collect(),
        backends: s.backends().iter().map(backend_dto).collect(),
    }))
}

/// Memory status of every device, read from the OS or driver (sample at most 100 ms old).
#[utoipa::path(get, path = "/api/memory/status", responses((status = 200, body = ApiResponse<StatusListDto>)))]
async fn status_all(State(state): State<AppState>) -> ApiResult<StatusListDto> {
    let list = state.service.status_all()?;
    Ok(Data(StatusListDto {
        devices: list.iter().map(DeviceStatusDto::from).collect(),
        backends: state.service.backends().iter().map(backend_dto).collect(),
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
    let id = state.service.resolve(&device_id)?;
    let mut dto = DeviceStatusDto::from(&state.service.status(id)?);
    if q.contains_key("canAllocate") {
        let size = query_u64(&q, "canAllocate", None)?;
        let kind = match q.get("memoryType") {
            None => None,
            Some(t) => Some(t.parse().map_err(|e| ApiError::invalid(format!("memoryType: {e}")))?),
        };
        dto.can_allocate = Some(CanAllocateDto::from(&state.service.can_allocate(id, size, kind)?));
    }
    Ok(Data(dto))
}

fn parse_allocate(body: AllocateBody, device: String) -> Result<AllocateRequest, ApiError> {
    let size = body.size_bytes.ok_or_else(|| ApiError::invalid("sizeBytes: required"))?;
    if size <= 0 {
        return Err(ApiError::invalid(format!("sizeBytes: must be greater than 0 (got {size})")));
    }
    let alignment = body.alignment.unwrap_or(DEFAULT_ALIGNMENT_BYTES as i64);
    if alignment <= 0 || !(alignment as u64).is_power_of_two() {
        return Err(ApiError::invalid(format!("alignment: must be a power of two (got {alignment})")));
    }
    let kind = match body.memory_type.as_deref() {
        None => None,
        Some(text) => Some(text.parse::<MemoryKind>().map_err(|e| ApiError::invalid(format!("memoryType: {e}")))?),
    };
    Ok(AllocateRequest {
        device,
        size_bytes: size as u64,
        kind,
        alignment_bytes: alignment as u64,
        purpose: body.purpose,
        owner: body.owner,
        persistent: body.persistent.unwrap_or(false),
        movable: body.movable.unwrap_or(true),
    })
}

fn do_allocate(state: &AppState, req: AllocateRequest) -> Result<(StatusCode, Data<AllocationDto>), ApiError> {
    let record = match state.service.try_allocate_now(req.clone())? {
        Some(record) => record,
        None => blocking(|| state.service.allocate(req))?,
    };
    Ok((StatusCode::CREATED, Data(AllocationDto::from(&*record))))
}

/// Allocates memory on the device named in the body (`deviceId`).
#[utoipa::path(
    post, path = "/api/memory/allocations/allocate", request_body = AllocateBody,
    responses(
        (status = 201, body = ApiResponse<AllocationDto>),
        (status = 400, description = "INVALID_ARGUMENT"), (status = 404, description = "DEVICE_NOT_FOUND"),
        (status = 507, description = "INSUFFICIENT_MEMORY, with requested and available bytes")
    )
)]
async fn allocate(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<AllocateBody>,
) -> Result<impl IntoResponse, ApiError> {
    let device = body.device_id.clone().ok_or_else(|| ApiError::invalid("deviceId: required on this route"))?;
    do_allocate(&state, parse_allocate(body, device)?)
}

/// Allocates memory on `deviceId`.
#[utoipa::path(
    post, path = "/api/memory/allocations/allocate/{deviceId}", request_body = AllocateBody,
    params(("deviceId" = String, Path)),
    responses(
        (status = 201, body = ApiResponse<AllocationDto>),
        (status = 400, description = "INVALID_ARGUMENT"), (status = 404, description = "DEVICE_NOT_FOUND"),
        (status = 507, description = "INSUFFICIENT_MEMORY")
    )
)]
async fn allocate_on_device(
    State(state): State<AppState>,
    Path(device_id): Path<String>,
    ApiJson(body): ApiJson<AllocateBody>,
) -> Result<impl IntoResponse, ApiError> {
    if let Some(other) = &body.device_id {
        let (a, b) = (state.service.resolve(&device_id)?, state.service.resolve(other)?);
        if a != b {
            return Err(ApiError::invalid(format!("deviceId: body names {b} but the route names {a}")));
        }
    }
    do_allocate(&state, parse_allocate(body, device_id)?)
}

/// Frees an allocation; unknown or already-freed ids are 404.
#[utoipa::path(
    delete, path = "/api/memory/allocations/{allocationId}", params(("allocationId" = String, Path)),
    responses((status = 200, body = ApiResponse<FreedDto>), (status = 404, description = "ALLOCATION_NOT_FOUND"))
)]
async fn free(State(state): State<AppState>, Path(allocation_id): Path<String>) -> ApiResult<FreedDto> {
    let r = if state.service.free_is_quick(&allocation_id) {
        state.service.free(&allocation_id)?
    } else {
        blocking(|| state.service.free(&allocation_id))?
    };
    Ok(Data(FreedDto {
        device_id: r.device.to_string(),
        memory_type: r.kind.to_string(),
        freed_bytes: r.allocated_bytes,
        allocation_id,
    }))
}

/// Every live allocation, oldest first.
#[utoipa::path(get, path = "/api/memory/allocations", responses((status = 200, body = ApiResponse<AllocationListDto>)))]
async fn list_allocations(State(state): State<AppState>) -> ApiResult<AllocationListDto> {
    Ok(Data(allocation_list(&state.service.allocations(None))))
}

/// Live allocations of one device.
#[utoipa::path(
    get, path = "/api/memory/allocations/device/{deviceId}", params(("deviceId" = String, Path)),
    responses((status = 200, body = ApiResponse<AllocationListDto>), (status = 404, description = "DEVICE_NOT_FOUND"))
)]
async fn list_device_allocations(
    State(state): State<AppState>,
    Path(device_id): Path<String>,
) -> ApiResult<AllocationListDto> {
    let id = state.service.resolve(&device_id)?;
    Ok(Data(allocation_list(&state.service.allocations(Some(id)))))
}

/// One allocation.
#[utoipa::path(
    get, path = "/api/memory/allocation/{allocationId}", params(("allocationId" = String, Path)),
    responses((status = 200, body = ApiResponse<AllocationDto>), (status = 404, description = "ALLOCATION_NOT_FOUND"))
)]
async fn get_allocation(State(state): State<AppState>, Path(allocation_id): Path<String>) -> ApiResult<AllocationDto> {
    Ok(Data(AllocationDto::from(&*state.service.allocation(&allocation_id)?)))
}

/// Returns every cached empty pool block on every device to the OS or driver.
#[utoipa::path(post, path = "/api/memory/operations/clear", responses((status = 200, body = ApiResponse<ClearDto>)))]
async fn clear_all(State(state): State<AppState>) -> ApiResult<ClearDto> {
    Ok(Data(clear_dto(&blocking(|| state.service.clear(None))?)))
}

/// Returns the cached empty pool blocks of one device to the OS or driver.
#[utoipa::path(
    post, path = "/api/memory/operations/clear/{deviceId}", params(("deviceId" = String, Path)),
    responses((status = 200, body = ApiResponse<ClearDto>), (status = 404, description = "DEVICE_NOT_FOUND"))
)]
async fn clear_device(State(state): State<AppState>, Path(device_id): Path<String>) -> ApiResult<ClearDto> {
    let id = state.service.resolve(&device_id)?;
    Ok(Data(clear_dto(&blocking(|| state.service.clear(Some(id)))?)))
}

/// Shares an allocation with another process: a CUDA IPC handle for device memory, a file under
/// /dev/shm for host memory. The allocation is never moved afterwards.
#[utoipa::path(
    post, path = "/api/memory/allocations/{allocationId}/export", params(("allocationId" = String, Path)),
    responses(
        (status = 200, body = ApiResponse<ExportDto>), (status = 404, description = "ALLOCATION_NOT_FOUND"),
        (status = 400, description = "INVALID_ARGUMENT (a reservation)"), (status = 409, description = "INVALID_OPERATION (memory that cannot be shared)")
    )
)]
async fn export(State(state): State<AppState>, Path(allocation_id): Path<String>) -> ApiResult<ExportDto> {
    let info = state.service.export(&allocation_id)?;
    Ok(Data(export_dto(&allocation_id, &info)))
}

fn query_u64(q: &HashMap<String, String>, name: &'static str, default: Option<u64>) -> Result<u64, ApiError> {
    match q.get(name) {
        Some(v) => v.parse().map_err(|_| ApiError::invalid(format!("{name}: '{v}' is not a non-negative integer"))),
        None => default.ok_or_else(|| ApiError::invalid(format!("{name}: required"))),
    }
}

/// Reads bytes of an allocation (`offset`, `length` ≤ 64 MiB), base64 in the envelope.
#[utoipa::path(
    get, path = "/api/memory/allocations/{allocationId}/data",
    params(("allocationId" = String, Path), ("offset" = Option<u64>, Query), ("length" = u64, Query)),
    responses((status = 200, body = ApiResponse<DataDto>), (status = 400, description = "INVALID_ARGUMENT"))
)]
async fn read_data(
    State(state): State<AppState>,
    Path(allocation_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<DataDto> {
    let offset = query_u64(&q, "offset", Some(0))?;
    let length = query_u64(&q, "length", None)?;
    if length > MAX_DATA_BYTES as u64 {
        return Err(ApiError::invalid(format!("length: at most {MAX_DATA_BYTES} bytes per read")));
    }
    let bytes = blocking(|| state.service.read_bytes(&allocation_id, offset, length))?;
    Ok(Data(DataDto {
        allocation_id,
        offset,
        length,
        data_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
    }))
}

/// Writes the request body (application/octet-stream, ≤ 64 MiB) into an allocation at `offset`.
#[utoipa::path(
    put, path = "/api/memory/allocations/{allocationId}/data",
    params(("allocationId" = String, Path), ("offset" = Option<u64>, Query)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = ApiResponse<WrittenDto>), (status = 400, description = "INVALID_ARGUMENT"))
)]
async fn write_data(
    State(state): State<AppState>,
    Path(allocation_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<WrittenDto> {
    let body = body.map_err(|e| ApiError::invalid(format!("body: {}", e.body_text())))?;
    let offset = query_u64(&q, "offset", Some(0))?;
    blocking(|| state.service.write_bytes(&allocation_id, offset, &body))?;
    Ok(Data(WrittenDto { allocation_id, offset, bytes_written: body.len() as u64 }))
}

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
    let service = state.service.clone();
    let record = blocking(move || service.transfer(req))?;
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
        (status = 500, description = "TRANSFER_FAILED"), (status = 507, description = "INSUFFICIENT_MEMORY for a new destination")
    )
)]
async fn transfer(
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
async fn transfer_status(State(state): State<AppState>, Path(transfer_id): Path<String>) -> ApiResult<TransferDto> {
    Ok(Data(TransferDto::from(&state.service.transfer_status(&transfer_id)?)))
}

/// Copies bytes between two existing allocations (same fields as a transfer).
#[utoipa::path(
    post, path = "/api/memory/copy", request_body = TransferBody,
    responses(
        (status = 200, body = ApiResponse<TransferDto>), (status = 202, body = ApiResponse<TransferDto>),
        (status = 400, description = "INVALID_ARGUMENT"), (status = 404, description = "ALLOCATION_NOT_FOUND")
    )
)]
async fn copy(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<TransferBody>,
) -> Result<impl IntoResponse, ApiError> {
    transfer_response(&state, parse_transfer(body, true)?)
}

fn parse_defrag(body: &Bytes) -> Result<(DefragOptions, Option<Duration>), ApiError> {
    let b: DefragBody = if body.iter().all(u8::is_ascii_whitespace) {
        DefragBody::default()
    } else {
        let v: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::invalid(format!("request body is not valid JSON: {e}")))?;
        let field_u64 = |name: &'static str| -> Result<Option<u64>, ApiError> {
            match v.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| ApiError::invalid(format!("{name}: must be a non-negative integer"))),
            }
        };
        DefragBody {
            strategy: match v.get("strategy") {
                None | Some(serde_json::Value::Null) => None,
                Some(x) => Some(x.as_str().ok_or_else(|| ApiError::invalid("strategy: must be a string"))?.to_string()),
            },
            max_bytes_to_move: field_u64("maxBytesToMove")?,
            max_allocations_to_move: field_u64("maxAllocationsToMove")?,
            max_time_ms: field_u64("maxTimeMs")?,
        }
    };
    let strategy = match &b.strategy {
        None => Strategy::Balanced,
        Some(t) => t.parse().map_err(|e: String| ApiError::invalid(format!("strategy: {e}")))?,
    };
    Ok((
        DefragOptions {
            strategy,
            max_bytes_to_move: b.max_bytes_to_move.unwrap_or(u64::MAX),
            max_allocations_to_move: b.max_allocations_to_move.map(|n| n as usize).unwrap_or(usize::MAX),
        },
        b.max_time_ms.map(Duration::from_millis),
    ))
}

/// Defragments every device: moves movable allocations (never exported or `movable: false`
/// ones) to compact the pools, then returns emptied blocks to the OS or driver.
#[utoipa::path(
    post, path = "/api/memory/operations/defragment", request_body(content = Option<DefragBody>),
    responses((status = 200, body = ApiResponse<DefragAllDto>), (status = 400, description = "INVALID_ARGUMENT"))
)]
async fn defragment_all(State(state): State<AppState>, body: Bytes) -> ApiResult<DefragAllDto> {
    let (options, max_time) = parse_defrag(&body)?;
    let reports = blocking(|| {
        state
            .service
            .device_ids()
            .into_iter()
            .map(|d| state.service.defragment(d, options, max_time))
            .collect::<Result<Vec<_>, _>>()
    })?;
    Ok(Data(DefragAllDto {
        bytes_moved: reports.iter().map(|r| r.bytes_moved).sum(),
        bytes_released: reports.iter().map(|r| r.bytes_released).sum(),
        devices: reports.iter().map(DefragDto::from).collect(),
    }))
}

/// Defragments one device (fields as for all devices).
#[utoipa::path(
    post, path = "/api/memory/operations/defragment/{deviceId}", params(("deviceId" = String, Path)),
    request_body(content = Option<DefragBody>),
    responses(
        (status = 200, body = ApiResponse<DefragDto>), (status = 400, description = "INVALID_ARGUMENT"),
        (status = 404, description = "DEVICE_NOT_FOUND")
    )
)]
async fn defragment_device(
    State(state): State<AppState>,
    Path(device_id): Path<String>,
    body: Bytes,
) -> ApiResult<DefragDto> {
    let id = state.service.resolve(&device_id)?;
    let (options, max_time) = parse_defrag(&body)?;
    let report = blocking(|| state.service.defragment(id, options, max_time))?;
    Ok(Data(DefragDto::from(&report)))
}

/// Every pool block of every device with its used and free ranges (for drawing).
#[utoipa::path(get, path = "/api/memory/pools", responses((status = 200, body = ApiResponse<PoolsDto>)))]
async fn pools_all(State(state): State<AppState>) -> ApiResult<PoolsDto> {
    let devices = state
        .service
        .device_ids()
        .into_iter()
        .map(|d| Ok(device_pools(d, &state.service.pools(d)?)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Data(PoolsDto { devices }))
}

/// The pool blocks of one device.
#[utoipa::path(
    get, path = "/api/memory/pools/{deviceId}", params(("deviceId" = String, Path)),
    responses((status = 200, body = ApiResponse<DevicePoolsDto>), (status = 404, description = "DEVICE_NOT_FOUND"))
)]
async fn pools_device(State(state): State<AppState>, Path(device_id): Path<String>) -> ApiResult<DevicePoolsDto> {
    let id = state.service.resolve(&device_id)?;
    Ok(Data(device_pools(id, &state.service.pools(id)?)))
}

/// Memory pressure of every device and overall (the highest).
#[utoipa::path(get, path = "/api/memory/pressure", responses((status = 200, body = ApiResponse<PressureAllDto>)))]
async fn pressure_all(State(state): State<AppState>) -> ApiResult<PressureAllDto> {
    let reports: Vec<_> =
        state.service.device_ids().into_iter().map(|d| state.pressure.report(d)).collect::<Result<_, _>>()?;
    let top = reports.iter().max_by_key(|r| (r.level, r.pressure_level));
    Ok(Data(PressureAllDto {
        pressure_level: top.map(|r| r.pressure_level).unwrap_or(0),
        pressure_category: top.map(|r| r.level).unwrap_or_default().as_str().into(),
        devices: reports.iter().map(|r| pressure_dto(&state, r)).collect(),
    }))
}

/// A pressure report with the recommendations for its device (the advice rules, at `high` or
/// above).
fn pressure_dto(state: &AppState, report: &crate::pressure::PressureReport) -> PressureDto {
    let mut dto = PressureDto::from(report);
    dto.recommended_actions = state.analytics.pressure_actions(report.device, report.level);
    dto
}

/// Memory pressure of one device: level, number, thresholds, raw signals, trend, actions.
#[utoipa::path(
    get, path = "/api/memory/pressure/{deviceId}", params(("deviceId" = String, Path)),
    responses((status = 200, body = ApiResponse<PressureDto>), (status = 404, description = "DEVICE_NOT_FOUND"))
)]
async fn pressure_device(State(state): State<AppState>, Path(device_id): Path<String>) -> ApiResult<PressureDto> {
    let id = state.service.resolve(&device_id)?;
    Ok(Data(pressure_dto(&state, &state.pressure.report(id)?)))
}

/// The last level changes (bounded), oldest first.
#[utoipa::path(get, path = "/api/memory/pressure/history", responses((status = 200, body = ApiResponse<PressureHistoryDto>)))]
async fn pressure_history(State(state): State<AppState>) -> ApiResult<PressureHistoryDto> {
    Ok(Data(PressureHistoryDto { events: state.pressure.history().iter().map(PressureEventDto::from).collect() }))
}

/// Server-sent events: one `pressure` event (JSON `PressureEventDto`) per level change, pushed
/// as the sampler sees it. Not an envelope: a stream of `event:`/`data:` lines.
#[utoipa::path(get, path = "/api/memory/events", responses((status = 200, description = "text/event-stream of PressureEventDto", content_type = "text/event-stream")))]
async fn events(State(state): State<AppState>) -> Sse<impl tokio_stream::Stream<Item = Result<Event, Infallible>>> {
    use tokio_stream::StreamExt as _;
    let pressure = tokio_stream::wrappers::BroadcastStream::new(state.pressure.subscribe()).filter_map(|e| {
        let e = e.ok()?;
        let json = serde_json::to_string(&PressureEventDto::from(&e)).ok()?;
        Some(Ok(Event::default().event("pressure").data(json)))
    });
    // Optimizer runs that did something (watchdog, manual, admission) go out as `optimization`.
    let optimization = tokio_stream::wrappers::BroadcastStream::new(state.optimizer.subscribe()).filter_map(|o| {
        let o = o.ok().filter(|o| o.optimization_triggered)?;
        let json = serde_json::to_string(&o).ok()?;
        Some(Ok(Event::default().event("optimization").data(json)))
    });
    let stream = pressure.merge(optimization);
    let mut stop = state.shutdown.clone();
    let stream = futures_util::StreamExt::take_until(stream, async move {
        let _ = stop.wait_for(|v| *v).await;
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
