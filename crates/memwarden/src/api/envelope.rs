//! The response envelope every `/api/` route uses (its type is `memwarden_protocol::api::ApiResponse`),
//! the one error type with its HTTP mapping, and a JSON extractor that gives malformed bodies the
//! same envelope.

use crate::service::ServiceError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use time::OffsetDateTime;

pub use memwarden_protocol::api::{rfc3339, ApiResponse, ErrorBody};

tokio::task_local! {
    /// The correlation id of the request being served (set by the middleware in `api::mod`).
    pub static CORRELATION_ID: String;
}

pub fn correlation_id() -> String {
    CORRELATION_ID.try_with(Clone::clone).unwrap_or_default()
}

/// A successful response: `Data(data)` in the envelope.
pub struct Data<T>(pub T);

impl<T: Serialize> IntoResponse for Data<T> {
    fn into_response(self) -> Response {
        let body = ApiResponse {
            success: true,
            data: Some(self.0),
            error: None,
            timestamp: rfc3339(OffsetDateTime::now_utc()),
            correlation_id: correlation_id(),
        };
        axum::Json(body).into_response()
    }
}

/// An error response with its HTTP status and stable code.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let (status, code) = match &e {
            ServiceError::DeviceNotFound { .. } => (StatusCode::NOT_FOUND, "DEVICE_NOT_FOUND"),
            ServiceError::AllocationNotFound { .. } => (StatusCode::NOT_FOUND, "ALLOCATION_NOT_FOUND"),
            ServiceError::InvalidArgument { .. } => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
            ServiceError::InsufficientMemory { .. } => (StatusCode::INSUFFICIENT_STORAGE, "INSUFFICIENT_MEMORY"),
            ServiceError::InvalidOperation(_) => (StatusCode::CONFLICT, "INVALID_OPERATION"),
            ServiceError::TransferNotFound { .. } => (StatusCode::NOT_FOUND, "TRANSFER_NOT_FOUND"),
            ServiceError::TransferFailed { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "TRANSFER_FAILED"),
            ServiceError::BackendUnavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "BACKEND_UNAVAILABLE"),
            ServiceError::BackendFailed { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "BACKEND_ERROR"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, message = %self.message, "request failed");
        }
        let body: ApiResponse<()> = ApiResponse {
            success: false,
            data: None,
            error: Some(ErrorBody { code: self.code.into(), message: self.message, status_code: self.status.as_u16() }),
            timestamp: rfc3339(OffsetDateTime::now_utc()),
            correlation_id: correlation_id(),
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// `axum::Json`, but a body that is not JSON, has the wrong content type or the wrong field
/// types is answered with the envelope: 400 `INVALID_ARGUMENT` naming the field.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let message = match &r {
        JsonRejection::JsonDataError(e) => {
            // axum's text is "Failed to deserialize ...: <path>: <serde message>"; keep the useful part.
            let full = e.body_text();
            let detail = full.split_once("target type: ").map(|(_, d)| d.to_string()).unwrap_or(full);
            format!("invalid request body: {detail}")
        }
        JsonRejection::JsonSyntaxError(_) => format!("request body is not valid JSON: {}", r.body_text()),
        JsonRejection::MissingJsonContentType(_) => {
            "request body must be JSON with Content-Type: application/json".into()
        }
        _ => format!("invalid request body: {}", r.body_text()),
    };
    ApiError::invalid(message)
}
