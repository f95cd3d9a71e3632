//! What the service records as it works: per-device counters (allocations, frees, failures,
//! moves, exports, transfers, defragmentation), the live bytes and their resettable peak, and a
//! bounded allocation event log. It lives inside the ledger, so the hot path takes no extra
//! lock: an allocation or a free updates it under the ledger lock it already holds.
//!
//! The log is built to cost the allocation path almost nothing (`benches/service.rs` compares
//! recording on and off): an `allocated` entry is a small copy (id bytes, sizes, device; no
//! reference count touched), and a `freed` entry takes the record the ledger gives up, so no
//! record is copied or shared more than without recording. Who allocated and why is resolved
//! when the log is read: from the ledger while the allocation lives, from its `freed` entry
//! after (always newer, so always still in the log). Frees are stamped with the coarse wall
//! clock (a few ns, 1–4 ms resolution). Owners' last activity is derived from the log when
//! asked.

use super::live::LiveSet;
use super::{Allocation, AllocationRecord};
use memwarden_core::history::{Counters, Peak, Ring};
use memwarden_core::{DeviceId, MemoryKind};
use std::collections::HashMap;
use std::sync::Arc;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Allocated,
    Freed,
    /// Moved by defragmentation (new address, same id).
    Moved,
    Exported,
    /// Freed because its owner process (`ownerPid`) exited.
    Reclaimed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Allocated => "allocated",
            EventKind::Freed => "freed",
            EventKind::Moved => "moved",
            EventKind::Exported => "exported",
            EventKind::Reclaimed => "reclaimed",
        }
    }
}

/// One entry of the allocation event log. The record is shared with the ledger (no copy of
/// its strings); for `moved` it is the record after the move.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocationEvent {
    /// When, in Unix nanoseconds (coarse clock).
    pub at_unix_ns: i64,
    pub kind: EventKind,
    pub record: Allocation,
}

impl AllocationEvent {
    pub fn at(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(self.at_unix_ns as i128).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

/// A device's counters, live bytes and peak.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DeviceRecord {
    pub counters: Counters,
    /// Bytes of live memwarden allocations (pool bytes; reservations commit none and count 0).
    pub live_bytes: u64,
    pub peak_live: Peak,
    /// The newest failed allocation: when, and the bytes it asked for.
    pub last_failure: Option<(OffsetDateTime, u64)>,
}

fn now_ns() -> i64 {
    memwarden_sys::coarse_unix_nanos()
}

/// One entry as stored.
enum Stored {
    Allocated {
        at_ns: i64,
        /// The id's UUID (ids are hyphenated UUIDs): 16 bytes instead of a string, as two
        /// words so the entry stays 8-aligned (48 bytes in all).
        uuid: [u64; 2],
        device: DeviceId,
        kind: MemoryKind,
        size_bytes: u64,
    },
    Record {
        at_ns: i64,
        kind: EventKind,
        record: Allocation,
    },
}

const _: () = assert!(std::mem::size_of::<Stored>() <= 48, "an event log entry fits in 48 bytes");

impl Stored {
    fn at_ns(&self) -> i64 {
        match self {
            Stored::Allocated { at_ns, .. } | Stored::Record { at_ns, .. } => *at_ns,
        }
    }

    fn device(&self) -> DeviceId {
        match self {
            Stored::Allocated { device, .. } => *device,
            Stored::Record { record, .. } => record.device,
        }
    }
}

pub(crate) struct Recorder {
    enabled: bool,
    /// The event log is kept (`analytics.event_log_size` > 0).
    logging: bool,
    log: Ring<Stored>,
    /// Time of the newest event the full log dropped (Unix ns; a window reaching before it is
    /// incomplete).
    dropped_at_ns: Option<i64>,
    devices: Vec<(DeviceId, DeviceRecord)>,
}

fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

impl Recorder {
    pub(crate) fn new(enabled: bool, log_size: usize) -> Self {
        Recorder { enabled, logging: log_size > 0, log: Ring::new(log_size), dropped_at_ns: None, devices: Vec::new() }
    }

    fn device(&mut self, id: DeviceId) -> &mut DeviceRecord {
        // A handful of devices: a scan beats hashing.
        let i = match self.devices.iter().position(|(d, _)| *d == id) {
            Some(i) => i,
            None => {
                self.devices.push((id, DeviceRecord::default()));
                self.devices.len() - 1
            }
        };
        &mut self.devices[i].1
    }

    #[inline]
    fn log(&mut self, e: Stored) {
        if !self.logging {
            return;
        }
        let dropped = &mut self.dropped_at_ns;
        self.log.push_with(e, |old| *dropped = Some(old.at_ns()));
    }

    /// `at`: the allocation's time, Unix nanoseconds; `uuid`: the UUID its id spells.
    pub(crate) fn allocated(&mut self, r: &Allocation, uuid: u128, at: i64) {
        if !self.enabled {
            return;
        }
        let bytes = r.committed_bytes();
        let d = self.device(r.device);
        d.counters.allocations += 1;
        d.counters.reservations += u64::from(r.kind == MemoryKind::Reservation);
        d.counters.allocated_bytes += bytes;
        d.live_bytes += bytes;
        if d.live_bytes > d.peak_live.value {
            d.peak_live.value = d.live_bytes;
            d.peak_live.at_ms = at / 1_000_000;
        }
        self.log(Stored::Allocated {
            at_ns: at,
            uuid: [(uuid >> 64) as u64, uuid as u64],
            device: r.device,
            kind: r.kind,
            size_bytes: r.size_bytes,
        });
    }

    /// Takes the record the ledger gave up into the log; gives it back when not recording.
    /// `reclaimed`: freed because its owner process exited (counted as a free too).
    pub(crate) fn freed(&mut self, r: Allocation, reclaimed: bool) -> Option<Allocation> {
        if !self.enabled {
            return Some(r);
        }
        let bytes = r.committed_bytes();
        let d = self.device(r.device);
        d.counters.frees += 1;
        d.counters.freed_bytes += bytes;
        if reclaimed {
            d.counters.reclaims += 1;
            d.counters.reclaimed_bytes += bytes;
        }
        d.live_bytes = d.live_bytes.saturating_sub(bytes);
        if !self.logging {
            return Some(r);
        }
        let kind = if reclaimed { EventKind::Reclaimed } else { EventKind::Freed };
        self.log(Stored::Record { at_ns: now_ns(), kind, record: r });
        None
    }

    /// Takes back the `freed` of a free that failed (the allocation is live again): the record,
    /// from the log or from `kept` (what `freed` gave back).
    pub(crate) fn unfreed(&mut self, id: &str, kept: Option<Allocation>) -> Option<Allocation> {
        let record = match kept {
            Some(r) => r,
            None => match self.log.remove_last_where(
                |e| matches!(e, Stored::Record { kind: EventKind::Freed, record, .. } if record.id == id),
            )? {
                Stored::Record { record, .. } => record,
                Stored::Allocated { .. } => return None,
            },
        };
        if self.enabled {
            let bytes = record.committed_bytes();
            let d = self.device(record.device);
            d.counters.frees = d.counters.frees.saturating_sub(1);
            d.counters.freed_bytes = d.counters.freed_bytes.saturating_sub(bytes);
            d.live_bytes += bytes;
        }
        Some(record)
    }

    pub(crate) fn moved(&mut self, r: &Allocation) {
        if !self.enabled {
            return;
        }
        self.device(r.device).counters.moves += 1;
        self.log(Stored::Record { at_ns: now_ns(), kind: EventKind::Moved, record: r.clone() });
    }

    pub(crate) fn exported(&mut self, r: &Allocation) {
        if !self.enabled {
            return;
        }
        self.device(r.device).counters.exports += 1;
        self.log(Stored::Record { at_ns: now_ns(), kind: EventKind::Exported, record: r.clone() });
    }

    /// Takes back an `exported` whose export failed.
    pub(crate) fn unexported(&mut self, device: DeviceId, id: &str) {
        if !self.enabled {
            return;
        }
        let c = &mut self.device(device).counters;
        c.exports = c.exports.saturating_sub(1);
        self.log.remove_last_where(
            |e| matches!(e, Stored::Record { kind: EventKind::Exported, record, .. } if record.id == id),
        );
    }

    pub(crate) fn failed(&mut self, device: DeviceId, requested_bytes: u64) {
        if !self.enabled {
            return;
        }
        let d = self.device(device);
        d.counters.failed_allocations += 1;
        d.last_failure = Some((OffsetDateTime::now_utc(), requested_bytes));
    }

    pub(crate) fn transferred(&mut self, from: DeviceId, to: DeviceId, bytes: u64) {
        if !self.enabled {
            return;
        }
        let s = self.device(from);
        s.counters.transfers += 1;
        s.counters.transfer_out_bytes += bytes;
        self.device(to).counters.transfer_in_bytes += bytes;
    }

    pub(crate) fn defragmented(&mut self, device: DeviceId, moved_bytes: u64, released_bytes: u64) {
        if !self.enabled {
            return;
        }
        let d = self.device(device);
        d.counters.defrag_runs += 1;
        d.counters.defrag_moved_bytes += moved_bytes;
        d.counters.defrag_released_bytes += released_bytes;
    }
}

/// What the recorder reads out; the service asks under the ledger's lock.
impl Recorder {
    /// Whether the service records counters and events (`analytics.enabled`).
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// A device's counters, live bytes, peak and last failure (zeros before its first event).
    pub(crate) fn device_record(&self, device: DeviceId) -> DeviceRecord {
        self.devices.iter().find(|(d, _)| *d == device).map(|(_, r)| *r).unwrap_or_default()
    }

    /// The event log, oldest first: only `device`'s when given, only events at or after `since`.
    /// `allocated` entries get their record from the ledger's `records` (live) or their `freed`
    /// entry.
    pub(crate) fn events(
        &self,
        records: &LiveSet,
        device: Option<DeviceId>,
        since: Option<OffsetDateTime>,
    ) -> Vec<AllocationEvent> {
        let since_ns = since.map(|s| (s.unix_timestamp_nanos()) as i64);
        let log = &self.log;
        let freed: HashMap<u128, &Allocation> = log
            .iter()
            .filter_map(|e| match e {
                Stored::Record { kind: EventKind::Freed, record, .. } => {
                    Some((super::live::uuid_of(&record.id), record))
                }
                _ => None,
            })
            .collect();
        log.iter()
            .filter(|e| device.is_none_or(|d| e.device() == d) && since_ns.is_none_or(|s| e.at_ns() >= s))
            .map(|e| match e {
                Stored::Record { at_ns, kind, record } => {
                    AllocationEvent { at_unix_ns: *at_ns, kind: *kind, record: record.clone() }
                }
                Stored::Allocated { at_ns, uuid, device, kind, size_bytes } => {
                    let bits = (u128::from(uuid[0]) << 64) | u128::from(uuid[1]);
                    let id = uuid::Uuid::from_u128(bits).to_string();
                    let record = records.get(&id).or_else(|| freed.get(&bits).copied()).cloned().unwrap_or_else(|| {
                        // Not reachable while frees are logged after their allocation; kept
                        // total rather than trusted.
                        Arc::new(AllocationRecord {
                            id,
                            device: *device,
                            kind: *kind,
                            size_bytes: *size_bytes,
                            allocated_bytes: *size_bytes,
                            alignment_bytes: 0,
                            address: None,
                            placement: None,
                            purpose: None,
                            owner: None,
                            owner_pid: None,
                            owner_client: None,
                            persistent: false,
                            movable: false,
                            exported: false,
                            generation: 0,
                            allocated_at: OffsetDateTime::UNIX_EPOCH,
                        })
                    });
                    AllocationEvent { at_unix_ns: *at_ns, kind: EventKind::Allocated, record }
                }
            })
            .collect()
    }

    /// The log's capacity, the time of its oldest event, and of the newest event it dropped
    /// (a window that starts before that is incomplete).
    pub(crate) fn extent(&self) -> (usize, Option<OffsetDateTime>, Option<OffsetDateTime>) {
        let at = |ns: i64| OffsetDateTime::from_unix_timestamp_nanos(ns as i128).ok();
        (self.log.capacity(), self.log.first().and_then(|e| at(e.at_ns())), self.dropped_at_ns.and_then(at))
    }

    /// Starts every device's live-bytes peak over from its current value.
    pub(crate) fn reset_live_peaks(&mut self, at: OffsetDateTime) {
        for (_, d) in self.devices.iter_mut() {
            d.peak_live.reset(d.live_bytes, ms(at));
        }
    }
}
