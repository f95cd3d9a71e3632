//! The envelope every `/api/` response comes in.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `{"success", "data", "error", "timestamp", "correlationId"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiResponse<T> {
    pub success: bool,
    pub data: Option<T>,
    pub error: Option<ErrorBody>,
    /// RFC 3339 UTC.
    pub timestamp: String,
    pub correlation_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Stable UPPER_SNAKE code, e.g. `INSUFFICIENT_MEMORY`.
    pub code: String,
    pub message: String,
    pub status_code: u16,
}
