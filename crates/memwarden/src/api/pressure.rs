//! Pressure routes: levels now, their history, and the server-sent event stream.

use super::dto::*;
use super::envelope::{ApiResponse, Data};
use super::{ApiResult, AppState};
use crate::app::allocations;
use crate::app::observe::{self, Pressure};
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use std::convert::Infallible;

/// Memory pressure of every device and overall (the highest).
#[utoipa::path(get, path = "/api/memory/pressure", responses((status = 200, body = ApiResponse<PressureAllDto>)))]
pub async fn pressure_all(State(state): State<AppState>) -> ApiResult<PressureAllDto> {
    let reports = observe::pressure(&state.app, None)?;
    let top = reports.iter().map(|p| &p.report).max_by_key(|r| (r.level, r.pressure_level));
    Ok(Data(PressureAllDto {
        pressure_level: top.map(|r| r.pressure_level).unwrap_or(0),
        pressure_category: top.map(|r| r.level).unwrap_or_default().as_str().into(),
        devices: reports.into_iter().map(pressure_dto).collect(),
    }))
}

/// A pressure report with the recommendations for its device (the advice rules, at `high` or
/// above).
fn pressure_dto(p: Pressure) -> PressureDto {
    PressureDto { recommended_actions: p.actions, ..PressureDto::from(&p.report) }
}

/// Memory pressure of one device: level, number, thresholds, raw signals, trend, actions.
#[utoipa::path(
    get, path = "/api/memory/pressure/{deviceId}", params(("deviceId" = String, Path)),
    responses((status = 200, body = ApiResponse<PressureDto>), (status = 404, description = "DEVICE_NOT_FOUND"))
)]
pub async fn pressure_device(State(state): State<AppState>, Path(device_id): Path<String>) -> ApiResult<PressureDto> {
    let id = allocations::resolve(&state.app, &device_id)?;
    Ok(Data(observe::pressure(&state.app, Some(id))?.into_iter().map(pressure_dto).next().ok_or_else(|| {
        super::envelope::ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "no report")
    })?))
}

/// The last level changes (bounded), oldest first.
#[utoipa::path(get, path = "/api/memory/pressure/history", responses((status = 200, body = ApiResponse<PressureHistoryDto>)))]
pub async fn pressure_history(State(state): State<AppState>) -> ApiResult<PressureHistoryDto> {
    Ok(Data(PressureHistoryDto {
        events: observe::pressure_history(&state.app).iter().map(PressureEventDto::from).collect(),
    }))
}

/// Server-sent events: one `pressure` event (JSON `PressureEventDto`) per level change, pushed
/// as the sampler sees it; `optimization` per optimizer run that did something; `modelState`
/// (JSON `ModelStateEventDto`) per state change of a held model. Not an envelope: a stream of
/// `event:`/`data:` lines.
#[utoipa::path(get, path = "/api/memory/events", responses((status = 200, description = "text/event-stream of PressureEventDto (pressure), OptimizeOutcome (optimization) and ModelStateEventDto (modelState)", content_type = "text/event-stream")))]
pub async fn events(State(state): State<AppState>) -> Sse<impl tokio_stream::Stream<Item = Result<Event, Infallible>>> {
    use tokio_stream::StreamExt as _;
    let pressure =
        tokio_stream::wrappers::BroadcastStream::new(observe::pressure_changes(&state.app)).filter_map(|e| {
            let e = e.ok()?;
            let json = serde_json::to_string(&PressureEventDto::from(&e)).ok()?;
            Some(Ok(Event::default().event("pressure").data(json)))
        });
    // Optimizer runs that did something (watchdog, manual, admission) go out as `optimization`.
    let optimization =
        tokio_stream::wrappers::BroadcastStream::new(observe::optimizer_runs(&state.app)).filter_map(|o| {
            let o = o.ok().filter(|o| o.optimization_triggered)?;
            let json = serde_json::to_string(&o).ok()?;
            Some(Ok(Event::default().event("optimization").data(json)))
        });
    // Every state change of a held model goes out as `modelState` (`ModelStateEventDto`).
    let model_state = tokio_stream::wrappers::BroadcastStream::new(observe::model_states(&state.app)).filter_map(|e| {
        let json = serde_json::to_string(&e.ok()?).ok()?;
        Some(Ok(Event::default().event("modelState").data(json)))
    });
    let stream = pressure.merge(optimization).merge(model_state);
    let mut stop = state.shutdown.clone();
    let stream = futures_util::StreamExt::take_until(stream, async move {
        let _ = stop.wait_for(|v| *v).await;
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
