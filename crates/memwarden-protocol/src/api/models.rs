//! Model memory: `/api/memory/models` (list, load, unload, move) and the workers' states.

use super::rfc3339;
use crate::ModelInfo;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadedModelDto {
    pub model_id: String,
    pub model_name: String,
    pub worker_id: String,
    pub pid: u32,
    pub device_id: String,
    pub size_bytes: u64,
    pub bytes_by_device: BTreeMap<String, u64>,
    pub loaded_at: String,
    pub last_access: String,
    pub load_time_ms: f64,
    pub priority: u8,
    pub pinned: bool,
    pub path: Option<String>,
    pub backend: Option<String>,
    /// The model's own allocator pool (torch on a GPU), when it has one.
    pub reserved_bytes: Option<u64>,
}

impl LoadedModelDto {
    pub fn new(m: &ModelInfo, worker_id: &str, pid: u32) -> Self {
        LoadedModelDto {
            model_id: m.model_id.clone(),
            model_name: m.model_name.clone(),
            worker_id: worker_id.to_string(),
            pid,
            device_id: m.device_id.clone(),
            size_bytes: m.size_bytes,
            bytes_by_device: m.bytes_by_device.clone(),
            loaded_at: rfc3339(m.loaded_at),
            last_access: rfc3339(m.last_access),
            load_time_ms: m.load_time_ms,
            priority: m.priority,
            pinned: m.pinned,
            path: m.path.clone(),
            backend: m.backend.clone(),
            reserved_bytes: m.reserved_bytes,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SystemMemoryDto {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelMemoryDto {
    pub loaded_models: Vec<LoadedModelDto>,
    pub loaded_model_count: usize,
    /// The model memory on this device, each byte counted once: the models the workers and
    /// clients hold themselves (their reported bytes) plus the weights memwarden holds resident
    /// here (`heldModelMemory`), however many processes map them.
    pub total_model_memory: u64,
    /// The part of `totalModelMemory` memwarden holds: held weights resident on this device,
    /// and on `cpu` also the parked copies (pinned host memory).
    #[serde(default)]
    pub held_model_memory: u64,
    /// The device's available bytes less outstanding reservations: what a new model can use.
    pub available_for_models: u64,
    /// What the OS (own RSS: resident less shared memory, for `cpu`) or NVML (per process, for
    /// GPUs: what the process allocated, not what it maps) says the model processes hold on
    /// this device as their own; null where it cannot be measured.
    pub process_bytes: Option<u64>,
    /// `processBytes` less the bytes of the models the processes hold themselves (not the
    /// weights memwarden holds): interpreter and CUDA-context overhead, caches, leaks. Never
    /// negative.
    pub unattributed_bytes: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceModelsDto {
    pub device_id: String,
    pub system_memory: SystemMemoryDto,
    pub model_memory: ModelMemoryDto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum WorkerState {
    /// Spawned; its `hello` has not come yet.
    Starting,
    Ready,
    /// Connected, but its last call or health ping failed.
    Unhealthy,
    /// Exited; waiting out the backoff before the next start.
    Restarting,
    Stopped,
}

impl WorkerState {
    /// The name as the JSON spells it (`starting`, `ready`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Unhealthy => "unhealthy",
            WorkerState::Restarting => "restarting",
            WorkerState::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerDto {
    pub worker_id: String,
    /// `worker` (supervised) or `client` (attached through the socket).
    pub role: String,
    pub state: WorkerState,
    pub since: String,
    pub pid: Option<u32>,
    pub last_error: Option<String>,
    pub restarts: u32,
    pub devices: Vec<String>,
    pub frameworks: BTreeMap<String, Option<String>>,
    pub model_count: usize,
    /// Reported bytes per device of the models it holds itself (not the weights memwarden
    /// holds and it only maps: those are in `mappedBytes`).
    pub model_bytes: BTreeMap<String, u64>,
    /// Per device, the bytes of the weights memwarden holds that this process maps: counted
    /// where they live (the device's `heldModelMemory`), not as this process's.
    #[serde(default)]
    pub mapped_bytes: BTreeMap<String, u64>,
    /// Measured, its own: RSS less shared memory (`cpu`) and NVML per-process bytes (GPUs,
    /// which charge an allocation to its creator, not to the processes that map it).
    pub process_bytes: BTreeMap<String, u64>,
    /// Per device, `processBytes` less `modelBytes`, never negative.
    pub unattributed_bytes: BTreeMap<String, i64>,
    /// Releases it claimed that the measurement did not confirm (see the optimizer).
    pub unverified_releases: u32,
    /// The worker's own allocator figures (torch `memory_allocated` / `memory_reserved`).
    pub allocator: BTreeMap<String, AllocatorDto>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocatorDto {
    pub allocated_bytes: u64,
    pub reserved_bytes: u64,
}

/// Whether the model listing comes from the workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum CoordinationMode {
    /// At least one worker or client was asked for its models.
    #[default]
    Coordinated,
    /// No worker or client could be asked (none configured, attached or ready): system memory
    /// only, no worker's models; `reason` says why.
    Fallback,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CoordinationDto {
    #[serde(default)]
    pub mode: CoordinationMode,
    /// Why the listing is `fallback` (each worker's state and last error, or why none runs);
    /// null when `coordinated`.
    #[serde(default)]
    pub reason: Option<String>,
    /// Every connected worker answered this request's `getModelInfo`.
    pub synchronized: bool,
    pub last_sync: Option<String>,
    pub socket: Option<String>,
    pub workers: Vec<WorkerDto>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelsDto {
    pub devices: Vec<DeviceModelsDto>,
    pub coordination_status: CoordinationDto,
    /// Models whose weights memwarden holds (docs/API.md), whoever maps them.
    #[serde(default)]
    pub weights: Vec<super::HeldModelDto>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBody {
    /// Absolute path of a `.safetensors` file on this host.
    pub path: String,
    pub name: Option<String>,
    /// `cpu` (default) or `cuda:N` (aliases accepted).
    pub device_id: Option<String>,
    /// 0 (first to go under pressure) … 100 (last); default 50.
    pub priority: Option<u8>,
    /// Never offloaded or unloaded by memwarden.
    #[serde(default)]
    pub pinned: bool,
    /// `memwarden` (default): the daemon holds the weights in its own memory and processes map
    /// them. `worker`: a supervised worker loads them into its own framework (the path for
    /// models a worker must hold itself).
    pub held_by: Option<String>,
    /// Idle time after which memwarden-held weights are parked (default `weights.keep_alive_ms`).
    pub keep_alive_ms: Option<u64>,
    /// Run in the background: answer 202 with the operation (`OperationDto`) at once and follow
    /// it at `GET /api/memory/operations/{operationId}`.
    #[serde(default, rename = "async")]
    pub run_async: bool,
}

/// The reply to a load: a model memwarden holds (the default), or one a worker loaded into its
/// own framework (`heldBy: worker`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum LoadedDto {
    /// A diffusers pipeline folder: its components, each held on its own.
    Pipeline(super::HeldPipelineDto),
    Held(Box<super::HeldModelDto>),
    Worker(LoadedModelDto),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnloadedDto {
    pub model_id: String,
    pub worker_id: String,
    pub device_id: String,
    /// What the worker says it released.
    pub freed_bytes: u64,
    /// The worker process's measured bytes on the device before and after (RSS or NVML).
    pub process_bytes_before: Option<u64>,
    pub process_bytes_after: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MoveBody {
    /// `cpu` or `cuda:N` (aliases accepted).
    pub target_device_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MovedDto {
    /// The model where it is now (a new model id, on the target device).
    pub model: LoadedModelDto,
    /// The model that was unloaded from the source device.
    pub previous_model_id: String,
    pub previous_device_id: String,
    pub freed_bytes: u64,
}
