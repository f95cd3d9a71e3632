//! Transfers and copies between allocations (any devices), exports to other processes, and
//! reading/writing an allocation's bytes: the [`Transfers`] part runs the copies; the service
//! (`impl Service` below) resolves an allocation to its memory and marks it in use meanwhile.

use super::{AllocateRequest, Allocation, AllocationRecord, Service, ServiceError};
use crate::sync::lock;
use memwarden_backends::{copy_between, BlockExport, SharedBlock};
use memwarden_core::units::MIB;
use memwarden_core::{DeviceId, MemoryKind};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use time::OffsetDateTime;

/// Finished transfers kept for `GET /api/memory/transfer/{id}`.
const FINISHED_KEPT: usize = 1024;
/// Background transfers copy in chunks of this size, updating progress between chunks.
const CHUNK_BYTES: u64 = 256 * MIB;

/// Where a transfer writes.
#[derive(Debug, Clone, PartialEq)]
pub enum TransferTarget {
    /// An existing allocation, at an offset.
    Allocation { id: String, offset: u64 },
    /// A new allocation on a device (of its default kind unless given).
    NewOn { device: String, kind: Option<MemoryKind> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TransferRequest {
    pub source_id: String,
    pub source_offset: u64,
    pub target: TransferTarget,
    /// Default: the rest of the source from `source_offset`.
    pub size_bytes: Option<u64>,
    /// Free the source once the bytes have arrived.
    pub move_source: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferStatus {
    Running,
    Completed,
    Failed,
}

impl TransferStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferStatus::Running => "running",
            TransferStatus::Completed => "completed",
            TransferStatus::Failed => "failed",
        }
    }
}

/// A transfer as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferRecord {
    pub id: String,
    pub status: TransferStatus,
    pub move_source: bool,
    pub source_id: String,
    pub source_device: DeviceId,
    pub source_offset: u64,
    pub destination_id: String,
    pub destination_device: DeviceId,
    pub destination_offset: u64,
    pub size_bytes: u64,
    pub bytes_done: u64,
    pub started_at: OffsetDateTime,
    pub finished_at: Option<OffsetDateTime>,
    pub duration_secs: f64,
    pub error: Option<String>,
}

impl TransferRecord {
    /// Achieved bytes per second so far.
    pub fn bytes_per_second(&self) -> f64 {
        if self.duration_secs > 0.0 {
            self.bytes_done as f64 / self.duration_secs
        } else {
            0.0
        }
    }
}

/// A transfer in flight or finished, shared with the thread that runs it.
struct TransferState {
    record: Mutex<TransferRecord>,
    bytes_done: AtomicU64,
    started: Instant,
}

impl TransferState {
    fn snapshot(&self) -> TransferRecord {
        let mut r = lock(&self.record).clone();
        r.bytes_done = self.bytes_done.load(Ordering::Relaxed);
        if r.status == TransferStatus::Running {
            r.duration_secs = self.started.elapsed().as_secs_f64();
        }
        r
    }
}

/// The transfers part of the service. Owns every transfer running and the last
/// [`FINISHED_KEPT`] finished ones (behind its own lock), and the threads that copy the large
/// ones in the background; how large a copy may be to run synchronously is its setting. It
/// copies between allocations the service resolved and marked in use; a destination it makes
/// and a moved source it frees go through the service's own allocate and free.
pub(crate) struct Transfers {
    table: Mutex<Table>,
    /// Transfers up to this size answer synchronously; larger ones run in the background.
    sync_max_bytes: u64,
}

#[derive(Default)]
struct Table {
    all: HashMap<String, Arc<TransferState>>,
    finished: VecDeque<String>,
}

/// What another process needs to map an allocation: its block's export (backend-neutral) and
/// where in the block the allocation lies.
#[derive(Debug)]
pub struct ExportInfo {
    pub device: DeviceId,
    pub export: BlockExport,
    pub offset: u64,
    pub size_bytes: u64,
}

/// How an export reaches the other process: what it can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportVia {
    /// An HTTP answer: names and bytes, no file descriptors.
    Http,
    /// A protocol-v2 reply on the Unix socket, which carries descriptors (`SCM_RIGHTS`).
    Socket,
}

/// One side of a copy, resolved to memory.
struct Side {
    record: Allocation,
    block: SharedBlock,
    /// Offset of the allocation inside its block.
    base: u64,
}

impl Service {
    /// The block memory behind an allocation (reservations have none).
    fn side(&self, record: Allocation, field: &'static str) -> Result<Side, ServiceError> {
        let placement = record.placement.ok_or_else(|| {
            ServiceError::invalid(field, format!("allocation '{}' is a reservation and holds no memory", record.id))
        })?;
        let dev = self.devices.get_or_404(record.device)?;
        let block = lock(&dev.state).pool(record.kind).and_then(|p| p.block(placement.block)).ok_or_else(|| {
            ServiceError::BackendFailed {
                device: record.device.to_string(),
                message: format!("allocation '{}' names a block its pool does not hold", record.id),
            }
        })?;
        Ok(Side { record, block, base: placement.offset_bytes })
    }

    /// Marks allocations as used by a copy (they cannot be freed meanwhile); fails if one of
    /// them is gone.
    pub(super) fn acquire(&self, ids: &[&str]) -> Result<(), ServiceError> {
        self.ledger.acquire(ids)
    }

    /// Takes a copy's marks off.
    pub(super) fn release(&self, ids: &[&str]) {
        let deferred = self.ledger.release(ids);
        // Allocations whose owner went away while this copy used them.
        if !deferred.is_empty() {
            let (count, bytes, _) = self.reclaim(&deferred);
            tracing::info!(count, bytes, "reclaimed allocations of gone owners once their copies finished");
        }
    }

    /// Marks the source and destination of a copy busy and resolves both to their memory,
    /// read again once neither can move (a defragmentation pass may have moved one since the
    /// first read). On failure nothing stays marked, and a destination made for the copy
    /// (`created`) is freed again.
    fn copy_sides(
        &self,
        source: &AllocationRecord,
        destination: &AllocationRecord,
        created: bool,
    ) -> Result<(Side, Side), ServiceError> {
        let sides = self.acquire(&[&source.id, &destination.id]).and_then(|()| {
            let pair = self
                .allocation(&source.id)
                .and_then(|s| self.side(s, "sourceAllocationId"))
                .and_then(|s| Ok((s, self.side(self.allocation(&destination.id)?, "destinationAllocationId")?)));
            if pair.is_err() {
                self.release(&[&source.id, &destination.id]);
            }
            pair
        });
        if sides.is_err() && created {
            let _ = self.free(&destination.id);
        }
        sides
    }
}

impl Transfers {
    pub(super) fn new(sync_max_bytes: u64) -> Self {
        Transfers { table: Mutex::new(Table::default()), sync_max_bytes }
    }

    pub(super) fn set_sync_max_bytes(&mut self, bytes: u64) {
        self.sync_max_bytes = bytes;
    }

    /// Starts a transfer: checks every field, places a new destination if asked, marks both
    /// allocations busy, and copies — synchronously up to the configured size, otherwise on a
    /// background thread (`status: running`). A failed copy reports `failed` with the error;
    /// a destination it created is freed again, and a `move` keeps its source.
    pub(super) fn start(&self, service: &Arc<Service>, req: TransferRequest) -> Result<TransferRecord, ServiceError> {
        let source = service
            .allocation(&req.source_id)
            .map_err(|_| ServiceError::AllocationNotFound { id: req.source_id.clone() })?;
        let size = transfer_size(&source, &req)?;
        let (destination, dst_offset, created) = Transfers::destination(service, &source, &req, size)?;
        let (src, dst) = service.copy_sides(&source, &destination, created)?;
        let id = uuid::Uuid::new_v4().to_string();
        let state = Arc::new(TransferState {
            record: Mutex::new(TransferRecord {
                id: id.clone(),
                status: TransferStatus::Running,
                move_source: req.move_source,
                source_id: source.id.clone(),
                source_device: source.device,
                source_offset: req.source_offset,
                destination_id: destination.id.clone(),
                destination_device: destination.device,
                destination_offset: dst_offset,
                size_bytes: size,
                bytes_done: 0,
                started_at: OffsetDateTime::now_utc(),
                finished_at: None,
                duration_secs: 0.0,
                error: None,
            }),
            bytes_done: AtomicU64::new(0),
            started: Instant::now(),
        });
        lock(&self.table).all.insert(id.clone(), state.clone());
        let sync = size <= self.sync_max_bytes;
        // Background transfers copy in chunks so progress can be reported; a synchronous one
        // copies in one call (no per-chunk synchronisation to pay).
        let chunk = if sync { size } else { CHUNK_BYTES };
        let job = TransferJob {
            src,
            src_offset: req.source_offset,
            dst,
            dst_offset,
            size,
            chunk,
            created,
            state: state.clone(),
        };
        if sync {
            self.run(service, job);
            let record = state.snapshot();
            if let Some(error) = &record.error {
                return Err(ServiceError::TransferFailed { transfer_id: record.id.clone(), message: error.clone() });
            }
            Ok(record)
        } else {
            let service = service.clone();
            std::thread::Builder::new()
                .name(format!("transfer-{}", &id[..8]))
                .spawn(move || service.transfers.run(&service, job))
                .map_err(|e| ServiceError::BackendFailed {
                    device: source.device.to_string(),
                    message: e.to_string(),
                })?;
            Ok(state.snapshot())
        }
    }

    /// Where a transfer's bytes go: an existing allocation at an offset (checked against it and
    /// against the source's range), or a new allocation made like the source. The bool says
    /// whether it was made here (freed again if the transfer fails).
    fn destination(
        service: &Service,
        source: &AllocationRecord,
        req: &TransferRequest,
        size: u64,
    ) -> Result<(Allocation, u64, bool), ServiceError> {
        match &req.target {
            TransferTarget::Allocation { id, offset } => {
                let d = service.allocation(id)?;
                if offset.checked_add(size).is_none_or(|end| end > d.size_bytes) {
                    return Err(ServiceError::invalid(
                        "destinationOffset",
                        format!("{offset}+{size} exceeds the destination's {} bytes", d.size_bytes),
                    ));
                }
                if d.id == source.id {
                    let (a, b) = (req.source_offset, *offset);
                    if a < b + size && b < a + size {
                        return Err(ServiceError::invalid(
                            "destinationOffset",
                            "source and destination ranges overlap",
                        ));
                    }
                }
                Ok((d, *offset, false))
            }
            TransferTarget::NewOn { device, kind } => {
                let d = service.allocate(AllocateRequest {
                    device: device.clone(),
                    size_bytes: size,
                    kind: *kind,
                    alignment_bytes: source.alignment_bytes,
                    purpose: source.purpose.clone(),
                    owner: source.owner.clone(),
                    // The copy belongs to the same process: it goes when that process does.
                    owner_pid: source.owner_pid,
                    owner_client: source.owner_client.clone(),
                    persistent: source.persistent,
                    movable: source.movable,
                })?;
                Ok((d, 0, true))
            }
        }
    }

    /// Copies a job's bytes (in chunks, keeping its progress), then releases both sides and
    /// finishes it: frees the destination it made when the copy failed, or the source of a
    /// `move` when it succeeded.
    fn run(&self, service: &Service, job: TransferJob) {
        let TransferJob { src, src_offset, dst, dst_offset, size, chunk, created, state } = job;
        let mut done = 0;
        let mut result = Ok(());
        while done < size {
            let n = chunk.min(size - done);
            result = copy_between(
                src.block.as_ref(),
                src.base + src_offset + done,
                dst.block.as_ref(),
                dst.base + dst_offset + done,
                n,
            );
            if result.is_err() {
                break;
            }
            done += n;
            state.bytes_done.store(done, Ordering::Relaxed);
        }
        service.release(&[&src.record.id, &dst.record.id]);
        let elapsed = state.started.elapsed().as_secs_f64();
        let mut error = result.err().map(|e| e.to_string());
        if error.is_some() && created {
            let _ = service.free(&dst.record.id);
        }
        if done > 0 {
            service.ledger.lock().recorder.transferred(src.record.device, dst.record.device, done);
        }
        let move_source = lock(&state.record).move_source;
        if error.is_none() && move_source {
            if let Err(e) = service.free(&src.record.id) {
                error = Some(format!("bytes copied, but freeing the source failed: {e}"));
            }
        }
        {
            let mut r = lock(&state.record);
            r.status = if error.is_some() { TransferStatus::Failed } else { TransferStatus::Completed };
            r.error = error;
            r.duration_secs = elapsed;
            r.finished_at = Some(OffsetDateTime::now_utc());
        }
        let mut t = lock(&self.table);
        t.finished.push_back(lock(&state.record).id.clone());
        while t.finished.len() > FINISHED_KEPT {
            if let Some(old) = t.finished.pop_front() {
                t.all.remove(&old);
            }
        }
    }

    /// A transfer by id (running, or among the last finished ones).
    pub(super) fn status(&self, id: &str) -> Result<TransferRecord, ServiceError> {
        let state = lock(&self.table).all.get(id).cloned();
        state.map(|s| s.snapshot()).ok_or_else(|| ServiceError::TransferNotFound { id: id.to_string() })
    }
}

impl Service {
    /// What another process needs to map an allocation. The allocation is marked exported and
    /// will never be moved (marked first, so a defragmentation pass cannot move it between
    /// reading its place and handing the place out).
    pub fn export(&self, allocation_id: &str, via: ExportVia) -> Result<ExportInfo, ServiceError> {
        let (record, was) = {
            let mut ledger = self.ledger.settled(&[allocation_id]);
            let r = ledger
                .records
                .get_mut(allocation_id)
                .ok_or_else(|| ServiceError::AllocationNotFound { id: allocation_id.to_string() })?;
            // Refused before marking, so a refusal never undoes another request's export.
            let needs_fd = self.devices.get(r.device).is_some_and(|d| d.backend.exports_need_descriptor_passing());
            if via == ExportVia::Http && r.placement.is_some() && needs_fd {
                return Err(ServiceError::InvalidOperation(format!(
                    "allocation '{allocation_id}' is {} memory, exported as an opaque file descriptor, which HTTP \
                     cannot carry: ask over the Unix socket (protocol v2 `export`; Python `Client.export`)",
                    r.device
                )));
            }
            let was = (r.exported, r.movable);
            let m = Arc::make_mut(r);
            m.exported = true;
            m.movable = false;
            let record = r.clone();
            if !was.0 {
                ledger.recorder.exported(&record);
            }
            (record, was)
        };
        let exported = self.side(record.clone(), "allocationId").and_then(|side| {
            let e = side.block.export().map_err(|e| {
                ServiceError::InvalidOperation(format!("allocation '{allocation_id}' cannot be exported: {e}"))
            })?;
            Ok((side.base, e))
        });
        let (base, export) = match exported {
            Ok(x) => x,
            Err(e) => {
                let mut ledger = self.ledger.lock();
                if let Some(r) = ledger.records.get_mut(allocation_id) {
                    let m = Arc::make_mut(r);
                    (m.exported, m.movable) = was;
                }
                if !was.0 {
                    ledger.recorder.unexported(record.device, allocation_id);
                }
                return Err(e);
            }
        };
        Ok(ExportInfo { device: record.device, export, offset: base, size_bytes: record.size_bytes })
    }

    /// Runs `f` on an allocation's memory while it is marked in use, so that no defragmentation
    /// pass moves it (and no free releases it) in between.
    fn with_memory<T>(
        &self,
        allocation_id: &str,
        offset: u64,
        len: u64,
        f: impl FnOnce(&dyn memwarden_backends::Backend, &Side) -> Result<T, memwarden_backends::BackendError>,
    ) -> Result<T, ServiceError> {
        self.acquire(&[allocation_id])?;
        let result = (|| {
            let record = self.allocation(allocation_id)?;
            check_range(&record, offset, len)?;
            let side = self.side(record.clone(), "allocationId")?;
            let dev = self.devices.get_or_404(record.device)?;
            f(dev.backend.as_ref(), &side).map_err(|e| ServiceError::from_backend(record.device, e))
        })();
        self.release(&[allocation_id]);
        result
    }

    /// Writes bytes into an allocation at `offset` (bounds-checked).
    pub fn write_bytes(&self, allocation_id: &str, offset: u64, data: &[u8]) -> Result<(), ServiceError> {
        self.with_memory(allocation_id, offset, data.len() as u64, |backend, side| {
            backend.write(side.block.as_ref(), side.base + offset, data)
        })
    }

    /// Reads `len` bytes of an allocation at `offset` (bounds-checked).
    pub fn read_bytes(&self, allocation_id: &str, offset: u64, len: u64) -> Result<Vec<u8>, ServiceError> {
        self.with_memory(allocation_id, offset, len, |backend, side| {
            let mut out = vec![0u8; len as usize];
            backend.read(side.block.as_ref(), side.base + offset, &mut out)?;
            Ok(out)
        })
    }
}

fn check_range(record: &AllocationRecord, offset: u64, len: u64) -> Result<(), ServiceError> {
    if offset.checked_add(len).is_none_or(|end| end > record.size_bytes) {
        return Err(ServiceError::invalid(
            "offset",
            format!("{offset}+{len} is outside the allocation's {} bytes", record.size_bytes),
        ));
    }
    Ok(())
}

struct TransferJob {
    src: Side,
    src_offset: u64,
    dst: Side,
    dst_offset: u64,
    size: u64,
    chunk: u64,
    created: bool,
    state: Arc<TransferState>,
}

/// The bytes a transfer copies: the request's size, or the rest of the source past its offset;
/// checked against the source.
fn transfer_size(source: &AllocationRecord, req: &TransferRequest) -> Result<u64, ServiceError> {
    if req.source_offset > source.size_bytes {
        return Err(ServiceError::invalid(
            "sourceOffset",
            format!("{} is beyond the source's {} bytes", req.source_offset, source.size_bytes),
        ));
    }
    let size = req.size_bytes.unwrap_or(source.size_bytes - req.source_offset);
    if size == 0 {
        return Err(ServiceError::invalid("sizeBytes", "must be greater than 0"));
    }
    if req.source_offset.checked_add(size).is_none_or(|end| end > source.size_bytes) {
        return Err(ServiceError::invalid(
            "sizeBytes",
            format!("{}+{size} exceeds the source's {} bytes", req.source_offset, source.size_bytes),
        ));
    }
    Ok(size)
}
