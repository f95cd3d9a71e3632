//! The optimizer: `POST /api/memory/models/optimize`, its history, and the `optimization` events.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OptimizeBody {
    /// `cpu` or `cuda:N` (aliases accepted). Without it: every device above the target (or at
    /// `high` or above), most pressured first, answered with [`OptimizeRunsDto`].
    #[serde(default)]
    pub device_id: Option<String>,
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
    /// The step succeeded and its measured gain reached at least half the claim within
    /// `optimizer.verify_ms` (a successful claim of 0 is verified). A step with an `error` is
    /// never verified.
    pub verified: bool,
    pub error: Option<String>,
}

/// A rung of the ladder a run left out, and why (e.g. no worker to ask: the rungs that need one
/// are skipped, the others run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkippedRung {
    /// `trimCache` (the holders' allocator caches), `offload`, `unload` (the holders' models),
    /// or `drop` (memwarden's held weights on `cpu`).
    pub rung: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OptimizeOutcome {
    pub device_id: String,
    pub trigger: String,
    pub optimization_triggered: bool,
    pub optimization_strategy: String,
    /// Bytes freed on the device, measured (see the module doc); 0 when the measurement shows no
    /// gain (a release lost in noise, or usage that grew meanwhile).
    pub memory_freed: u64,
    /// The measured change itself, signed: negative when the device's usage grew during the run
    /// by more than the run released.
    pub memory_measured: i64,
    /// What the holders claimed, summed.
    pub memory_claimed: u64,
    /// What the run set out to free (`max(minMemoryToFree, down to the target)`, times 1.5 for
    /// aggressive).
    pub target_bytes: u64,
    pub models_unloaded: Vec<String>,
    pub models_offloaded: Vec<String>,
    pub steps: Vec<StepRecord>,
    /// The rungs this run left out, with the reason; empty when every rung could run.
    #[serde(default)]
    pub rungs_skipped: Vec<SkippedRung>,
    /// 0–100 and the level, measured after the run.
    pub new_pressure_level: u8,
    pub new_pressure_category: String,
    pub previous_pressure_level: u8,
    pub optimization_time_ms: f64,
    pub message: String,
    pub started_at: String,
}

/// The answer to an optimize request without `deviceId`: one run per device optimized, most
/// pressured first, and their totals under the single-device answer's names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OptimizeRunsDto {
    /// Whether any run was triggered.
    pub optimization_triggered: bool,
    /// Summed over the runs.
    pub memory_freed: u64,
    pub models_unloaded: Vec<String>,
    pub models_offloaded: Vec<String>,
    /// Which devices were optimized, or why none was.
    pub message: String,
    pub runs: Vec<OptimizeOutcome>,
}

/// `POST /api/memory/models/optimize`'s `data`: one device's run when `deviceId` is given, the
/// runs over the pressured devices otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum OptimizeReply {
    Device(OptimizeOutcome),
    Devices(OptimizeRunsDto),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OptimizeHistoryDto {
    pub runs: Vec<OptimizeOutcome>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn outcome() -> OptimizeOutcome {
        OptimizeOutcome {
            device_id: "cpu".into(),
            trigger: "manual".into(),
            optimization_triggered: true,
            optimization_strategy: "balanced".into(),
            memory_freed: 0,
            memory_measured: -4096,
            memory_claimed: 0,
            target_bytes: 1,
            models_unloaded: vec![],
            models_offloaded: vec![],
            steps: vec![],
            rungs_skipped: vec![],
            new_pressure_level: 3,
            new_pressure_category: "low".into(),
            previous_pressure_level: 3,
            optimization_time_ms: 1.0,
            message: "m".into(),
            started_at: "t".into(),
        }
    }

    #[test]
    fn both_reply_shapes_read_back_as_what_they_are() {
        let one = serde_json::to_value(OptimizeReply::Device(outcome())).expect("json");
        assert_eq!((one["memoryFreed"].clone(), one["memoryMeasured"].clone()), (json!(0), json!(-4096)));
        assert_eq!(serde_json::from_value::<OptimizeReply>(one).expect("reads"), OptimizeReply::Device(outcome()));
        let runs = OptimizeReply::Devices(OptimizeRunsDto {
            optimization_triggered: true,
            memory_freed: 0,
            models_unloaded: vec![],
            models_offloaded: vec![],
            message: "optimized cpu".into(),
            runs: vec![outcome()],
        });
        let v = serde_json::to_value(&runs).expect("json");
        assert_eq!(serde_json::from_value::<OptimizeReply>(v).expect("reads"), runs);
        // A body without deviceId is valid (every pressured device).
        let body: OptimizeBody = serde_json::from_value(json!({})).expect("no deviceId");
        assert_eq!(body.device_id, None);
    }
}
