//! The envelope every `/api/` response comes in.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A successful answer: `{"success": true, "isSuccess": true, "data", "error": null, "message":
/// null, "timestamp", "correlationId"}`. `isSuccess` repeats `success` for the seed's clients,
/// which test `IsSuccess`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiResponse<T> {
    pub success: bool,
    #[serde(default)]
    pub is_success: bool,
    pub data: Option<T>,
    pub error: Option<ErrorBody>,
    /// The error's message on a failure; null on success.
    #[serde(default)]
    pub message: Option<String>,
    /// RFC 3339 UTC.
    pub timestamp: String,
    pub correlation_id: String,
}

impl<T> ApiResponse<T> {
    /// The success envelope around `data`.
    pub fn ok(data: T, timestamp: String, correlation_id: String) -> Self {
        ApiResponse {
            success: true,
            is_success: true,
            data: Some(data),
            error: None,
            message: None,
            timestamp,
            correlation_id,
        }
    }
}

/// A failed answer (every 4xx and 5xx of `/api/`, `/health` and `/metrics`): `success` and
/// `isSuccess` false, `data` null, `error` set and its message repeated in `message`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResponse {
    /// Always false.
    pub success: bool,
    /// Always false.
    pub is_success: bool,
    /// Always null.
    #[schema(value_type = Option<Object>)]
    pub data: Option<serde_json::Value>,
    pub error: ErrorBody,
    pub message: String,
    /// RFC 3339 UTC.
    pub timestamp: String,
    pub correlation_id: String,
}

impl ErrorResponse {
    pub fn new(error: ErrorBody, timestamp: String, correlation_id: String) -> Self {
        ErrorResponse {
            success: false,
            is_success: false,
            data: None,
            message: error.message.clone(),
            error,
            timestamp,
            correlation_id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Stable UPPER_SNAKE code, e.g. `INSUFFICIENT_MEMORY`.
    pub code: String,
    pub message: String,
    pub status_code: u16,
}
