//! Long operations run in the background (`"async": true` on a model load or a
//! defragmentation): `GET /api/memory/operations[/{operationId}]`. Their progress has the shape of
//! a background transfer's (`TransferDto`): `status`, `bytesDone`, `progress`, `bytesPerSecond`,
//! `durationMs`, `startedAt`, `completedAt`, `error`.

use super::{DefragAllDto, DefragDto, LoadedDto};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum OperationKind {
    /// `POST /api/memory/models/load`.
    ModelLoad,
    /// `POST /api/memory/operations/defragment[/{deviceId}]`.
    Defragment,
}

impl OperationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::ModelLoad => "modelLoad",
            OperationKind::Defragment => "defragment",
        }
    }
}

/// Where an operation is: as a transfer's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum OperationStatus {
    Running,
    Completed,
    Failed,
}

impl OperationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationStatus::Running => "running",
            OperationStatus::Completed => "completed",
            OperationStatus::Failed => "failed",
        }
    }
}

/// What a finished operation answers: the `data` the synchronous request gives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum OperationResult {
    /// A model load (`POST /api/memory/models/load`).
    Load(Box<LoadedDto>),
    /// One device's defragmentation (`…/defragment/{deviceId}`).
    Defragment(DefragDto),
    /// Every device's defragmentation (`…/defragment`).
    DefragmentAll(DefragAllDto),
}

/// An operation run in the background: the 202 answer to `"async": true`, and
/// `GET /api/memory/operations/{operationId}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperationDto {
    pub operation_id: String,
    pub kind: OperationKind,
    pub status: OperationStatus,
    /// The device it works on; null for a defragmentation of every device.
    pub device_id: Option<String>,
    /// Bytes read (a load memwarden holds), moved (a defragmentation), or, for a load by a
    /// worker, 0 until it ends (the worker reports nothing before).
    pub bytes_done: u64,
    /// The bytes it is to handle as known now: the model's tensor bytes (or the file's size; 0
    /// when the load shares the copy memwarden already holds); for a defragmentation, what was
    /// moved plus what the plan being carried out has left (it changes as each pool is
    /// planned).
    pub bytes_total: u64,
    /// `bytesDone / bytesTotal`, 0–1 (1 once completed with nothing to do).
    pub progress: f64,
    /// Achieved so far (over the whole operation once finished).
    pub bytes_per_second: f64,
    pub duration_ms: f64,
    pub started_at: String,
    pub completed_at: Option<String>,
    /// Why it failed (the message the synchronous request would have answered).
    pub error: Option<String>,
    /// The failure's stable code, as the synchronous request's `error.code` (e.g.
    /// `FILE_NOT_FOUND`).
    pub error_code: Option<String>,
    /// Where to read it: `/api/memory/operations/{operationId}` (also the 202's `Location`).
    pub location: String,
    /// Once completed: the synchronous request's `data`.
    pub result: Option<OperationResult>,
}

/// `GET /api/memory/operations`: the running ones and the recently finished ones, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperationsDto {
    pub operations: Vec<OperationDto>,
}
