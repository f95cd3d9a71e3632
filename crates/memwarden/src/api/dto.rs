//! Conversion from service types into the REST API's JSON shapes, which live in
//! `memwarden_protocol::api` (camelCase, integer bytes, string enums, RFC 3339 times; field names
//! follow the seed's clients) and are re-exported here.

use super::envelope::rfc3339;
use crate::app::{
    AllocationPage, BackendHealth, CanAllocate, ClearOutcome, DefragReport, DeviceStatus, PoolDump, PressureEvent,
    PressureReport, TransferRecord,
};
pub use memwarden_protocol::api::{allocations::*, pools::*, pressure::*, status::*, transfer::*};

/// One page of a listing; `next_cursor` is the API's spelling of `page.next`.
pub fn allocation_list(page: &AllocationPage, next_cursor: Option<String>) -> AllocationListDto {
    AllocationListDto {
        allocations: page.allocations.iter().map(|r| AllocationDto::from(&**r)).collect(),
        count: page.count,
        total_bytes: page.total_bytes,
        next_cursor,
    }
}

/// One pool's figures.
pub fn pool_status(kind: memwarden_core::MemoryKind, p: &memwarden_core::PoolStats) -> PoolStatusDto {
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
            pools: s.pools.iter().map(|(k, p)| pool_status(*k, p)).collect(),
            fragmentation: s.fragmentation(),
            can_allocate: None,
            uuid: s.gpu.as_ref().map(|g| g.uuid.clone()),
            // Empty for GPUs whose API does not tell (Vulkan): left out rather than "".
            pci_bus_id: s.gpu.as_ref().map(|g| g.pci_bus_id.clone()).filter(|b| !b.is_empty()),
            compute_capability: s.gpu.as_ref().map(|g| g.compute_capability.clone()).filter(|c| !c.is_empty()),
            memory_bandwidth: s.gpu.as_ref().and_then(|g| g.memory_bandwidth_bytes_per_s),
            reserved_memory: s.driver_reserved_bytes,
            processes: s
                .processes
                .iter()
                .map(|p| ProcessDto { pid: p.pid, name: p.name.clone(), used_memory: p.used_bytes })
                .collect(),
            healthy: s.fault.is_none(),
            last_error: s.fault.clone(),
            extra: s.extra.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect(),
        }
    }
}

/// What a clear returned, in total and per device.
pub fn clear_dto(outcomes: &[ClearOutcome]) -> ClearDto {
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

/// `/health`'s and the status's line for one backend (the backends crate's own type, so a
/// function: neither type is this crate's).
pub fn backend_dto(b: &BackendHealth) -> BackendDto {
    BackendDto {
        name: b.name.into(),
        available: b.available,
        devices: b.devices.clone(),
        reason: b.reason.as_ref().map(|r| format!("backend unavailable: {r}")),
    }
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

/// A device's pools with their blocks and ranges.
pub fn device_pools(device: memwarden_core::DeviceId, pools: &[PoolDump]) -> DevicePoolsDto {
    DevicePoolsDto {
        device_id: device.to_string(),
        pools: pools
            .iter()
            .map(|p| PoolDumpDto {
                stats: pool_status(p.kind, &p.stats),
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

impl From<&PressureReport> for PressureDto {
    fn from(r: &PressureReport) -> Self {
        PressureDto {
            device_id: r.device.to_string(),
            pressure_level: r.pressure_level,
            pressure_category: r.level.as_str().into(),
            available_memory: r.available_bytes,
            total_memory: r.total_bytes,
            utilization_percentage: r.utilization * 100.0,
            thresholds: ThresholdsDto::from(&r.thresholds),
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
