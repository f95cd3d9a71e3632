//! The JSON shapes of the REST API (camelCase, integer bytes, string enums, RFC 3339 times) and
//! their conversion from service types. Field names follow the seed's clients.

use super::envelope::rfc3339;
use crate::pressure::{PressureEvent, PressureReport};
use crate::service::{
    Allocation, AllocationRecord, BackendHealth, CanAllocate, ClearOutcome, DefragReport, DeviceStatus, ExportInfo,
    PoolDump, TransferRecord,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `POST /api/memory/allocations/allocate[/{deviceId}]`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocateBody {
    /// Bytes to allocate (> 0). `size` is accepted as the seed's name.
    #[serde(alias = "size")]
    pub size_bytes: Option<i64>,
    /// `host` | `pinned` | `device` | `reservation`; default `host` on `cpu`, `device` on GPUs.
    pub memory_type: Option<String>,
    /// Power of two, bytes; default 256.
    pub alignment: Option<i64>,
    pub purpose: Option<String>,
    pub owner: Option<String>,
    /// Default false.
    pub persistent: Option<bool>,
    /// Default true: defragmentation may move it (its `generation` then grows).
    pub movable: Option<bool>,
    /// Required on the route without a device id.
    pub device_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AllocationDto {
    pub allocation_id: String,
    pub device_id: String,
    pub memory_type: String,
    /// Bytes requested.
    pub size_bytes: u64,
    /// Bytes the allocation occupies in its pool (the request rounded up to 256 bytes).
    pub allocated_size: u64,
    pub alignment: u64,
    /// Hex address in the owning address space (the daemon's for host memory); null for reservations.
    pub address: Option<String>,
    /// Offset inside its pool block; null for reservations.
    pub offset: Option<u64>,
    pub purpose: Option<String>,
    pub owner: Option<String>,
    pub persistent: bool,
    pub movable: bool,
    /// Shared with another process: never moved.
    pub exported: bool,
    pub generation: u64,
    pub allocated_at: String,
}

impl From<&AllocationRecord> for AllocationDto {
    fn from(r: &AllocationRecord) -> Self {
        AllocationDto {
            allocation_id: r.id.clone(),
            device_id: r.device.to_string(),
            memory_type: r.kind.to_string(),
            size_bytes: r.size_bytes,
            allocated_size: r.allocated_bytes,
            alignment: r.alignment_bytes,
            address: r.address.map(|a| format!("{a:#x}")),
            offset: r.placement.map(|p| p.offset_bytes),
            purpose: r.purpose.clone(),
            owner: r.owner.clone(),
            persistent: r.persistent,
            movable: r.movable,
            exported: r.exported,
            generation: r.generation,
            allocated_at: rfc3339(r.allocated_at),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AllocationListDto {
    pub allocations: Vec<AllocationDto>,
    pub count: usize,
    /// Sum of `sizeBytes`.
    pub total_bytes: u64,
}

impl AllocationListDto {
    pub fn new(records: &[Allocation]) -> Self {
        AllocationListDto {
            allocations: records.iter().map(|r| AllocationDto::from(&**r)).collect(),
            count: records.len(),
            total_bytes: records.iter().map(|r| r.size_bytes).sum(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FreedDto {
    pub allocation_id: String,
    pub device_id: String,
    pub memory_type: String,
    /// Bytes returned to the pool (or to the budget, for a reservation).
    pub freed_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
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

impl PoolStatusDto {
    pub fn new(kind: memwarden_core::MemoryKind, p: &memwarden_core::PoolStats) -> Self {
        PoolStatusDto {
            memory_type: kind.to_string(),
            reserved_bytes: p.reserved_bytes,
            allocated_bytes: p.allocated_bytes,
            free_in_pool_bytes: p.free_in_pool_bytes,
            largest_free_block: p.largest_free_block_bytes,
            block_count: p.block_count,
            allocation_count: p.allocation_count,
            free_range_count: p.free_range_count,
            fragmentation: p.fragmentation_index(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
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
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProcessDto {
    pub pid: u32,
    pub name: String,
    /// Null when the driver does not report it.
    pub used_memory: Option<u64>,
}

impl From<&DeviceStatus> for DeviceStatusDto {
    fn from(s: &DeviceStatus) -> Self {
        let (reserved_bytes, allocated_bytes) = s.pool_totals();
        DeviceStatusDto {
            device_id: s.device.to_string(),
            device_type: s.device_type.into(),
            name: s.name.clone(),
            memory_type: s.memory_type.into(),
            total_memory: s.total_bytes,
            available_memory: s.available_bytes,
            used_memory: s.used_bytes,
            memory_utilization: s.utilization(),
            source: s.source.clone(),
            last_updated: rfc3339(s.last_updated),
            reserved_bytes,
            allocated_bytes,
            reservation_bytes: s.reservation_bytes,
            pools: s.pools.iter().map(|(k, p)| PoolStatusDto::new(*k, p)).collect(),
            fragmentation: s.fragmentation(),
            can_allocate: None,
            uuid: s.gpu.as_ref().map(|g| g.uuid.clone()),
            pci_bus_id: s.gpu.as_ref().map(|g| g.pci_bus_id.clone()),
            compute_capability: s.gpu.as_ref().map(|g| g.compute_capability.clone()),
            memory_bandwidth: s.gpu.as_ref().and_then(|g| g.memory_bandwidth_bytes_per_s),
            reserved_memory: s.driver_reserved_bytes,
            processes: s
                .processes
                .iter()
                .map(|p| ProcessDto { pid: p.pid, name: p.name.clone(), used_memory: p.used_bytes })
                .collect(),
            healthy: s.fault.is_none(),
            last_error: s.fault.clone(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusListDto {
    pub devices: Vec<DeviceStatusDto>,
    /// Every backend, available or not (with the reason), as in `/health`.
    pub backends: Vec<BackendDto>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClearedDeviceDto {
    pub device_id: String,
    pub cleared_bytes: u64,
    /// Bytes the device's pools still hold after the clear.
    pub reserved_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClearDto {
    /// Bytes returned to the OS or driver.
    pub cleared_bytes: u64,
    pub devices: Vec<ClearedDeviceDto>,
}

impl ClearDto {
    pub fn new(outcomes: &[ClearOutcome]) -> Self {
        ClearDto {
            cleared_bytes: outcomes.iter().map(|o| o.cleared_bytes).sum(),
            devices: outcomes
                .iter()
                .map(|o| ClearedDeviceDto {
                    device_id: o.device.to_string(),
                    cleared_bytes: o.cleared_bytes,
                    reserved_bytes: o.reserved_bytes_after,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackendDto {
    pub name: String,
    pub available: bool,
    pub devices: Vec<String>,
    /// Why the backend is unavailable ("backend unavailable: <reason>").
    pub reason: Option<String>,
}

impl From<&BackendHealth> for BackendDto {
    fn from(b: &BackendHealth) -> Self {
        BackendDto {
            name: b.name.into(),
            available: b.available,
            devices: b.devices.clone(),
            reason: b.reason.as_ref().map(|r| format!("backend unavailable: {r}")),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HealthDto {
    /// `healthy`.
    pub status: String,
    pub version: String,
    pub started_at: String,
    pub uptime_seconds: u64,
    pub devices: Vec<String>,
    pub backends: Vec<BackendDto>,
}

/// Body of `POST /api/memory/transfer` and `POST /api/memory/copy`.
#[derive(Debug, Default, Deserialize, ToSchema)]
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

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
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

impl From<&TransferRecord> for TransferDto {
    fn from(t: &TransferRecord) -> Self {
        TransferDto {
            transfer_id: t.id.clone(),
            status: t.status.as_str().into(),
            transfer_type: if t.move_source { "move" } else { "copy" }.into(),
            source_allocation_id: t.source_id.clone(),
            source_device_id: t.source_device.to_string(),
            source_offset: t.source_offset,
            destination_allocation_id: t.destination_id.clone(),
            destination_device_id: t.destination_device.to_string(),
            destination_offset: t.destination_offset,
            size_bytes: t.size_bytes,
            bytes_done: t.bytes_done,
            progress: if t.size_bytes == 0 { 1.0 } else { t.bytes_done as f64 / t.size_bytes as f64 },
            bytes_per_second: t.bytes_per_second(),
            duration_ms: t.duration_secs * 1e3,
            started_at: rfc3339(t.started_at),
            completed_at: t.finished_at.map(rfc3339),
            error: t.error.clone(),
        }
    }
}

/// What another process needs to map an allocation.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExportDto {
    pub allocation_id: String,
    /// `cudaIpc` (device memory: open `ipcHandle` with cudaIpcOpenMemHandle, add `offset`) or
    /// `shm` (host memory: map the file at `path`, add `offset`).
    pub kind: String,
    pub device_id: String,
    /// 64 bytes, hex (cudaIpc).
    pub ipc_handle: Option<String>,
    /// File under /dev/shm, mode 0600 (shm).
    pub path: Option<String>,
    /// Offset of the allocation inside what the handle or file maps.
    pub offset: u64,
    pub size_bytes: u64,
}

impl ExportDto {
    pub fn new(allocation_id: &str, e: &ExportInfo) -> Self {
        match e {
            ExportInfo::CudaIpc { device, handle, offset, size_bytes } => ExportDto {
                allocation_id: allocation_id.into(),
                kind: "cudaIpc".into(),
                device_id: device.to_string(),
                ipc_handle: Some(handle.iter().map(|b| format!("{b:02x}")).collect()),
                path: None,
                offset: *offset,
                size_bytes: *size_bytes,
            },
            ExportInfo::Shm { path, offset, size_bytes } => ExportDto {
                allocation_id: allocation_id.into(),
                kind: "shm".into(),
                device_id: "cpu".into(),
                ipc_handle: None,
                path: Some(path.clone()),
                offset: *offset,
                size_bytes: *size_bytes,
            },
        }
    }
}

/// `GET /api/memory/allocations/{id}/data`: bytes of an allocation.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataDto {
    pub allocation_id: String,
    pub offset: u64,
    pub length: u64,
    /// The bytes, base64 (standard alphabet, padded).
    pub data_base64: String,
}

/// `PUT /api/memory/allocations/{id}/data`: what was written.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WrittenDto {
    pub allocation_id: String,
    pub offset: u64,
    pub bytes_written: u64,
}

/// Where N bytes would come from now (`?canAllocate=N`).
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
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

impl From<&CanAllocate> for CanAllocateDto {
    fn from(c: &CanAllocate) -> Self {
        CanAllocateDto {
            size_bytes: c.size_bytes,
            memory_type: c.kind.to_string(),
            fits: c.fit.as_str().into(),
            reason: c.reason.clone(),
        }
    }
}

/// Body of `POST /api/memory/operations/defragment[/{deviceId}]` (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefragBody {
    /// `quick` | `balanced` (default) | `thorough`.
    pub strategy: Option<String>,
    pub max_bytes_to_move: Option<u64>,
    pub max_allocations_to_move: Option<u64>,
    /// Time limit, checked between moves.
    pub max_time_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
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

impl From<&DefragReport> for DefragDto {
    fn from(r: &DefragReport) -> Self {
        DefragDto {
            device_id: r.device.to_string(),
            strategy: r.strategy.as_str().into(),
            fragmentation_before: r.fragmentation_before,
            fragmentation_after: r.fragmentation_after,
            bytes_moved: r.bytes_moved,
            allocations_moved: r.allocations_moved,
            blocks_released: r.blocks_released,
            bytes_released: r.bytes_released,
            largest_free_block_before: r.largest_free_block_before,
            largest_free_block_after: r.largest_free_block_after,
            duration_ms: r.duration.as_secs_f64() * 1e3,
            moving_ms: r.moving.as_secs_f64() * 1e3,
            passes: r.passes,
            moves_skipped: r.moves_skipped,
            error: r.error.clone(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DefragAllDto {
    pub bytes_moved: u64,
    pub bytes_released: u64,
    pub devices: Vec<DefragDto>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RangeDto {
    pub offset: u64,
    pub size_bytes: u64,
    pub free: bool,
    pub allocation_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BlockDto {
    pub block_id: u32,
    pub size_bytes: u64,
    /// Holds one large allocation; released when it is freed.
    pub dedicated: bool,
    pub address: String,
    pub ranges: Vec<RangeDto>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolDumpDto {
    #[serde(flatten)]
    pub stats: PoolStatusDto,
    pub blocks: Vec<BlockDto>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DevicePoolsDto {
    pub device_id: String,
    pub pools: Vec<PoolDumpDto>,
}

impl DevicePoolsDto {
    pub fn new(device: memwarden_core::DeviceId, pools: &[PoolDump]) -> Self {
        DevicePoolsDto {
            device_id: device.to_string(),
            pools: pools
                .iter()
                .map(|p| PoolDumpDto {
                    stats: PoolStatusDto::new(p.kind, &p.stats),
                    blocks: p
                        .blocks
                        .iter()
                        .map(|b| BlockDto {
                            block_id: b.id.0,
                            size_bytes: b.size_bytes,
                            dedicated: b.dedicated,
                            address: format!("{:#x}", b.address),
                            ranges: b
                                .ranges
                                .iter()
                                .map(|r| RangeDto {
                                    offset: r.offset_bytes,
                                    size_bytes: r.size_bytes,
                                    free: r.free,
                                    allocation_id: r.allocation_id.clone(),
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolsDto {
    pub devices: Vec<DevicePoolsDto>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
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

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
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

impl From<&PressureReport> for PressureDto {
    fn from(r: &PressureReport) -> Self {
        PressureDto {
            device_id: r.device.to_string(),
            pressure_level: r.pressure_level,
            pressure_category: r.level.as_str().into(),
            available_memory: r.available_bytes,
            total_memory: r.total_bytes,
            utilization_percentage: r.utilization * 100.0,
            thresholds: ThresholdsDto {
                moderate: r.thresholds.moderate,
                high: r.thresholds.high,
                critical: r.thresholds.critical,
                hysteresis: r.thresholds.hysteresis,
                psi_some_percent: r.thresholds.psi_some_percent,
                psi_full_percent: r.thresholds.psi_full_percent,
            },
            recommended_actions: Vec::new(),
            time_to_critical: r.time_to_critical_secs,
            psi_some10: r.psi_some10,
            psi_full10: r.psi_full10,
            psi_some_total: r.psi_some_total_us,
            allocation_failures: r.allocation_failures,
            cgroup_limit_events: r.limit_events,
            psi_trigger: r.psi_trigger.as_ref().map(|t| match t {
                Ok(_) => "active".to_string(),
                Err(e) => format!("unavailable: {e}"),
            }),
            psi_trigger_fired: r.psi_trigger.as_ref().and_then(|t| t.as_ref().ok().copied()),
            sampled_at: r.sampled_at.map(rfc3339),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PressureAllDto {
    /// The highest of the devices'.
    pub pressure_level: u8,
    pub pressure_category: String,
    pub devices: Vec<PressureDto>,
}

/// One level change (an `/api/memory/events` event of type `pressure`).
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq, Clone)]
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

impl From<&PressureEvent> for PressureEventDto {
    fn from(e: &PressureEvent) -> Self {
        PressureEventDto {
            kind: "pressure".into(),
            device_id: e.device.to_string(),
            old_level: e.old.as_str().into(),
            new_level: e.new.as_str().into(),
            utilization_percentage: e.utilization * 100.0,
            available_memory: e.available_bytes,
            total_memory: e.total_bytes,
            psi_some10: e.psi_some10,
            psi_full10: e.psi_full10,
            timestamp: rfc3339(e.at),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PressureHistoryDto {
    pub events: Vec<PressureEventDto>,
}
