//! The optimizer: `POST /api/memory/models/optimize`, its history, and the `optimization` events.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OptimizeBody {
    /// `cpu` or `cuda:N` (aliases accepted).
    pub device_id: String,
    /// 0–100: utilization to bring the device down to (default 50).
    pub target_pressure_level: Option<f64>,
    /// `conservative` | `balanced` (default) | `aggressive` | `smart`.
    pub strategy: Option<String>,
    /// -1 (default): no limit.
    pub max_models_to_unload: Option<i64>,
    /// Bytes to free at least (default 0).
    pub min_memory_to_free: Option<u64>,
    /// Run even when the device is below the target.
    #[serde(default)]
    pub force_optimization: bool,
    /// Model ids never touched.
    #[serde(default)]
    pub exclude_models: Vec<String>,
    /// When given, only these model ids may be offloaded or unloaded (each must be on the device).
    #[serde(default)]
    pub models: Vec<String>,
    /// Time limit, checked between steps (default 30000).
    pub max_optimization_time_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    /// `trimCache`, `clear`, `offload` or `unload`.
    pub action: String,
    /// The model id, or the worker / `memwarden` for cache steps.
    pub target: String,
    pub worker_id: Option<String>,
    /// What the holder said it released.
    pub claimed_bytes: u64,
    /// What the device measurably gained.
    pub measured_bytes: i64,
    pub duration_ms: f64,
    /// The measured gain reached at least half the claim within `optimizer.verify_ms` (always
    /// true for claims of 0).
    pub verified: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OptimizeOutcome {
    pub device_id: String,
    pub trigger: String,
    pub optimization_triggered: bool,
    pub optimization_strategy: String,
    /// Bytes freed on the device, measured (see the module doc); negative if usage grew meanwhile.
    pub memory_freed: i64,
    /// What the holders claimed, summed.
    pub memory_claimed: u64,
    /// What the run set out to free (`max(minMemoryToFree, down to the target)`, times 1.5 for
    /// aggressive).
    pub target_bytes: u64,
    pub models_unloaded: Vec<String>,
    pub models_offloaded: Vec<String>,
    pub steps: Vec<StepRecord>,
    /// 0–100 and the level, measured after the run.
    pub new_pressure_level: u8,
    pub new_pressure_category: String,
    pub previous_pressure_level: u8,
    pub optimization_time_ms: f64,
    pub message: String,
    pub started_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OptimizeHistoryDto {
    pub runs: Vec<OptimizeOutcome>,
}
