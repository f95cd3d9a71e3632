//! Pool blocks (`GET /api/memory/pools[/{deviceId}]`) and defragmentation
//! (`POST /api/memory/operations/defragment[/{deviceId}]`).

use super::status::PoolStatusDto;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `POST /api/memory/operations/defragment[/{deviceId}]` (optional).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefragBody {
    /// `quick` | `balanced` (default) | `thorough`.
    pub strategy: Option<String>,
    pub max_bytes_to_move: Option<u64>,
    pub max_allocations_to_move: Option<u64>,
    /// Time limit, checked between moves.
    pub max_time_ms: Option<u64>,
    /// Run in the background: answer 202 with the operation (`OperationDto`) at once and follow
    /// it at `GET /api/memory/operations/{operationId}`.
    #[serde(default, rename = "async")]
    pub run_async: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefragDto {
    pub device_id: String,
    pub strategy: String,
    pub fragmentation_before: f64,
    pub fragmentation_after: f64,
    pub bytes_moved: u64,
    pub allocations_moved: usize,
    pub blocks_released: usize,
    pub bytes_released: u64,
    pub largest_free_block_before: u64,
    pub largest_free_block_after: u64,
    pub duration_ms: f64,
    /// Time spent copying bytes; `bytesMoved / movingMs` is the move throughput.
    pub moving_ms: f64,
    pub passes: u32,
    /// Planned moves not carried out (time limit, or a failed copy).
    pub moves_skipped: usize,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefragAllDto {
    pub bytes_moved: u64,
    pub bytes_released: u64,
    pub devices: Vec<DefragDto>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RangeDto {
    pub offset: u64,
    pub size_bytes: u64,
    pub free: bool,
    pub allocation_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockDto {
    pub block_id: u32,
    pub size_bytes: u64,
    /// Holds one large allocation; released when it is freed.
    pub dedicated: bool,
    pub address: String,
    pub ranges: Vec<RangeDto>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolDumpDto {
    #[serde(flatten)]
    pub stats: PoolStatusDto,
    pub blocks: Vec<BlockDto>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DevicePoolsDto {
    pub device_id: String,
    pub pools: Vec<PoolDumpDto>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolsDto {
    pub devices: Vec<DevicePoolsDto>,
}
