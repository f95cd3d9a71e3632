//! Usage and analytics over a window, peak reset, the allocation event log, and the
//! recommendations.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageDto {
    pub device_id: String,
    /// Used bytes now (OS or driver).
    pub current_usage_bytes: u64,
    /// Highest used bytes sampled in the window.
    pub peak_usage_bytes: u64,
    pub peak_usage_at: Option<String>,
    /// Live memwarden allocations on the device now.
    pub allocation_count: u64,
    /// Bytes those allocations hold now, and their highest since the peaks were last reset.
    pub allocated_bytes: u64,
    pub peak_allocated_bytes: u64,
    pub allocations_in_window: u64,
    pub frees_in_window: u64,
    pub allocations_per_second: f64,
    pub frees_per_second: f64,
    /// Bytes allocated in the window over allocations in the window (0 without any).
    pub average_allocation_size_bytes: u64,
    pub window_start: String,
    pub window_end: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageListDto {
    pub window: String,
    pub devices: Vec<UsageDto>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeakDto {
    pub value_bytes: u64,
    pub at: Option<String>,
    /// When tracking (re)started: daemon start, or the last reset.
    pub since: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PercentilesDto {
    pub min_bytes: u64,
    pub p50_bytes: u64,
    pub p90_bytes: u64,
    pub p95_bytes: u64,
    pub p99_bytes: u64,
    pub max_bytes: u64,
    pub mean_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActivityDto {
    pub allocations: u64,
    pub allocated_bytes: u64,
    pub frees: u64,
    pub freed_bytes: u64,
    /// Of `frees`, those reclaimed because their owner process (`ownerPid`) exited.
    #[serde(default)]
    pub reclaims: u64,
    #[serde(default)]
    pub reclaimed_bytes: u64,
    pub failed_allocations: u64,
    pub moves: u64,
    pub exports: u64,
    pub allocations_per_second: f64,
    pub frees_per_second: f64,
    pub average_allocation_size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BucketDto {
    pub min_bytes: u64,
    pub max_bytes: u64,
    pub count: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FragmentationTrendDto {
    pub first: f64,
    pub last: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// `rising`, `falling` or `flat`: the second half's mean against the first half's (±0.05).
    pub trend: String,
    /// At most 60 points, evenly picked from the window's points.
    pub series: Vec<TrendPointDto>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrendPointDto {
    pub at: String,
    pub fragmentation: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransfersDto {
    pub count: u64,
    pub out_bytes: u64,
    pub in_bytes: u64,
    pub out_bytes_per_second: f64,
    pub in_bytes_per_second: f64,
    /// Highest rate between two consecutive points (bytes out + in per second).
    pub peak_bytes_per_second: f64,
}

/// A window's defragmentation figures (`analytics`'s `defragmentation`); `pools::DefragDto` is
/// one run's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefragWindowDto {
    pub runs: u64,
    pub moved_bytes: u64,
    pub released_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PressureTimeDto {
    pub low_seconds: f64,
    pub moderate_seconds: f64,
    pub high_seconds: f64,
    pub critical_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceAnalyticsDto {
    pub device_id: String,
    /// History points in the window, and their resolution.
    pub samples: usize,
    pub resolution_ms: u64,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub pool_reserved_bytes: u64,
    pub pool_allocated_bytes: u64,
    pub reservation_bytes: u64,
    pub model_bytes: u64,
    pub fragmentation: f64,
    pub pressure_level: String,
    /// Highest used bytes since start or the last reset (`POST …/analytics/reset-peaks`).
    pub peak_used: PeakDto,
    /// Highest bytes of live memwarden allocations since start or the last reset.
    pub peak_allocated: PeakDto,
    pub window_peak_used_bytes: u64,
    /// Used bytes over the window's points (null without points).
    pub usage_percentiles: Option<PercentilesDto>,
    pub activity: ActivityDto,
    /// Sizes of the allocations made in the window (from the event log; see `eventLog`).
    pub size_histogram: Vec<BucketDto>,
    pub fragmentation_trend: Option<FragmentationTrendDto>,
    pub transfers: TransfersDto,
    pub defragmentation: DefragWindowDto,
    pub pressure_time: PressureTimeDto,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HolderDto {
    /// Owner or purpose; `(none)` when the allocations named none.
    pub name: String,
    pub live_bytes: u64,
    pub live_count: u64,
    pub allocated_bytes_in_window: u64,
    pub allocations_in_window: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelUsageDto {
    pub model_id: String,
    pub model_name: String,
    pub device_id: String,
    pub worker_id: String,
    pub loaded: bool,
    pub current_bytes: u64,
    pub peak_bytes_in_window: u64,
    /// Highest bytes since it appeared or the last reset.
    pub peak_bytes: u64,
    pub first_seen: String,
    pub last_seen: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeakSuspectDto {
    pub allocation_id: String,
    pub device_id: String,
    pub size_bytes: u64,
    pub owner: Option<String>,
    pub purpose: Option<String>,
    pub age_seconds: f64,
    /// `ownerGone` (its `pid:N` owner has exited), `ownerIdle`, or `noOwner`.
    pub reason: String,
    pub owner_idle_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventLogInfoDto {
    pub capacity: usize,
    pub oldest: Option<String>,
    /// The log reaches back to the window's start (histograms and per-window owner figures are
    /// complete); false when older events were dropped.
    pub covers_window: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalyticsDto {
    pub window: String,
    pub window_start: String,
    pub window_end: String,
    /// False with `analytics.enabled = false`: only current figures are real then.
    pub recording: bool,
    pub devices: Vec<DeviceAnalyticsDto>,
    pub top_owners: Vec<HolderDto>,
    pub top_purposes: Vec<HolderDto>,
    pub top_models: Vec<ModelUsageDto>,
    pub leak_suspects: Vec<LeakSuspectDto>,
    pub event_log: EventLogInfoDto,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResetDto {
    /// When the new peaks start.
    pub since: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventDto {
    pub at: String,
    /// `allocated`, `freed`, `moved` or `exported`.
    pub event: String,
    pub allocation_id: String,
    pub device_id: String,
    pub memory_type: String,
    pub size_bytes: u64,
    pub owner: Option<String>,
    pub purpose: Option<String>,
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventListDto {
    pub capacity: usize,
    pub events: Vec<EventDto>,
}

/// The request that applies a recommendation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionDto {
    pub method: String,
    pub path: String,
    pub body: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecommendationDto {
    /// `defragment`, `unloadIdleModels`, `clearCache`, `releasePinnedMemory`, `rebalanceModels`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `high`, `medium` or `low`.
    pub priority: String,
    pub device_id: String,
    pub message: String,
    /// The measured numbers that triggered it.
    #[schema(value_type = Object)]
    pub evidence: BTreeMap<String, serde_json::Value>,
    pub estimated_savings_bytes: u64,
    pub action: ActionDto,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecommendationsDto {
    pub generated_at: String,
    pub total_estimated_savings_bytes: u64,
    pub recommendations: Vec<RecommendationDto>,
}
