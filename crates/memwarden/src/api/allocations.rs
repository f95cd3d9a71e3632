//! Allocation routes: allocate, free, list, one allocation, clear, export, and reading and
//! writing an allocation's bytes.

use super::dto::*;
use super::envelope::{ApiError, ApiJson, ApiResponse, Data, NoBody};
use super::{blocking, query_u64, ApiResult, AppState, MAX_DATA_BYTES};
use crate::service::{AllocateRequest, AllocationFilter, ExportVia, ListPosition, DEFAULT_ALIGNMENT_BYTES};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use base64::Engine as _;
use memwarden_core::{DeviceId, MemoryKind};
use std::collections::HashMap;

fn parse_allocate(body: AllocateBody, device: String) -> Result<AllocateRequest, ApiError> {
    let size = body.size_bytes.ok_or_else(|| ApiError::invalid("sizeBytes: required"))?;
    if size <= 0 {
        return Err(ApiError::invalid(format!("sizeBytes: must be greater than 0 (got {size})")));
    }
    let alignment = body.alignment.unwrap_or(DEFAULT_ALIGNMENT_BYTES as i64);
    if alignment <= 0 || !(alignment as u64).is_power_of_two() {
        return Err(ApiError::invalid(format!("alignment: must be a power of two (got {alignment})")));
    }
    let kind = parse_kind(body.memory_type.as_deref())?;
    Ok(AllocateRequest {
        device,
        size_bytes: size as u64,
        kind,
        alignment_bytes: alignment as u64,
        purpose: body.purpose,
        owner: body.owner,
        owner_pid: body.owner_pid,
        owner_client: None,
        persistent: body.persistent.unwrap_or(false),
        movable: body.movable.unwrap_or(true),
    })
}

fn parse_kind(text: Option<&str>) -> Result<Option<MemoryKind>, ApiError> {
    text.map(|t| t.parse::<MemoryKind>().map_err(|e| ApiError::invalid(format!("memoryType: {e}")))).transpose()
}

fn do_allocate(state: &AppState, req: AllocateRequest) -> Result<(StatusCode, Data<AllocationDto>), ApiError> {
    let record = match state.service.allocate_or_defer(req)? {
        Ok(record) => record,
        Err(pending) => blocking(|| state.service.allocate_pending(pending))?,
    };
    Ok((StatusCode::CREATED, Data(AllocationDto::from(&*record))))
}

/// Allocates memory on the device named in the body (`deviceId`). Without one, memwarden picks
/// the device with the most available memory of the requested kind (`memoryType`; without it,
/// each device's default kind).
#[utoipa::path(
    post, path = "/api/memory/allocations/allocate", request_body = AllocateBody,
    responses(
        (status = 201, body = ApiResponse<AllocationDto>),
        (status = 400, description = "INVALID_ARGUMENT"), (status = 404, description = "DEVICE_NOT_FOUND"),
        (status = 507, description = "INSUFFICIENT_MEMORY, with requested and available bytes")
    )
)]
pub async fn allocate(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<AllocateBody>,
) -> Result<impl IntoResponse, ApiError> {
    let device = match &body.device_id {
        Some(d) => d.clone(),
        None => {
            let kind = parse_kind(body.memory_type.as_deref())?;
            state.service.roomiest_device(kind)?.to_string()
        }
    };
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
pub async fn allocate_on_device(
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
pub async fn free(State(state): State<AppState>, Path(allocation_id): Path<String>) -> ApiResult<FreedDto> {
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

/// Most allocations one listing page holds without `limit`.
pub const DEFAULT_PAGE_LIMIT: usize = 1000;
/// Most allocations one listing page may hold.
pub const MAX_PAGE_LIMIT: usize = 10_000;

/// A listing's query: the filters, where the page starts and how long it is. On the per-device
/// route the path names the device and a `deviceId` in the query is not read.
fn list_query(
    state: &AppState,
    q: &HashMap<String, String>,
    device: Option<DeviceId>,
) -> Result<(AllocationFilter, Option<ListPosition>, usize), ApiError> {
    let limit = match q.get("limit") {
        None => DEFAULT_PAGE_LIMIT,
        Some(v) => page_limit(v)?,
    };
    let device = match (device, q.get("deviceId")) {
        (Some(d), _) => Some(d),
        (None, Some(text)) => Some(state.service.resolve(text)?),
        (None, None) => None,
    };
    let filter = AllocationFilter {
        device,
        kind: parse_kind(q.get("memoryType").map(String::as_str))?,
        owner: q.get("owner").cloned(),
        purpose: q.get("purpose").cloned(),
    };
    let after = q.get("cursor").map(|c| decode_cursor(state, c)).transpose()?;
    Ok((filter, after, limit))
}

fn page_limit(v: &str) -> Result<usize, ApiError> {
    v.parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_PAGE_LIMIT).contains(n))
        .ok_or_else(|| ApiError::invalid(format!("limit: '{v}' is not an integer from 1 to {MAX_PAGE_LIMIT}")))
}

/// A cursor is `{run}.{allocatedAtNs}.{id}` in URL-safe base64: the position of the page's last
/// allocation, and the daemon run (its start, Unix ns) that gave it. The position stays valid
/// when that allocation is freed; a cursor of another run is refused, since the allocations it
/// paged through are gone.
fn encode_cursor(state: &AppState, p: &ListPosition) -> String {
    let run = state.service.started_at().unix_timestamp_nanos();
    let text = format!("{run}.{}.{}", p.allocated_at.unix_timestamp_nanos(), p.id);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

fn decode_cursor(state: &AppState, cursor: &str) -> Result<ListPosition, ApiError> {
    let garbage = || {
        ApiError::invalid(format!(
            "cursor: '{cursor}' is not a cursor this daemon gave (pass nextCursor back unchanged)"
        ))
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).map_err(|_| garbage())?;
    let text = String::from_utf8(bytes).map_err(|_| garbage())?;
    let mut parts = text.splitn(3, '.');
    let mut number = || parts.next().and_then(|n| n.parse::<i128>().ok()).ok_or_else(garbage);
    let (run, at) = (number()?, number()?);
    let id = parts.next().filter(|id| !id.is_empty()).ok_or_else(garbage)?;
    let allocated_at = time::OffsetDateTime::from_unix_timestamp_nanos(at).map_err(|_| garbage())?;
    if run != state.service.started_at().unix_timestamp_nanos() {
        return Err(ApiError::invalid(
            "cursor: given by another run of the daemon (its allocations are gone); list again without a cursor",
        ));
    }
    Ok(ListPosition { allocated_at, id: id.to_string() })
}

fn list_page(state: &AppState, q: &HashMap<String, String>, device: Option<DeviceId>) -> ApiResult<AllocationListDto> {
    let (filter, after, limit) = list_query(state, q, device)?;
    let page = state.service.allocation_page(&filter, after.as_ref(), limit);
    let next_cursor = page.next.as_ref().map(|p| encode_cursor(state, p));
    Ok(Data(allocation_list(&page, next_cursor)))
}

/// Live allocations, oldest first (`allocatedAt`, then id), a page at a time: `limit` of them
/// after `cursor`, with the filters' matches counted in full (`count`, `totalBytes`). Paging
/// on with `nextCursor` never repeats or skips an allocation that lives throughout, whatever
/// else is allocated or freed meanwhile.
#[utoipa::path(
    get, path = "/api/memory/allocations",
    params(
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "allocations per page, 1 to 10000; default 1000"),
        ("cursor" = Option<String>, Query, description = "the previous page's nextCursor; without it, the first page"),
        ("deviceId" = Option<String>, Query, description = "only this device's (cpu, cuda:N, or an alias)"),
        ("memoryType" = Option<String>, Query, description = "only this kind's (host, pinned, device, reservation, or a seed alias)"),
        ("owner" = Option<String>, Query, description = "only this owner's (exact match)"),
        ("purpose" = Option<String>, Query, description = "only those with this purpose (exact match)")
    ),
    responses((status = 200, body = ApiResponse<AllocationListDto>), (status = 400, description = "INVALID_ARGUMENT: limit, cursor or memoryType"))
)]
pub async fn list_allocations(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<AllocationListDto> {
    list_page(&state, &q, None)
}

/// Live allocations of one device, paged and filtered as `GET /api/memory/allocations`.
#[utoipa::path(
    get, path = "/api/memory/allocations/device/{deviceId}",
    params(
        ("deviceId" = String, Path, description = "cpu, cuda:N, or an alias"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "allocations per page, 1 to 10000; default 1000"),
        ("cursor" = Option<String>, Query, description = "the previous page's nextCursor; without it, the first page"),
        ("memoryType" = Option<String>, Query, description = "only this kind's (host, pinned, device, reservation, or a seed alias)"),
        ("owner" = Option<String>, Query, description = "only this owner's (exact match)"),
        ("purpose" = Option<String>, Query, description = "only those with this purpose (exact match)")
    ),
    responses(
        (status = 200, body = ApiResponse<AllocationListDto>), (status = 400, description = "INVALID_ARGUMENT: limit, cursor or memoryType"),
        (status = 404, description = "DEVICE_NOT_FOUND")
    )
)]
pub async fn list_device_allocations(
    State(state): State<AppState>,
    Path(device_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<AllocationListDto> {
    let id = state.service.resolve(&device_id)?;
    list_page(&state, &q, Some(id))
}

/// One allocation.
#[utoipa::path(
    get, path = "/api/memory/allocation/{allocationId}", params(("allocationId" = String, Path)),
    responses((status = 200, body = ApiResponse<AllocationDto>), (status = 404, description = "ALLOCATION_NOT_FOUND"))
)]
pub async fn get_allocation(
    State(state): State<AppState>,
    Path(allocation_id): Path<String>,
) -> ApiResult<AllocationDto> {
    Ok(Data(AllocationDto::from(&*state.service.allocation(&allocation_id)?)))
}

/// Returns every cached empty pool block on every device to the OS or driver.
#[utoipa::path(post, path = "/api/memory/operations/clear", responses((status = 200, body = ApiResponse<ClearDto>)))]
pub async fn clear_all(State(state): State<AppState>, _: NoBody) -> ApiResult<ClearDto> {
    Ok(Data(clear_dto(&blocking(|| state.service.clear(None))?)))
}

/// Returns the cached empty pool blocks of one device to the OS or driver.
#[utoipa::path(
    post, path = "/api/memory/operations/clear/{deviceId}", params(("deviceId" = String, Path)),
    responses((status = 200, body = ApiResponse<ClearDto>), (status = 404, description = "DEVICE_NOT_FOUND"))
)]
pub async fn clear_device(
    State(state): State<AppState>,
    Path(device_id): Path<String>,
    _: NoBody,
) -> ApiResult<ClearDto> {
    let id = state.service.resolve(&device_id)?;
    Ok(Data(clear_dto(&blocking(|| state.service.clear(Some(id)))?)))
}

/// Shares an allocation with another process: a CUDA IPC handle for device memory, a file under
/// /dev/shm for host memory. The allocation is never moved afterwards.
#[utoipa::path(
    post, path = "/api/memory/allocations/{allocationId}/export", params(("allocationId" = String, Path)),
    responses(
        (status = 200, body = ApiResponse<ExportDto>), (status = 404, description = "ALLOCATION_NOT_FOUND"),
        (status = 400, description = "INVALID_ARGUMENT (a reservation)"), (status = 409, description = "INVALID_OPERATION (memory that cannot be shared, or Vulkan memory, which only the Unix socket exports)")
    )
)]
pub async fn export(
    State(state): State<AppState>,
    Path(allocation_id): Path<String>,
    _: NoBody,
) -> ApiResult<ExportDto> {
    // May wait for a defragmentation batch that is moving this allocation.
    let info = blocking(|| state.service.export(&allocation_id, ExportVia::Http))?;
    Ok(Data(info.dto(&allocation_id)))
}

/// Reads bytes of an allocation (`offset`, `length` ≤ 64 MiB), base64 in the envelope.
#[utoipa::path(
    get, path = "/api/memory/allocations/{allocationId}/data",
    params(("allocationId" = String, Path), ("offset" = Option<u64>, Query), ("length" = u64, Query)),
    responses((status = 200, body = ApiResponse<DataDto>), (status = 400, description = "INVALID_ARGUMENT"))
)]
pub async fn read_data(
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
pub async fn write_data(
    State(state): State<AppState>,
    Path(allocation_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<WrittenDto> {
    let body = body.map_err(|e| match e.status() {
        axum::http::StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(super::MAX_DATA_BYTES as u64),
        _ => ApiError::invalid(format!("body: {}", e.body_text())),
    })?;
    let offset = query_u64(&q, "offset", Some(0))?;
    blocking(|| state.service.write_bytes(&allocation_id, offset, &body))?;
    Ok(Data(WrittenDto { allocation_id, offset, bytes_written: body.len() as u64 }))
}
