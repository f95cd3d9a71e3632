//! The allocation path below the service's checks: a request checked once ([`Checked`]) is
//! charged to its owner's quota, placed by its device (budget admission and block growth there)
//! and recorded in the ledger, each through the part that owns it; and the free path back.

use super::device::{AllocFailure, Device};
use super::devices::Devices;
use super::ledger::Ledger;
use super::quota::{Charge, Quotas};
use super::{AllocateRequest, Allocation, AllocationRecord, FreedAllocation, ServiceError, MAX_TEXT_CHARS};
use crate::config::DefragSection;
use crate::sync::lock;
use memwarden_core::defrag::DefragOptions;
use memwarden_core::{DeviceId, MemoryKind, Placement};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// The parts an allocation goes through.
#[derive(Clone, Copy)]
pub(super) struct Parts<'a> {
    pub devices: &'a Devices,
    pub quotas: &'a Quotas,
    pub ledger: &'a Ledger,
}

/// An allocation request checked once on its way down: the device it resolved to and the
/// memory kind it takes there. Nothing below checks the request again.
#[derive(Debug)]
pub(super) struct Checked {
    pub id: DeviceId,
    pub kind: MemoryKind,
    pub req: AllocateRequest,
}

/// Why [`place`] placed nothing; the request comes back for another try (boxed: these are the
/// slow paths, and the fast one returns a small `Result`).
pub(super) enum NotPlaced {
    /// It needs a new block and the caller may not wait for one.
    WouldBlock(Box<Checked>),
    /// It does not fit the device's budget now.
    NoRoom(Box<Checked>, ServiceError),
    Failed(ServiceError),
}

impl NotPlaced {
    pub(super) fn into_error(self) -> ServiceError {
        match self {
            NotPlaced::WouldBlock(c) => ServiceError::BackendFailed {
                device: c.req.device,
                message: "allocation deferred although blocking was allowed".into(),
            },
            NotPlaced::NoRoom(_, e) | NotPlaced::Failed(e) => e,
        }
    }
}

/// An allocation `Service::allocate_or_defer` could not finish without blocking: checked,
/// and finished by `Service::allocate_pending` (on a thread that may block) without being
/// checked or resolved again.
#[derive(Debug)]
pub struct PendingAllocation {
    pub(super) checked: Box<Checked>,
    /// The attempt's refusal when it did not fit the budget (the blocking step goes straight to
    /// what a failed allocation does: record it, and maybe defragment and retry).
    pub(super) failed: Option<ServiceError>,
}

/// The checks of an allocation request that need no device: its text fields and its size.
pub(super) fn check_fields(req: &AllocateRequest) -> Result<(), ServiceError> {
    for (field, text) in [("purpose", &req.purpose), ("owner", &req.owner)] {
        if let Some(t) = text.as_deref().filter(|t| t.chars().count() > MAX_TEXT_CHARS) {
            return Err(ServiceError::invalid(
                field,
                format!("{} characters, more than the {MAX_TEXT_CHARS} allowed", t.chars().count()),
            ));
        }
    }
    if req.size_bytes == 0 {
        return Err(ServiceError::invalid("sizeBytes", "must be greater than 0"));
    }
    Ok(())
}

/// Charges the owner's quota, places the request on its device (`may_block`: a new block
/// may be made) and records it.
pub(super) fn place(parts: Parts<'_>, c: Checked, may_block: bool) -> Result<Allocation, NotPlaced> {
    let dev = parts.devices.get_or_404(c.id).map_err(NotPlaced::Failed)?;
    let backend = dev.backend.as_ref();
    let size_bytes = c.req.size_bytes;
    // Charged before the pool is asked, so concurrent requests cannot overshoot together.
    let charge = parts.quotas.charge(c.req.owner.as_deref(), c.id, c.kind, size_bytes).map_err(NotPlaced::Failed)?;
    let outcome = {
        let mut st = lock(&dev.state);
        if c.kind == MemoryKind::Reservation {
            st.reserve(backend, size_bytes).map(|()| (size_bytes, None, None))
        } else {
            st.allocate(backend, c.kind, size_bytes, c.req.alignment_bytes, may_block)
                .map(|a| (a.placement.size_bytes, Some(a.address), Some(a.placement)))
        }
    };
    let placed = match outcome {
        Ok(placed) => placed,
        Err(failure) => {
            if let Some(charge) = charge {
                parts.quotas.abandon(charge);
            }
            return Err(match failure {
                AllocFailure::WouldBlock => NotPlaced::WouldBlock(Box::new(c)),
                AllocFailure::Backend(e) => NotPlaced::Failed(ServiceError::from_backend(c.id, e)),
                AllocFailure::OverBudget { requested_bytes, available_bytes, detail } => {
                    let e = ServiceError::InsufficientMemory {
                        device: c.id.to_string(),
                        requested_bytes,
                        available_bytes,
                        detail,
                    };
                    NotPlaced::NoRoom(Box::new(c), e)
                }
            });
        }
    };
    record(parts, c, dev, charge, placed).map_err(NotPlaced::Failed)
}

/// Records what the device placed (`allocated bytes, address, placement`) in the ledger and
/// settles its quota charge; gives the placement back when the connection that asked closed
/// meanwhile.
fn record(
    parts: Parts<'_>,
    c: Checked,
    dev: &Device,
    charge: Option<Charge>,
    (allocated_bytes, address, placement): (u64, Option<u64>, Option<Placement>),
) -> Result<Allocation, ServiceError> {
    let Checked { id, kind, req } = c;
    // One clock read serves the record and the event log.
    let now = std::time::SystemTime::now();
    let now_ns = now.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
    let uuid = uuid::Uuid::new_v4();
    let record = Arc::new(AllocationRecord {
        id: uuid.to_string(),
        device: id,
        kind,
        size_bytes: req.size_bytes,
        allocated_bytes,
        alignment_bytes: req.alignment_bytes,
        address,
        placement,
        purpose: req.purpose,
        owner: req.owner,
        owner_pid: req.owner_pid,
        owner_client: req.owner_client,
        persistent: req.persistent,
        movable: req.movable,
        exported: false,
        generation: 0,
        allocated_at: OffsetDateTime::from(now),
    });
    let orphan = {
        let mut ledger = parts.ledger.lock();
        let orphan = record.owner_client.as_ref().is_some_and(|c| !ledger.open_clients.contains(c));
        match (orphan, charge) {
            (true, Some(c)) => parts.quotas.abandon(c),
            (false, Some(c)) => parts.quotas.settle(c, allocated_bytes),
            (_, None) => {}
        }
        if !orphan {
            ledger.recorder.allocated(&record, uuid.as_u128(), now_ns);
            ledger.records.insert(record.clone(), now_ns);
        }
        orphan
    };
    if orphan {
        // The connection that asked closed meanwhile (its memory is already reclaimed):
        // give the placement back rather than leave memory nobody owns.
        if let Err(e) = lock(&dev.state).free(kind, record.placement.as_ref(), record.size_bytes) {
            tracing::warn!(device = %id, error = %e, "an allocation for a closed connection was not given back");
        }
        return Err(ServiceError::InvalidOperation(format!(
            "the connection '{}' closed before its allocation was made",
            record.owner_client.as_deref().unwrap_or_default()
        )));
    }
    Ok(record)
}

/// Places a checked request (blocking allowed), or takes up the refusal of an attempt that
/// did not fit (`failed`): a placement that does not fit is counted and, on a fragmented
/// device with the automatic pass configured, retried once after a bounded pass.
pub(super) fn finish(
    parts: Parts<'_>,
    auto_defrag: Option<&DefragSection>,
    checked: Checked,
    failed: Option<ServiceError>,
) -> Result<Allocation, ServiceError> {
    let (checked, e) = match failed {
        Some(e) => (checked, e),
        None => match place(parts, checked, true) {
            Ok(a) => return Ok(a),
            Err(NotPlaced::NoRoom(checked, e)) => (*checked, e),
            Err(other) => return Err(other.into_error()),
        },
    };
    let id = checked.id;
    parts.devices.note_failure(id);
    // A reservation that does not fit is a budget answer, not a placement failure.
    if let (ServiceError::InsufficientMemory { requested_bytes, .. }, false) =
        (&e, checked.kind == MemoryKind::Reservation)
    {
        parts.ledger.lock().recorder.failed(id, *requested_bytes);
    }
    let Some(auto) = auto_defrag else { return Err(e) };
    // Fragmented and out of room: one bounded pass, then one more try.
    let dev = parts.devices.get_or_404(id)?;
    if dev.fragmentation() < auto.fragmentation_threshold {
        return Err(e);
    }
    let options = DefragOptions {
        strategy: auto.strategy,
        max_bytes_to_move: auto.max_bytes_to_move,
        max_allocations_to_move: usize::MAX,
    };
    // A pass already running on the device is not waited for: the allocation fails.
    let max_time = Some(Duration::from_millis(auto.max_time_ms));
    let Some(report) = dev.defragment_if_idle(id, parts.ledger, options, max_time) else {
        return Err(e);
    };
    tracing::info!(device = %id, moved = report.bytes_moved, released = report.bytes_released, "automatic defragmentation after a failed allocation");
    place(parts, checked, true).map_err(NotPlaced::into_error)
}

/// Frees an allocation (`reclaimed`: its owner is gone): out of the ledger and its owner's
/// quota, then back to its device's pool; put back as it was when the pool refuses.
pub(super) fn free(parts: Parts<'_>, allocation_id: &str, reclaimed: bool) -> Result<FreedAllocation, ServiceError> {
    let (freed, kept) = {
        let mut ledger = parts.ledger.settled(&[allocation_id]);
        if let Some(&n) = (!ledger.busy.is_empty()).then(|| ledger.busy.get(allocation_id)).flatten() {
            if reclaimed {
                // Its owner is gone: free it when the copy is done (`release`).
                ledger.reclaim_on_release.insert(allocation_id.to_string());
            }
            return Err(ServiceError::InvalidOperation(format!(
                "allocation '{allocation_id}' is in use by {n} transfer(s); free it when they finish"
            )));
        }
        let record = ledger
            .records
            .remove(allocation_id, memwarden_sys::coarse_unix_nanos())
            .ok_or_else(|| ServiceError::AllocationNotFound { id: allocation_id.to_string() })?;
        let freed = FreedAllocation {
            device: record.device,
            kind: record.kind,
            placement: record.placement,
            size_bytes: record.size_bytes,
            allocated_bytes: record.allocated_bytes,
        };
        parts.quotas.give_back(&record);
        // The ledger's record moves into the event log (no copy); it comes back when
        // recording is off.
        (freed, ledger.recorder.freed(record, reclaimed))
    };
    let dev = parts.devices.get_or_404(freed.device)?;
    let result = lock(&dev.state).free(freed.kind, freed.placement.as_ref(), freed.size_bytes);
    if let Err(e) = result {
        // Keep the handle so the caller can retry; the pool did not change.
        let mut ledger = parts.ledger.lock();
        if let Some(record) = ledger.recorder.unfreed(allocation_id, kept) {
            parts.quotas.take_back(&record);
            ledger.records.insert(record, memwarden_sys::coarse_unix_nanos());
        }
        return Err(ServiceError::from_backend(freed.device, e));
    }
    Ok(freed)
}
