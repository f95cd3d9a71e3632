//! The JSON shapes of the REST API (camelCase, integer bytes, string enums, RFC 3339 times) and
//! their conversion from service types. Field names follow the seed's clients.

use super::envelope::rfc3339;
use crate::service::{AllocationRecord, BackendHealth, ClearOutcome, DeviceStatus};
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
    pub fn new(records: &[AllocationRecord]) -> Self {
        AllocationListDto {
            allocations: records.iter().map(AllocationDto::from).collect(),
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
            pools: s
                .pools
                .iter()
                .map(|(k, p)| PoolStatusDto {
                    memory_type: k.to_string(),
                    reserved_bytes: p.reserved_bytes,
                    allocated_bytes: p.allocated_bytes,
                    free_in_pool_bytes: p.free_in_pool_bytes,
                    largest_free_block: p.largest_free_block_bytes,
                    block_count: p.block_count,
                    allocation_count: p.allocation_count,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusListDto {
    pub devices: Vec<DeviceStatusDto>,
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
