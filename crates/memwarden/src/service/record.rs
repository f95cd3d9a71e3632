//! What the service records as it works: per-device counters (allocations, frees, failures,
//! moves, exports, transfers, defragmentation), the live bytes and their resettable peak, and a
//! bounded allocation event log. It lives inside the ledger, so the hot path takes no extra
//! lock: an allocation or a free updates it under the ledger lock it already holds. Events are
//! stamped with the coarse wall clock (a few ns, 1–4 ms resolution) and share the ledger's
//! record (no copy); owners' last activity is derived from the log when asked, not kept on the
//! hot path. Benchmarked in `benches/service.rs` against recording off.

use super::{lock, Allocation, Service};
use memwarden_core::history::{Counters, Peak, Ring};
use memwarden_core::{DeviceId, MemoryKind};
use std::collections::HashMap;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Allocated,
    Freed,
    /// Moved by defragmentation (new address, same id).
    Moved,
    Exported,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Allocated => "allocated",
            EventKind::Freed => "freed",
            EventKind::Moved => "moved",
            EventKind::Exported => "exported",
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
    /// Bytes of live memwarden allocations (pool bytes; reservations by their size).
    pub live_bytes: u64,
    pub peak_live: Peak,
    /// The newest failed allocation: when, and the bytes it asked for.
    pub last_failure: Option<(OffsetDateTime, u64)>,
}

fn now_ns() -> i64 {
    memwarden_sys::coarse_unix_nanos()
}

pub(crate) struct Recorder {
    enabled: bool,
    log: Ring<AllocationEvent>,
    /// Time of the newest event the full log dropped (Unix ns; a window reaching before it is
    /// incomplete).
    dropped_at_ns: Option<i64>,
    devices: Vec<(DeviceId, DeviceRecord)>,
}

fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn held_bytes(r: &Allocation) -> u64 {
    if r.kind == MemoryKind::Reservation {
        r.size_bytes
    } else {
        r.allocated_bytes
    }
}

impl Recorder {
    pub(crate) fn new(enabled: bool, log_size: usize) -> Self {
        Recorder { enabled, log: Ring::new(log_size), dropped_at_ns: None, devices: Vec::new() }
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

    fn log(&mut self, e: AllocationEvent) {
        if let Some(old) = self.log.push(e) {
            self.dropped_at_ns = Some(old.at_unix_ns);
        }
    }

    /// `at`: the allocation's time, Unix nanoseconds.
    pub(crate) fn allocated(&mut self, r: &Allocation, at: i64) {
        if !self.enabled {
            return;
        }
        let bytes = held_bytes(r);
        let d = self.device(r.device);
        d.counters.allocations += 1;
        d.counters.allocated_bytes += bytes;
        d.live_bytes += bytes;
        if d.live_bytes > d.peak_live.value {
            d.peak_live.value = d.live_bytes;
            d.peak_live.at_ms = at / 1_000_000;
        }
        self.log(AllocationEvent { at_unix_ns: at, kind: EventKind::Allocated, record: r.clone() });
    }

    pub(crate) fn freed(&mut self, r: &Allocation) {
        if !self.enabled {
            return;
        }
        let bytes = held_bytes(r);
        let d = self.device(r.device);
        d.counters.frees += 1;
        d.counters.freed_bytes += bytes;
        d.live_bytes = d.live_bytes.saturating_sub(bytes);
        self.log(AllocationEvent { at_unix_ns: now_ns(), kind: EventKind::Freed, record: r.clone() });
    }

    /// Takes back a `freed` whose free failed (the allocation is live again).
    pub(crate) fn unfreed(&mut self, r: &Allocation) {
        if !self.enabled {
            return;
        }
        let bytes = held_bytes(r);
        let d = self.device(r.device);
        d.counters.frees = d.counters.frees.saturating_sub(1);
        d.counters.freed_bytes = d.counters.freed_bytes.saturating_sub(bytes);
        d.live_bytes += bytes;
        self.log.remove_last_where(|e| e.kind == EventKind::Freed && e.record.id == r.id);
    }

    pub(crate) fn moved(&mut self, r: &Allocation) {
        if !self.enabled {
            return;
        }
        self.device(r.device).counters.moves += 1;
        self.log(AllocationEvent { at_unix_ns: now_ns(), kind: EventKind::Moved, record: r.clone() });
    }

    pub(crate) fn exported(&mut self, r: &Allocation) {
        if !self.enabled {
            return;
        }
        self.device(r.device).counters.exports += 1;
        self.log(AllocationEvent { at_unix_ns: now_ns(), kind: EventKind::Exported, record: r.clone() });
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

impl Service {
    /// Whether the service records counters and events (`analytics.enabled`).
    pub fn recording(&self) -> bool {
        lock(&self.ledger).recorder.enabled
    }

    /// A device's counters, live bytes, peak and last failure (zeros before its first event).
    pub fn device_record(&self, device: DeviceId) -> DeviceRecord {
        let ledger = lock(&self.ledger);
        ledger.recorder.devices.iter().find(|(d, _)| *d == device).map(|(_, r)| *r).unwrap_or_default()
    }

    /// The event log, oldest first: only `device`'s when given, only events at or after `since`.
    pub fn allocation_events(&self, device: Option<DeviceId>, since: Option<OffsetDateTime>) -> Vec<AllocationEvent> {
        let ledger = lock(&self.ledger);
        ledger
            .recorder
            .log
            .iter()
            .filter(|e| device.is_none_or(|d| e.record.device == d) && since.is_none_or(|s| e.at() >= s))
            .cloned()
            .collect()
    }

    /// The log's capacity, the time of its oldest event, and of the newest event it dropped
    /// (a window that starts before that is incomplete).
    pub fn event_log_extent(&self) -> (usize, Option<OffsetDateTime>, Option<OffsetDateTime>) {
        let ledger = lock(&self.ledger);
        let r = &ledger.recorder;
        let at = |ns: i64| OffsetDateTime::from_unix_timestamp_nanos(ns as i128).ok();
        (r.log.capacity(), r.log.first().and_then(|e| at(e.at_unix_ns)), r.dropped_at_ns.and_then(at))
    }

    /// When each owner last allocated or freed, as far as the event log reaches back.
    pub fn owner_activity(&self) -> HashMap<String, OffsetDateTime> {
        let ledger = lock(&self.ledger);
        let mut out: HashMap<String, i64> = HashMap::new();
        for e in ledger.recorder.log.iter() {
            if let (Some(o), EventKind::Allocated | EventKind::Freed) = (&e.record.owner, e.kind) {
                let t = out.entry(o.clone()).or_default();
                *t = (*t).max(e.at_unix_ns);
            }
        }
        out.into_iter()
            .filter_map(|(o, ns)| Some((o, OffsetDateTime::from_unix_timestamp_nanos(ns as i128).ok()?)))
            .collect()
    }

    /// Starts every device's live-bytes peak over from its current value.
    pub fn reset_live_peaks(&self, at: OffsetDateTime) {
        let mut ledger = lock(&self.ledger);
        for (_, d) in ledger.recorder.devices.iter_mut() {
            d.peak_live.reset(d.live_bytes, ms(at));
        }
    }
}
