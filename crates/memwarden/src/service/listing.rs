//! Listing live allocations a page at a time, in one stable order: oldest first (`allocated_at`,
//! then id). A page resumes after a [`ListPosition`] (the last allocation the previous page
//! showed) rather than at an index, so paging while allocations come and go never repeats or
//! skips one that lives throughout: neither key of a live allocation ever changes.
//!
//! A page costs one pass over the ledger (the filtered set's count and bytes need it anyway)
//! keeping the `limit` oldest matches after the position in a bounded heap: no copy or sort of
//! every record, and only the page's records are shared out.

use super::live::LiveSet;
use super::{Allocation, AllocationRecord};
use memwarden_core::{DeviceId, MemoryKind};
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use time::OffsetDateTime;

/// Which live allocations a listing shows; a `None` field matches every allocation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AllocationFilter {
    pub device: Option<DeviceId>,
    pub kind: Option<MemoryKind>,
    /// Exact, case-sensitive; allocations without an owner never match.
    pub owner: Option<String>,
    /// Exact, case-sensitive; allocations without a purpose never match.
    pub purpose: Option<String>,
}

impl AllocationFilter {
    pub fn matches(&self, r: &AllocationRecord) -> bool {
        self.device.is_none_or(|d| r.device == d)
            && self.kind.is_none_or(|k| r.kind == k)
            && self.owner.as_ref().is_none_or(|o| r.owner.as_ref() == Some(o))
            && self.purpose.as_ref().is_none_or(|p| r.purpose.as_ref() == Some(p))
    }
}

/// A place in the listing order: the allocation a page ended with. It stays a valid place after
/// that allocation is freed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPosition {
    pub allocated_at: OffsetDateTime,
    pub id: String,
}

impl ListPosition {
    pub fn of(r: &AllocationRecord) -> Self {
        ListPosition { allocated_at: r.allocated_at, id: r.id.clone() }
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocationPage {
    /// Up to `limit` matching allocations after the position, oldest first.
    pub allocations: Vec<Allocation>,
    /// Every matching allocation, on this page or any other.
    pub count: usize,
    /// The `size_bytes` of every matching allocation.
    pub total_bytes: u64,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<ListPosition>,
}

/// A record ranked in listing order, for the heap of the page being gathered. Its time is read
/// once, as Unix nanoseconds: comparing `OffsetDateTime`s decodes their dates each time, and
/// the heap compares the same records many times.
struct Ranked<'a> {
    at_ns: i128,
    record: &'a Allocation,
}

impl<'a> Ranked<'a> {
    fn new(record: &'a Allocation) -> Self {
        Ranked { at_ns: record.allocated_at.unix_timestamp_nanos(), record }
    }

    fn key(&self) -> (i128, &str) {
        (self.at_ns, self.record.id.as_str())
    }
}

impl Ord for Ranked<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for Ranked<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Ranked<'_> {}

impl LiveSet {
    /// The live allocations that match `filter` and come after `after` (from the first without
    /// it), at most `limit` (at least 1) of them, with the count and bytes of all that match.
    pub(super) fn page(&self, filter: &AllocationFilter, after: Option<&ListPosition>, limit: usize) -> AllocationPage {
        let limit = limit.max(1);
        let after = after.map(|p| (p.allocated_at.unix_timestamp_nanos(), p.id.as_str()));
        let (page, count, total_bytes, remaining) = {
            let (mut count, mut total_bytes, mut remaining) = (0, 0, 0);
            // A max-heap of the `limit` oldest seen so far: its top is the first to give way.
            let mut oldest: BinaryHeap<Ranked<'_>> = BinaryHeap::with_capacity(limit.min(self.len()));
            for r in self.values() {
                if !filter.matches(r) {
                    continue;
                }
                count += 1;
                total_bytes += r.size_bytes;
                let ranked = Ranked::new(r);
                if after.is_some_and(|p| ranked.key() <= p) {
                    continue;
                }
                remaining += 1;
                if oldest.len() < limit {
                    oldest.push(ranked);
                } else if let Some(mut top) = oldest.peek_mut() {
                    if ranked < *top {
                        *top = ranked;
                    }
                }
            }
            let page: Vec<Allocation> = oldest.into_sorted_vec().into_iter().map(|r| r.record.clone()).collect();
            (page, count, total_bytes, remaining)
        };
        let next = page.last().filter(|_| remaining > page.len()).map(|r| ListPosition::of(r));
        AllocationPage { allocations: page, count, total_bytes, next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{AllocationRecord, Limits, Service};
    use memwarden_core::PoolConfig;
    use std::sync::Arc;

    /// A service whose ledger holds `n` records made up here: only 7 distinct allocation times
    /// (so the order mostly rests on the ids), two kinds, three owners, four purposes.
    fn ledger_of(n: usize) -> Service {
        let s = Service::with_backends(Vec::new(), PoolConfig::default(), Limits::default());
        let mut ledger = s.ledger.lock();
        for i in 0..n {
            let record = AllocationRecord {
                id: uuid::Uuid::new_v4().to_string(),
                device: DeviceId::Cpu,
                kind: if i % 3 == 0 { MemoryKind::Reservation } else { MemoryKind::Host },
                size_bytes: 256 * (i as u64 + 1),
                allocated_bytes: 256 * (i as u64 + 1),
                alignment_bytes: 256,
                address: None,
                placement: None,
                purpose: ["a", "b", "c"].get(i % 4).map(|p| p.to_string()),
                owner: ["x", "y"].get(i % 3).map(|o| o.to_string()),
                owner_pid: None,
                owner_client: None,
                persistent: false,
                movable: true,
                exported: false,
                generation: 0,
                allocated_at: OffsetDateTime::UNIX_EPOCH + time::Duration::nanoseconds((i % 7) as i64 * 1000),
            };
            ledger.records.insert(Arc::new(record), 0);
        }
        drop(ledger);
        s
    }

    fn expected(s: &Service, filter: &AllocationFilter) -> Vec<String> {
        let mut all: Vec<Allocation> =
            s.ledger.lock().records.values().filter(|r| filter.matches(r)).cloned().collect();
        all.sort_by(|a, b| (a.allocated_at, &a.id).cmp(&(b.allocated_at, &b.id)));
        all.iter().map(|r| r.id.clone()).collect()
    }

    #[test]
    fn pages_add_up_to_the_sorted_filtered_listing() {
        let s = ledger_of(500);
        let filters = [
            AllocationFilter::default(),
            AllocationFilter { kind: Some(MemoryKind::Host), ..AllocationFilter::default() },
            AllocationFilter { owner: Some("y".into()), purpose: Some("b".into()), ..AllocationFilter::default() },
            AllocationFilter { device: Some(DeviceId::cuda(0)), ..AllocationFilter::default() },
            AllocationFilter { owner: Some("nobody".into()), ..AllocationFilter::default() },
        ];
        for filter in &filters {
            let want = expected(&s, filter);
            let bytes: u64 = want.iter().map(|id| s.ledger.lock().records.get(id).expect("live").size_bytes).sum();
            for limit in [1, 7, 100, 499, 500, 10_000] {
                let (mut listed, mut after) = (Vec::new(), None);
                loop {
                    let page = s.allocation_page(filter, after.as_ref(), limit);
                    assert_eq!((page.count, page.total_bytes), (want.len(), bytes), "{filter:?}");
                    assert!(page.allocations.len() <= limit);
                    listed.extend(page.allocations.iter().map(|r| r.id.clone()));
                    match page.next {
                        Some(next) => after = Some(next),
                        None => break,
                    }
                }
                assert_eq!(listed, want, "{filter:?}, limit {limit}");
            }
        }
    }

    #[test]
    fn a_position_outlives_the_allocation_it_names() {
        let s = ledger_of(50);
        let want = expected(&s, &AllocationFilter::default());
        let every = AllocationFilter::default();
        let first = s.allocation_page(&every, None, 10);
        let next = first.next.expect("more");
        assert_eq!(next.id, want[9]);
        s.ledger.lock().records.remove(&want[9], 0);
        s.ledger.lock().records.remove(&want[10], 0);
        let second = s.allocation_page(&every, Some(&next), 10);
        let ids: Vec<&str> = second.allocations.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, want[11..21].iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(second.count, 48);
    }
}
