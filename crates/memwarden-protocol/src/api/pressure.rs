//! Memory pressure: `GET /api/memory/pressure[/{deviceId}|/history]` and the `pressure` events.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThresholdsDto {
    /// Utilization (0–1) at which each level starts.
    pub moderate: f64,
    pub high: f64,
    pub critical: f64,
    /// A level is left only once utilization is this far below its threshold.
    pub hysteresis: f64,
    /// PSI avg10 percentages that raise the level by one.
    pub psi_some_percent: f64,
    pub psi_full_percent: f64,
}

impl From<&memwarden_core::pressure::PressureThresholds> for ThresholdsDto {
    fn from(t: &memwarden_core::pressure::PressureThresholds) -> Self {
        ThresholdsDto {
            moderate: t.moderate,
            high: t.high,
            critical: t.critical,
            hysteresis: t.hysteresis,
            psi_some_percent: t.psi_some_percent,
            psi_full_percent: t.psi_full_percent,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PressureDto {
    pub device_id: String,
    /// 0–100: utilization in percent, plus the PSI stall percentage while it escalates.
    pub pressure_level: u8,
    /// `low` | `moderate` | `high` | `critical`.
    pub pressure_category: String,
    pub available_memory: u64,
    pub total_memory: u64,
    pub utilization_percentage: f64,
    pub thresholds: ThresholdsDto,
    /// memwarden calls that would relieve the pressure, each with its evidence.
    pub recommended_actions: Vec<String>,
    /// Seconds until the critical threshold at the recent growth rate; null when not rising.
    pub time_to_critical: Option<f64>,
    /// Host only: PSI `some`/`full` avg10 (percent) and the `some` stall counter (µs).
    pub psi_some10: Option<f64>,
    pub psi_full10: Option<f64>,
    pub psi_some_total: Option<u64>,
    /// Allocations on this device that did not fit since start.
    pub allocation_failures: u64,
    /// Host in a memory cgroup with a limit: times the limit was hit plus OOM kills (v2
    /// `memory.events` max + oom_kill, v1 `memory.failcnt` + oom_kill). A rise raises the level
    /// by one for 10 s.
    pub cgroup_limit_events: Option<u64>,
    /// Host only: `active` (a PSI trigger wakes the sampler on stall) or
    /// `unavailable: <reason>`.
    pub psi_trigger: Option<String>,
    /// Host only: times the PSI trigger fired.
    pub psi_trigger_fired: Option<u64>,
    pub sampled_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PressureAllDto {
    /// The highest of the devices'.
    pub pressure_level: u8,
    pub pressure_category: String,
    pub devices: Vec<PressureDto>,
}

/// One level change (an `/api/memory/events` event of type `pressure`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PressureEventDto {
    /// `pressure`.
    #[serde(rename = "type")]
    pub kind: String,
    pub device_id: String,
    pub old_level: String,
    pub new_level: String,
    /// The measurement that caused it.
    pub utilization_percentage: f64,
    pub available_memory: u64,
    pub total_memory: u64,
    pub psi_some10: Option<f64>,
    pub psi_full10: Option<f64>,
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PressureHistoryDto {
    pub events: Vec<PressureEventDto>,
}
