//! Transfers and copies between allocations: `POST /api/memory/transfer`, `POST /api/memory/copy`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `POST /api/memory/transfer` and `POST /api/memory/copy`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransferBody {
    pub source_allocation_id: Option<String>,
    /// Default 0.
    pub source_offset: Option<i64>,
    /// An existing destination; or give `targetDeviceId` for a new one.
    pub destination_allocation_id: Option<String>,
    /// Default 0.
    pub destination_offset: Option<i64>,
    /// Transfer into a new allocation on this device (transfer only).
    pub target_device_id: Option<String>,
    /// Memory kind of the new allocation; default the device's (`device` on GPUs, `host` on cpu).
    pub target_memory_type: Option<String>,
    /// Default: the rest of the source from `sourceOffset`.
    pub size_bytes: Option<i64>,
    /// `copy` (default) keeps the source, `move` frees it once the bytes have arrived.
    pub transfer_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransferDto {
    pub transfer_id: String,
    /// `running` | `completed` | `failed`.
    pub status: String,
    /// `copy` | `move`.
    pub transfer_type: String,
    pub source_allocation_id: String,
    pub source_device_id: String,
    pub source_offset: u64,
    pub destination_allocation_id: String,
    pub destination_device_id: String,
    pub destination_offset: u64,
    pub size_bytes: u64,
    pub bytes_done: u64,
    /// 0–1.
    pub progress: f64,
    /// Achieved so far.
    pub bytes_per_second: f64,
    pub duration_ms: f64,
    pub started_at: String,
    pub completed_at: Option<String>,
    pub error: Option<String>,
}
