//! Version 1's typed data of actions, replies and events.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// One model as its holder reports it. Bytes are the sum of its tensors' bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelInfo {
    pub model_id: String,
    pub model_name: String,
    /// Where the model's tensors live now (`cpu` after an offload).
    pub device_id: String,
    pub size_bytes: u64,
    /// Bytes per device, when tensors are split; sums to `size_bytes`.
    #[serde(default)]
    pub bytes_by_device: BTreeMap<String, u64>,
    #[serde(with = "time::serde::rfc3339")]
    pub loaded_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_access: OffsetDateTime,
    #[serde(default)]
    pub load_time_ms: f64,
    /// 0 (first to go) … 100 (last to go).
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// Never offloaded or unloaded by memwarden.
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub tensor_count: u64,
    /// How the tensors are held: `bytes` (pure Python), `numpy`, `torch`, or the client's own.
    #[serde(default)]
    pub backend: Option<String>,
    /// Bytes of the model's own allocator pool (torch on a GPU: its `MemPool`'s segments, the
    /// tensors plus the caching allocator's rounding): what unloading gives back to the driver.
    #[serde(default)]
    pub reserved_bytes: Option<u64>,
}

pub const DEFAULT_PRIORITY: u8 = 50;

fn default_priority() -> u8 {
    DEFAULT_PRIORITY
}

/// `getModelInfo` data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetModelInfo {
    #[serde(default)]
    pub device_id: Option<String>,
}

/// Allocator-level figures of one device inside the worker (torch: memory_allocated/reserved).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMemory {
    pub allocated_bytes: u64,
    #[serde(default)]
    pub reserved_bytes: u64,
}

/// `getModelInfo` reply, and `memoryReport` event data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryReport {
    #[serde(default)]
    pub models: Vec<ModelInfo>,
    /// Device id → the framework's own allocator figures.
    #[serde(default)]
    pub memory: BTreeMap<String, DeviceMemory>,
    /// The process's resident set as it sees it (informational; the daemon reads /proc itself).
    #[serde(default)]
    pub rss_bytes: Option<u64>,
}

/// `loadModel` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadModel {
    /// A `.safetensors` file on this host.
    pub path: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_device")]
    pub device_id: String,
    #[serde(default = "default_priority")]
    pub priority: u8,
    #[serde(default)]
    pub pinned: bool,
    /// Chosen by the daemon so ids are unique across workers; a worker makes one when absent.
    #[serde(default)]
    pub model_id: Option<String>,
    /// Version 2, on a socket: the daemon holds the weights; the worker maps this grant (its
    /// descriptor rides with the line) instead of reading the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<crate::WeightsGrant>,
}

fn default_device() -> String {
    "cpu".to_string()
}

/// `unloadModel` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnloadModel {
    pub model_id: String,
}

/// `offloadModel` data: move a model's tensors to `target` (only `cpu` for now).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OffloadModel {
    pub model_id: String,
    #[serde(default = "default_device")]
    pub target: String,
}

/// `trimCache` data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrimCache {
    #[serde(default)]
    pub device_id: Option<String>,
}

/// `optimizeMemory` data: free at least `bytes` on `deviceId` before `deadlineMs` passes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OptimizeMemory {
    pub device_id: String,
    pub bytes: u64,
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Never touch these model ids.
    #[serde(default)]
    pub exclude_models: Vec<String>,
}

/// The reply to `unloadModel`, `offloadModel`, `trimCache`, `optimizeMemory`: what the peer
/// believes it released (the daemon re-measures; this is a claim).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Released {
    pub freed_bytes: u64,
    /// Device id → bytes released there.
    #[serde(default)]
    pub freed_by_device: BTreeMap<String, u64>,
    /// Steps taken, e.g. `["trimCache", "unload:m-3"]`.
    #[serde(default)]
    pub actions: Vec<String>,
    #[serde(default)]
    pub model: Option<ModelInfo>,
}

/// `error` event data (daemon → peer): why a notification of the peer's was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorNotice {
    pub code: String,
    pub message: String,
    /// The model the refused notification was about, when it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
}

/// `modelUnloaded` event data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelUnloaded {
    pub model_id: String,
    #[serde(default)]
    pub freed_bytes: u64,
}
