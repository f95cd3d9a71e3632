//! The service's vocabulary: its errors, requests and the records it hands out.

use super::ExportInfo;
use memwarden_backends::{BackendError, ExportHandle, GpuInfo, MemoryPoolInvariantError, ProcessMemory};
use memwarden_core::{DeviceId, MemoryKind, Placement, PoolStats};
use memwarden_protocol::api::allocations::ExportDto;
use std::collections::BTreeMap;
use std::sync::Arc;
use time::OffsetDateTime;

pub const DEFAULT_ALIGNMENT_BYTES: u64 = 256;

/// Errors of the service layer; each maps to one HTTP status and one stable code in the API.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServiceError {
    #[error("device '{requested}' not found; devices: {}", known.join(", "))]
    DeviceNotFound { requested: String, known: Vec<String> },
    #[error("allocation '{id}' not found (never allocated or already freed)")]
    AllocationNotFound { id: String },
    #[error("{field}: {message}")]
    InvalidArgument { field: &'static str, message: String },
    #[error("insufficient memory on {device}: requested {requested_bytes} bytes, available {available_bytes} bytes ({detail})")]
    InsufficientMemory { device: String, requested_bytes: u64, available_bytes: u64, detail: String },
    /// The owner's `[[quotas]]` entry for `device` and `kind` (`None`: `*`) has no room for the
    /// request's `requested_bytes` (as its pool counts them) beside the `used_bytes` it holds.
    #[error("quota exceeded: owner '{owner}' may hold {limit_bytes} bytes of {} and holds {used_bytes}; this request would add {requested_bytes} (nothing was allocated)", crate::config::quotas::Scope(*device, *kind))]
    QuotaExceeded {
        owner: String,
        device: Option<DeviceId>,
        kind: Option<MemoryKind>,
        limit_bytes: u64,
        used_bytes: u64,
        requested_bytes: u64,
    },
    #[error("{0}")]
    InvalidOperation(String),
    #[error("transfer '{id}' not found")]
    TransferNotFound { id: String },
    #[error("transfer {transfer_id} failed: {message}")]
    TransferFailed { transfer_id: String, message: String },
    #[error("backend unavailable for {device}: {reason}")]
    BackendUnavailable { device: String, reason: String },
    #[error("{device}: {message}")]
    BackendFailed { device: String, message: String },
}

impl ServiceError {
    /// The stable code the REST API and the socket protocol give this error.
    pub fn code(&self) -> &'static str {
        match self {
            ServiceError::DeviceNotFound { .. } => "DEVICE_NOT_FOUND",
            ServiceError::AllocationNotFound { .. } => "ALLOCATION_NOT_FOUND",
            ServiceError::InvalidArgument { .. } => "INVALID_ARGUMENT",
            ServiceError::InsufficientMemory { .. } => "INSUFFICIENT_MEMORY",
            ServiceError::QuotaExceeded { .. } => "QUOTA_EXCEEDED",
            ServiceError::InvalidOperation(_) => "INVALID_OPERATION",
            ServiceError::TransferNotFound { .. } => "TRANSFER_NOT_FOUND",
            ServiceError::TransferFailed { .. } => "TRANSFER_FAILED",
            ServiceError::BackendUnavailable { .. } => "BACKEND_UNAVAILABLE",
            ServiceError::BackendFailed { .. } => "BACKEND_ERROR",
        }
    }

    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ServiceError::InvalidArgument { field, message: message.into() }
    }

    pub(super) fn from_backend(device: DeviceId, e: BackendError) -> Self {
        let device = device.to_string();
        match e {
            BackendError::OutOfMemory { requested_bytes, available_bytes, detail } => {
                ServiceError::InsufficientMemory { device, requested_bytes, available_bytes, detail }
            }
            BackendError::Unavailable { reason } => ServiceError::BackendUnavailable { device, reason },
            BackendError::UnsupportedKind { kind, .. } => {
                ServiceError::invalid("memoryType", format!("{device} does not provide {kind} memory"))
            }
            BackendError::InvalidArgument(message) => ServiceError::InvalidArgument { field: "request", message },
            BackendError::Failed { .. } => ServiceError::BackendFailed { device, message: e.to_string() },
        }
    }
}

/// An allocation request, validated by the API layer's parsing and again here.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocateRequest {
    pub device: String,
    pub size_bytes: u64,
    pub kind: Option<MemoryKind>,
    pub alignment_bytes: u64,
    pub purpose: Option<String>,
    pub owner: Option<String>,
    /// The process that owns it: when that process exits, the allocation is freed (`reclaimed`).
    pub owner_pid: Option<u32>,
    /// Freed when this attached client's connection closes (`reclaimed`): the client's id,
    /// for allocations it made over the Unix socket.
    pub owner_client: Option<String>,
    pub persistent: bool,
    pub movable: bool,
}

impl AllocateRequest {
    /// `size_bytes` on `device` (an id or alias) with every option at its default: the
    /// device's default kind, 256-byte alignment, no purpose or owner, not persistent, fixed.
    pub fn new(device: impl std::fmt::Display, size_bytes: u64) -> Self {
        AllocateRequest {
            device: device.to_string(),
            size_bytes,
            kind: None,
            alignment_bytes: DEFAULT_ALIGNMENT_BYTES,
            purpose: None,
            owner: None,
            owner_pid: None,
            owner_client: None,
            persistent: false,
            movable: false,
        }
    }
}

/// A ledger entry, shared with callers without copying its strings.
pub type Allocation = Arc<AllocationRecord>;

/// One live allocation in the ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocationRecord {
    pub id: String,
    pub device: DeviceId,
    pub kind: MemoryKind,
    /// Bytes requested.
    pub size_bytes: u64,
    /// Bytes it occupies in its pool (the request rounded up to the pool granularity).
    pub allocated_bytes: u64,
    pub alignment_bytes: u64,
    /// `None` for reservations: they hold no memory.
    pub address: Option<u64>,
    pub placement: Option<Placement>,
    pub purpose: Option<String>,
    pub owner: Option<String>,
    /// Freed when this process exits (`reclaimed`); `None`: kept until freed.
    pub owner_pid: Option<u32>,
    /// Freed when this attached client's connection closes (`reclaimed`).
    pub owner_client: Option<String>,
    pub persistent: bool,
    pub movable: bool,
    /// Shared with another process (`export`): never moved.
    pub exported: bool,
    pub generation: u64,
    pub allocated_at: OffsetDateTime,
}

/// The REST API's (and the socket's `allocate` reply's) view of a ledger entry.
impl From<&AllocationRecord> for memwarden_protocol::api::allocations::AllocationDto {
    fn from(r: &AllocationRecord) -> Self {
        memwarden_protocol::api::allocations::AllocationDto {
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
            owner_pid: r.owner_pid,
            owner_client: r.owner_client.clone(),
            persistent: r.persistent,
            movable: r.movable,
            exported: r.exported,
            generation: r.generation,
            allocated_at: memwarden_protocol::api::rfc3339(r.allocated_at),
        }
    }
}

impl AllocationRecord {
    /// Bytes it commits: its pool bytes. A reservation is budget only (the device's
    /// `reservation_bytes` holds it) and commits none.
    pub fn committed_bytes(&self) -> u64 {
        if self.kind == MemoryKind::Reservation {
            0
        } else {
            self.allocated_bytes
        }
    }
}

/// What a free released (the record itself went to the event log, or was dropped).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FreedAllocation {
    pub device: DeviceId,
    pub kind: MemoryKind,
    pub placement: Option<Placement>,
    pub size_bytes: u64,
    /// Bytes it occupied in its pool.
    pub allocated_bytes: u64,
}

/// A device's memory now, as the OS or driver reports it, plus memwarden's own pools.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStatus {
    pub device: DeviceId,
    pub device_type: &'static str,
    pub name: String,
    pub memory_type: &'static str,
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub source: String,
    pub last_updated: OffsetDateTime,
    pub pools: Vec<(MemoryKind, PoolStats)>,
    pub reservation_bytes: u64,
    pub gpu: Option<GpuInfo>,
    /// The backend's own fields (see `DeviceInfo::extra`).
    pub extra: BTreeMap<String, String>,
    /// Memory the driver reserves for itself (GPUs, from NVML).
    pub driver_reserved_bytes: Option<u64>,
    pub processes: Vec<ProcessMemory>,
    /// The last driver error, when the device is unhealthy.
    pub fault: Option<String>,
}

impl DeviceStatus {
    pub fn utilization(&self) -> f64 {
        if self.total_bytes == 0 {
            0.0
        } else {
            self.used_bytes as f64 / self.total_bytes as f64
        }
    }

    /// The device's fragmentation index ([`device_fragmentation`] of its pools).
    pub fn fragmentation(&self) -> f64 {
        device_fragmentation(self.pools.iter().map(|(_, s)| *s))
    }

    pub fn pool_totals(&self) -> (u64, u64) {
        self.pools.iter().fold((0, 0), |(r, a), (_, s)| (r + s.reserved_bytes, a + s.allocated_bytes))
    }
}

/// A device's fragmentation index: the mean of its pools' indexes weighted by their free bytes
/// (a pool with nothing free weighs nothing; no pools: 0). Each pool is its own address space
/// (host and pinned blocks never merge), so one pool's free range cannot make up for another's:
/// the figure is `Σ (free − largest free range) / Σ free`, the share of free bytes that
/// compaction would make contiguous.
pub fn device_fragmentation(pools: impl IntoIterator<Item = PoolStats>) -> f64 {
    let (scattered, free) = pools.into_iter().fold((0u64, 0u64), |(scattered, free), p| {
        let largest = p.largest_free_block_bytes.min(p.free_in_pool_bytes);
        (scattered + (p.free_in_pool_bytes - largest), free + p.free_in_pool_bytes)
    });
    if free == 0 {
        0.0
    } else {
        scattered as f64 / free as f64
    }
}

/// What `clear` released on one device.
#[derive(Debug, Clone, PartialEq)]
pub struct ClearOutcome {
    pub device: DeviceId,
    pub cleared_bytes: u64,
    pub reserved_bytes_after: u64,
}

/// A device's pools checked against the books a caller keeps over them (the
/// allocation ledger): the first disagreement `Service::validate` finds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// A pool is inconsistent in itself.
    #[error("{device} {kind}: {source}")]
    Pool { device: DeviceId, kind: MemoryKind, source: MemoryPoolInvariantError },
    /// The ledger's allocations of one kind do not add up to the pool's allocated bytes.
    #[error("{device} {kind}: ledger holds {ledger_bytes} bytes, pool {pool_bytes}")]
    Allocated { device: DeviceId, kind: MemoryKind, ledger_bytes: u64, pool_bytes: u64 },
    /// The ledger's reservations do not add up to the device's reserved bytes.
    #[error("{device}: ledger reserves {ledger_bytes} bytes, device {device_bytes}")]
    Reserved { device: DeviceId, ledger_bytes: u64, device_bytes: u64 },
    /// An owner's quota books disagree with its allocations in the ledger.
    #[error("owner '{owner}' on {device} {kind}: quota books hold {books_bytes} bytes, ledger {ledger_bytes}")]
    Quota { owner: String, device: DeviceId, kind: MemoryKind, books_bytes: u64, ledger_bytes: u64 },
    /// The running per-owner or per-purpose totals disagree with a recount of the records.
    #[error("{what} '{group}': {detail}")]
    Totals { what: &'static str, group: String, detail: String },
}

impl ExportInfo {
    /// The export as the REST route and the socket's `export` reply show it (a descriptor
    /// rides beside it: see [`ExportInfo::into_fd`]).
    pub fn dto(&self, allocation_id: &str) -> ExportDto {
        let e = &self.export;
        let alloc = e.allocation.as_ref();
        ExportDto {
            allocation_id: allocation_id.into(),
            kind: e.kind.into(),
            device_id: self.device.to_string(),
            ipc_handle: match &e.handle {
                ExportHandle::Bytes(b) => Some(b.iter().map(|b| format!("{b:02x}")).collect()),
                _ => None,
            },
            path: match &e.handle {
                ExportHandle::Path(p) => Some(p.display().to_string()),
                _ => None,
            },
            offset: self.offset,
            size_bytes: self.size_bytes,
            allocation_bytes: alloc.map(|a| a.allocation_bytes),
            memory_type_index: alloc.map(|a| a.memory_type_index),
            dedicated: alloc.map(|a| a.dedicated),
            buffer_bytes: alloc.map(|a| a.buffer_bytes),
            device_uuid: e.device_uuid.clone(),
        }
    }

    /// The descriptor that must ride with the answer, when the export is one.
    pub fn into_fd(self) -> Option<memwarden_sys::SharedHandle> {
        match self.export.handle {
            ExportHandle::Fd(fd) => Some(fd),
            ExportHandle::Path(_) | ExportHandle::Bytes(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use memwarden_core::units::MIB;

    fn pool(free: u64, largest: u64) -> PoolStats {
        PoolStats { free_in_pool_bytes: free, largest_free_block_bytes: largest, ..PoolStats::default() }
    }

    #[test]
    fn unfragmented_pools_make_an_unfragmented_device() {
        // Host and pinned, each with its free space in one range: the old "all pools as one
        // free space" figure said 1 − 5/8 = 0.375 here.
        assert_eq!(device_fragmentation([pool(5 * MIB, 5 * MIB), pool(3 * MIB, 3 * MIB)]), 0.0);
        assert_eq!(device_fragmentation([]), 0.0);
        assert_eq!(device_fragmentation([pool(0, 0), pool(0, 0)]), 0.0);
    }

    #[test]
    fn the_device_figure_is_the_free_bytes_weighted_mean_of_its_pools() {
        // 0.875 over 8 MiB free and 0.0 over 8 MiB free: 0.4375; a pool with nothing free
        // weighs nothing.
        let f = device_fragmentation([pool(8 * MIB, MIB), pool(8 * MIB, 8 * MIB), pool(0, 0)]);
        assert!((f - 0.4375).abs() < 1e-12, "{f}");
        let one = pool(8 * MIB, MIB);
        assert!((device_fragmentation([one]) - one.fragmentation_index()).abs() < 1e-12);
    }
}
