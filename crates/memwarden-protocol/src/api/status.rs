//! Device status and daemon health: `GET /api/memory/status[/{deviceId}]`, `GET /health`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatusDto {
    pub memory_type: String,
    /// Bytes held from the OS or driver.
    pub reserved_bytes: u64,
    /// Bytes handed out.
    pub allocated_bytes: u64,
    pub free_in_pool_bytes: u64,
    pub largest_free_block: u64,
    pub block_count: usize,
    pub allocation_count: usize,
    /// Separate free ranges over all blocks.
    pub free_range_count: usize,
    /// `1 − largestFreeBlock / freeInPoolBytes`; 0 when nothing is free.
    pub fragmentation: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatusDto {
    pub device_id: String,
    /// `CPU` | `GPU`.
    pub device_type: String,
    pub name: String,
    /// `RAM` | `VRAM`.
    pub memory_type: String,
    pub total_memory: u64,
    pub available_memory: u64,
    pub used_memory: u64,
    /// used / total, 0–1.
    pub memory_utilization: f64,
    /// Where the numbers came from: `meminfo`, `cgroup-v1:/path`, `cgroup-v2:/path`.
    pub source: String,
    /// When the OS or driver was read (RFC 3339).
    pub last_updated: String,
    /// Bytes memwarden's pools hold from the OS or driver.
    pub reserved_bytes: u64,
    /// Bytes memwarden's pools have handed out.
    pub allocated_bytes: u64,
    /// Bytes promised to `reservation` allocations (budget, no memory).
    pub reservation_bytes: u64,
    pub pools: Vec<PoolStatusDto>,
    /// Fragmentation index of all the device's pools together (0–1).
    pub fragmentation: f64,
    /// The answer to `?canAllocate=N` (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_allocate: Option<CanAllocateDto>,
    /// GPUs: `GPU-…` as nvidia-smi prints it.
    pub uuid: Option<String>,
    pub pci_bus_id: Option<String>,
    /// GPUs: e.g. `9.0`.
    pub compute_capability: Option<String>,
    /// GPUs: peak bytes/s (NVML bus width × memory clock × 2).
    pub memory_bandwidth: Option<u64>,
    /// GPUs: memory the driver reserves for itself (NVML).
    pub reserved_memory: Option<u64>,
    /// GPUs: memory per process, from NVML (other programs included).
    pub processes: Vec<ProcessDto>,
    /// False after a driver error (see `lastError`); other devices keep working.
    pub healthy: bool,
    pub last_error: Option<String>,
    /// The backend's own fields, beside the common ones (e.g. CUDA's `peerAccess`: the GPUs
    /// this one reads and writes directly). The extension point a new backend fills; read as
    /// any JSON, so a client takes fields of a newer daemon's backends as they come.
    #[serde(flatten)]
    pub extra: std::collections::BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessDto {
    pub pid: u32,
    pub name: String,
    /// Null when the driver does not report it.
    pub used_memory: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusListDto {
    pub devices: Vec<DeviceStatusDto>,
    /// Every backend, available or not (with the reason), as in `/health`.
    pub backends: Vec<BackendDto>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendDto {
    pub name: String,
    pub available: bool,
    pub devices: Vec<String>,
    /// Why the backend is unavailable ("backend unavailable: <reason>").
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthDto {
    /// `healthy`.
    pub status: String,
    pub version: String,
    pub started_at: String,
    pub uptime_seconds: u64,
    /// The daemon's process id (0 from a daemon older than this field): `memwarden status`
    /// finds the daemon's own row among a GPU's processes by it.
    #[serde(default)]
    pub pid: u32,
    pub devices: Vec<String>,
    pub backends: Vec<BackendDto>,
    /// The model workers and attached clients: model routes need one that is `ready`.
    pub workers: HealthWorkersDto,
}

/// `/health`'s word on the model workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthWorkersDto {
    /// `workers.enabled` in the config.
    pub enabled: bool,
    /// Workers and clients that can take calls now.
    pub ready: usize,
    /// Why none is ready (python missing, a worker failing to start, …); null when one is.
    pub reason: Option<String>,
    pub workers: Vec<HealthWorkerDto>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthWorkerDto {
    pub worker_id: String,
    /// `worker` (supervised) or `client` (attached).
    pub role: String,
    /// `starting`, `ready`, `unhealthy`, `restarting`, `failed`, …
    pub state: String,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub last_error: Option<String>,
}

/// Where N bytes would come from now (`?canAllocate=N`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanAllocateDto {
    pub size_bytes: u64,
    pub memory_type: String,
    /// `pool` (free space memwarden holds), `newMemory` (a new block from the OS/driver),
    /// `budget` (a reservation fits), or `no`.
    pub fits: String,
    /// Why not, with requested and available bytes.
    pub reason: Option<String>,
}
