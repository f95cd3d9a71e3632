//! Allocations: allocate, list, free, clear, export, and their bytes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `POST /api/memory/allocations/allocate[/{deviceId}]`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
    /// The process that owns it (alive when allocating): when it exits, the allocation and its
    /// export are freed within a second and logged as `reclaimed`. Without one, the allocation
    /// stays until freed.
    pub owner_pid: Option<u32>,
    /// The device, on the route without one in the path; when absent there, the device with the
    /// most available memory of `memoryType` (each device's default kind without one).
    pub device_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
    /// Freed when this process exits; null: kept until freed.
    #[serde(default)]
    pub owner_pid: Option<u32>,
    /// Freed when this attached client's connection closes (allocated over the Unix socket);
    /// null otherwise.
    #[serde(default)]
    pub owner_client: Option<String>,
    pub persistent: bool,
    pub movable: bool,
    /// Shared with another process: never moved.
    pub exported: bool,
    pub generation: u64,
    pub allocated_at: String,
}

/// One page of `GET /api/memory/allocations[/device/{deviceId}]`, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocationListDto {
    /// This page: at most `limit` of the matching allocations, after the cursor's.
    pub allocations: Vec<AllocationDto>,
    /// Every live allocation that matches the filters, on this page and the others.
    pub count: usize,
    /// Sum of `sizeBytes` of every live allocation that matches the filters.
    pub total_bytes: u64,
    /// Pass as `cursor` (with the same filters) for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FreedDto {
    pub allocation_id: String,
    pub device_id: String,
    pub memory_type: String,
    /// Bytes returned to the pool (or to the budget, for a reservation).
    pub freed_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClearedDeviceDto {
    pub device_id: String,
    pub cleared_bytes: u64,
    /// Bytes the device's pools still hold after the clear.
    pub reserved_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClearDto {
    /// Bytes returned to the OS or driver.
    pub cleared_bytes: u64,
    pub devices: Vec<ClearedDeviceDto>,
}

/// What another process needs to map an allocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportDto {
    pub allocation_id: String,
    /// `cudaIpc` (device memory: open `ipcHandle` with cudaIpcOpenMemHandle, add `offset`),
    /// `shm` (host memory: map the file at `path`, add `offset`) or `vulkanOpaqueFd` (Vulkan
    /// memory, only over the Unix socket: the descriptor travels with the reply; import it with
    /// `VkImportMemoryFdInfoKHR` on the device whose UUID is `deviceUuid`, with
    /// `allocationSize` = `allocationBytes` and `memoryTypeIndex`, a dedicated allocation when
    /// `dedicated`, and add `offset`).
    pub kind: String,
    pub device_id: String,
    /// 64 bytes, hex (cudaIpc).
    pub ipc_handle: Option<String>,
    /// File under /dev/shm, mode 0600 (shm).
    pub path: Option<String>,
    /// Offset of the allocation inside what the handle or file maps.
    pub offset: u64,
    pub size_bytes: u64,
    /// vulkanOpaqueFd: the exported allocation's size, the importer's `allocationSize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_bytes: Option<u64>,
    /// vulkanOpaqueFd: the importer's `memoryTypeIndex`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_type_index: Option<u32>,
    /// vulkanOpaqueFd: whether the import must be a dedicated allocation, over a buffer of
    /// exactly `bufferBytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedicated: Option<bool>,
    /// vulkanOpaqueFd: the size of the exporter's buffer over the allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer_bytes: Option<u64>,
    /// vulkanOpaqueFd: the physical device's UUID (`VkPhysicalDeviceIDProperties::deviceUUID`,
    /// printed like nvidia-smi's), to pick the same device in the importing process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_uuid: Option<String>,
}

/// `GET /api/memory/allocations/{id}/data`: bytes of an allocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataDto {
    pub allocation_id: String,
    pub offset: u64,
    pub length: u64,
    /// The bytes, base64 (standard alphabet, padded).
    pub data_base64: String,
}

/// `PUT /api/memory/allocations/{id}/data`: what was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WrittenDto {
    pub allocation_id: String,
    pub offset: u64,
    pub bytes_written: u64,
}
