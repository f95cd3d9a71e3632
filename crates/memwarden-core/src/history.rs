//! Measured history: bounded ring buffers at two resolutions, per-device counters and peaks,
//! and the statistics analytics computes over them (percentiles, size histograms, time per
//! pressure level, rates, leak suspects). Pure: the daemon feeds it samples and events it
//! measured; nothing here reads a clock or the OS.

/// A ring buffer of at most `capacity` items: pushing onto a full one replaces the oldest in
/// place and returns it. (Written out rather than a `VecDeque`: once full, a push is one slot
/// overwrite, which matters on the allocation path that feeds the event log.)
#[derive(Debug, Clone, PartialEq)]
pub struct Ring<T> {
    items: Vec<T>,
    /// Index of the oldest item once full (0 until then).
    head: usize,
    capacity: usize,
}

impl<T> Ring<T> {
    pub fn new(capacity: usize) -> Self {
        Ring { items: Vec::new(), head: 0, capacity: capacity.max(1) }
    }

    /// Appends `item`; returns the dropped oldest item when the ring was full.
    #[inline]
    pub fn push(&mut self, item: T) -> Option<T> {
        if self.items.len() < self.capacity {
            self.items.push(item);
            return None;
        }
        let old = std::mem::replace(&mut self.items[self.head], item);
        self.head = if self.head + 1 == self.capacity { 0 } else { self.head + 1 };
        Some(old)
    }

    /// Appends `item`; when the ring is full, first shows the oldest to `evicted`, then
    /// overwrites it in place (no copy of it leaves the ring).
    #[inline]
    pub fn push_with(&mut self, item: T, evicted: impl FnOnce(&T)) {
        if self.items.len() < self.capacity {
            self.items.push(item);
            return;
        }
        evicted(&self.items[self.head]);
        self.items[self.head] = item;
        self.head = if self.head + 1 == self.capacity { 0 } else { self.head + 1 };
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &T> {
        let (newer, older) = self.items.split_at(self.head);
        older.iter().chain(newer.iter())
    }

    pub fn last(&self) -> Option<&T> {
        self.iter().next_back()
    }

    pub fn first(&self) -> Option<&T> {
        self.iter().next()
    }

    /// Removes the newest item for which `f` holds (searching from the back).
    pub fn remove_last_where(&mut self, f: impl Fn(&T) -> bool) -> Option<T> {
        let n = self.items.len();
        let pos = n - 1 - self.iter().rev().position(f)?;
        // Back to insertion order, remove, and start over with the oldest at index 0.
        self.items.rotate_left(self.head);
        self.head = 0;
        let removed = self.items.remove(pos);
        debug_assert_eq!(self.items.len(), n - 1);
        Some(removed)
    }
}

/// Pressure levels as numbers, for time-per-level bookkeeping: 0 low … 3 critical.
pub const LEVELS: usize = 4;

/// One device at one point of the history. A fine point is one sample; a coarse point
/// aggregates the fine samples of its interval (means, maxima, time per level, and the
/// counters as they stood at its end).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Point {
    /// End of the interval, Unix milliseconds.
    pub at_ms: i64,
    /// Length of the interval it covers, milliseconds.
    pub span_ms: u64,
    /// Used bytes (OS or driver): the sample, or the interval's mean.
    pub used_bytes: u64,
    /// Highest used bytes seen in the interval.
    pub used_max_bytes: u64,
    pub available_bytes: u64,
    pub total_bytes: u64,
    /// Bytes memwarden's pools hold from the OS or driver.
    pub pool_reserved_bytes: u64,
    /// Bytes handed out to live memwarden allocations.
    pub pool_allocated_bytes: u64,
    /// Bytes promised to reservations.
    pub reservation_bytes: u64,
    /// Bytes of the models on this device, as their holders report them.
    pub model_bytes: u64,
    pub fragmentation: f64,
    /// Highest pressure level in the interval (0 low … 3 critical).
    pub level: u8,
    /// Milliseconds spent at each level in the interval.
    pub level_ms: [u64; LEVELS],
    /// Counters at the end of the interval.
    pub counters: Counters,
}

/// Cumulative per-device counters (since the daemon started). Differences between two points
/// give the activity between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Allocations made, reservations included.
    pub allocations: u64,
    /// Of `allocations`, the reservations: budget only, no memory committed.
    pub reservations: u64,
    /// Bytes committed by allocations (reservations commit none).
    pub allocated_bytes: u64,
    pub frees: u64,
    pub freed_bytes: u64,
    /// Of `frees`, those of allocations whose owner process exited, and their bytes.
    pub reclaims: u64,
    pub reclaimed_bytes: u64,
    pub failed_allocations: u64,
    pub moves: u64,
    pub exports: u64,
    pub transfers: u64,
    /// Bytes copied out of this device's allocations, and into them.
    pub transfer_out_bytes: u64,
    pub transfer_in_bytes: u64,
    pub defrag_runs: u64,
    pub defrag_moved_bytes: u64,
    pub defrag_released_bytes: u64,
}

impl Counters {
    /// Mean bytes of the allocations that commit memory (reservations left out); 0 without any.
    pub fn average_allocation_bytes(&self) -> u64 {
        self.allocated_bytes.checked_div(self.allocations.saturating_sub(self.reservations)).unwrap_or(0)
    }

    /// Activity between `earlier` and `self` (saturating, so a reset never goes negative).
    pub fn since(&self, earlier: &Counters) -> Counters {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Counters {
            allocations: d(self.allocations, earlier.allocations),
            reservations: d(self.reservations, earlier.reservations),
            allocated_bytes: d(self.allocated_bytes, earlier.allocated_bytes),
            frees: d(self.frees, earlier.frees),
            freed_bytes: d(self.freed_bytes, earlier.freed_bytes),
            reclaims: d(self.reclaims, earlier.reclaims),
            reclaimed_bytes: d(self.reclaimed_bytes, earlier.reclaimed_bytes),
            failed_allocations: d(self.failed_allocations, earlier.failed_allocations),
            moves: d(self.moves, earlier.moves),
            exports: d(self.exports, earlier.exports),
            transfers: d(self.transfers, earlier.transfers),
            transfer_out_bytes: d(self.transfer_out_bytes, earlier.transfer_out_bytes),
            transfer_in_bytes: d(self.transfer_in_bytes, earlier.transfer_in_bytes),
            defrag_runs: d(self.defrag_runs, earlier.defrag_runs),
            defrag_moved_bytes: d(self.defrag_moved_bytes, earlier.defrag_moved_bytes),
            defrag_released_bytes: d(self.defrag_released_bytes, earlier.defrag_released_bytes),
        }
    }
}

/// A highest value and when it was seen; `reset` starts over from the current value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Peak {
    pub value: u64,
    pub at_ms: i64,
    /// When tracking (re)started.
    pub since_ms: i64,
}

impl Peak {
    pub fn observe(&mut self, value: u64, at_ms: i64) {
        if value > self.value || self.at_ms == 0 {
            self.value = self.value.max(value);
            self.at_ms = at_ms;
        }
    }

    pub fn reset(&mut self, current: u64, at_ms: i64) {
        *self = Peak { value: current, at_ms, since_ms: at_ms };
    }
}

/// Resolutions and lengths of a device's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    /// Interval of fine points, milliseconds (1 s by default).
    pub fine_ms: u64,
    /// Number of fine points kept (3600: an hour at 1 s).
    pub fine_points: usize,
    /// Interval of coarse points, milliseconds (60 s by default).
    pub coarse_ms: u64,
    /// Number of coarse points kept (1440: a day at 1 min).
    pub coarse_points: usize,
}

impl Default for Resolution {
    fn default() -> Self {
        Resolution { fine_ms: 1000, fine_points: 3600, coarse_ms: 60_000, coarse_points: 1440 }
    }
}

impl Resolution {
    /// How far back the fine points reach, milliseconds.
    pub fn fine_span_ms(&self) -> u64 {
        self.fine_ms * self.fine_points as u64
    }

    pub fn coarse_span_ms(&self) -> u64 {
        self.coarse_ms * self.coarse_points as u64
    }
}

/// One device's history: fine points, and coarse points built from them.
#[derive(Debug, Clone)]
pub struct Series {
    pub resolution: Resolution,
    fine: Ring<Point>,
    coarse: Ring<Point>,
    /// The coarse point being built, and how many fine points went into it.
    building: Option<(Point, u64)>,
}

impl Series {
    pub fn new(resolution: Resolution) -> Self {
        Series {
            resolution,
            fine: Ring::new(resolution.fine_points),
            coarse: Ring::new(resolution.coarse_points),
            building: None,
        }
    }

    /// Records one sample (a fine point with `span_ms` = time since the previous sample).
    pub fn record(&mut self, p: Point) {
        let bucket = |at_ms: i64| at_ms.div_euclid(self.resolution.coarse_ms.max(1) as i64);
        if let Some((c, _)) = &self.building {
            if bucket(c.at_ms) != bucket(p.at_ms) {
                if let Some((done, _)) = self.building.take() {
                    self.coarse.push(done);
                }
            }
        }
        self.building = Some(match self.building.take() {
            None => (p, 1),
            Some((mut c, n)) => {
                // Running means; maxima; sums of time; the counters as of the newest sample.
                let mean = |a: u64, b: u64| ((a as u128 * n as u128 + b as u128) / (n as u128 + 1)) as u64;
                c.used_bytes = mean(c.used_bytes, p.used_bytes);
                c.available_bytes = mean(c.available_bytes, p.available_bytes);
                c.pool_reserved_bytes = mean(c.pool_reserved_bytes, p.pool_reserved_bytes);
                c.pool_allocated_bytes = mean(c.pool_allocated_bytes, p.pool_allocated_bytes);
                c.reservation_bytes = mean(c.reservation_bytes, p.reservation_bytes);
                c.model_bytes = mean(c.model_bytes, p.model_bytes);
                c.fragmentation = (c.fragmentation * n as f64 + p.fragmentation) / (n as f64 + 1.0);
                c.used_max_bytes = c.used_max_bytes.max(p.used_max_bytes);
                c.total_bytes = p.total_bytes;
                c.level = c.level.max(p.level);
                for (a, b) in c.level_ms.iter_mut().zip(p.level_ms) {
                    *a += b;
                }
                c.span_ms += p.span_ms;
                c.at_ms = p.at_ms;
                c.counters = p.counters;
                (c, n + 1)
            }
        });
        self.fine.push(p);
    }

    pub fn latest(&self) -> Option<&Point> {
        self.fine.last()
    }

    pub fn fine_len(&self) -> usize {
        self.fine.len()
    }

    pub fn coarse_len(&self) -> usize {
        self.coarse.len()
    }

    /// The points ending in `(now_ms - window_ms, now_ms]`, at the finest resolution that
    /// covers the window, and that resolution. Fine points serve windows they reach back over;
    /// longer windows get coarse points (plus the one being built).
    pub fn window(&self, window_ms: u64, now_ms: i64) -> (u64, Vec<Point>) {
        let start = now_ms - window_ms as i64;
        // Fine points serve while they hold the whole history (the ring never dropped one), or
        // when they reach back to the window's start.
        let holds_all = self.fine.len() < self.fine.capacity();
        let reaches = self.fine.first().is_some_and(|p| p.at_ms - p.span_ms as i64 <= start);
        if holds_all || (window_ms <= self.resolution.fine_span_ms() && reaches) {
            let pts = self.fine.iter().filter(|p| p.at_ms > start && p.at_ms <= now_ms).copied().collect();
            return (self.resolution.fine_ms, pts);
        }
        let mut pts: Vec<Point> =
            self.coarse.iter().filter(|p| p.at_ms > start && p.at_ms <= now_ms).copied().collect();
        if let Some((c, _)) = &self.building {
            if c.at_ms > start && c.at_ms <= now_ms {
                pts.push(*c);
            }
        }
        (self.resolution.coarse_ms, pts)
    }

    /// The newest point at or before `at_ms` (the counters' baseline for a window).
    pub fn at_or_before(&self, at_ms: i64) -> Option<Point> {
        let fine = self.fine.iter().rev().find(|p| p.at_ms <= at_ms).copied();
        if fine.is_some() && self.fine.first().is_some_and(|f| f.at_ms <= at_ms) {
            return fine;
        }
        self.coarse.iter().rev().find(|p| p.at_ms <= at_ms).copied().or(fine)
    }
}

/// Nearest-rank percentile (`q` in 0–100) of `values`; `None` when empty.
pub fn percentile(values: &[u64], q: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((q.clamp(0.0, 100.0) / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// Milliseconds spent at each pressure level over the points.
pub fn time_per_level(points: &[Point]) -> [u64; LEVELS] {
    let mut t = [0; LEVELS];
    for p in points {
        for (a, b) in t.iter_mut().zip(p.level_ms) {
            *a += b;
        }
    }
    t
}

/// One bucket of a power-of-two size histogram: sizes in `[min_bytes, max_bytes]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeBucket {
    pub min_bytes: u64,
    pub max_bytes: u64,
    pub count: u64,
    pub bytes: u64,
}

/// Histogram of sizes in power-of-two buckets (`[2^k, 2^(k+1) - 1]`; 0 goes with 1), smallest
/// first, empty buckets left out.
pub fn size_histogram(sizes: impl IntoIterator<Item = u64>) -> Vec<SizeBucket> {
    let mut buckets = [(0u64, 0u64); 64];
    for s in sizes {
        let k = 63 - s.max(1).leading_zeros() as usize;
        buckets[k].0 += 1;
        buckets[k].1 += s;
    }
    buckets
        .iter()
        .enumerate()
        .filter(|(_, (n, _))| *n > 0)
        .map(|(k, &(count, bytes))| SizeBucket {
            min_bytes: 1 << k,
            max_bytes: if k == 63 { u64::MAX } else { (1u64 << (k + 1)) - 1 },
            count,
            bytes,
        })
        .collect()
}

/// Totals per key, largest first (ties by key), at most `n`.
pub fn top_by_bytes<K: Ord + Clone>(items: impl IntoIterator<Item = (K, u64)>, n: usize) -> Vec<(K, u64, u64)> {
    let mut totals: std::collections::BTreeMap<K, (u64, u64)> = std::collections::BTreeMap::new();
    for (k, bytes) in items {
        let e = totals.entry(k).or_default();
        e.0 += bytes;
        e.1 += 1;
    }
    let mut v: Vec<(K, u64, u64)> = totals.into_iter().map(|(k, (b, c))| (k, b, c)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// A live allocation, as leak detection sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveAllocation {
    pub id: String,
    pub device: String,
    pub size_bytes: u64,
    pub owner: Option<String>,
    pub purpose: Option<String>,
    pub persistent: bool,
    pub age_secs: f64,
}

/// What an owner last did and whether it still exists.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OwnerActivity {
    /// Seconds since its last allocation or free (`None`: none recorded).
    pub idle_secs: Option<f64>,
    /// The owner names a process (`pid:N`) that no longer runs.
    pub gone: bool,
}

/// Why an allocation is a leak suspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakReason {
    /// Its owner names a process that has exited.
    OwnerGone,
    /// Its owner has not allocated or freed anything for the idle threshold.
    OwnerIdle,
    /// It has no owner to ask.
    NoOwner,
}

impl LeakReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LeakReason::OwnerGone => "ownerGone",
            LeakReason::OwnerIdle => "ownerIdle",
            LeakReason::NoOwner => "noOwner",
        }
    }
}

/// Leak suspects: non-persistent allocations at least `min_age_secs` old whose owner is gone,
/// idle for `idle_secs`, or unnamed. Oldest first.
pub fn leak_suspects(
    live: &[LiveAllocation],
    activity: impl Fn(&str) -> OwnerActivity,
    min_age_secs: f64,
    idle_secs: f64,
) -> Vec<(&LiveAllocation, LeakReason)> {
    let mut v: Vec<_> = live
        .iter()
        .filter(|a| !a.persistent && a.age_secs >= min_age_secs)
        .filter_map(|a| {
            let reason = match &a.owner {
                None => LeakReason::NoOwner,
                Some(o) => {
                    let act = activity(o);
                    if act.gone {
                        LeakReason::OwnerGone
                    } else if act.idle_secs.is_none_or(|s| s >= idle_secs) {
                        LeakReason::OwnerIdle
                    } else {
                        return None;
                    }
                }
            };
            Some((a, reason))
        })
        .collect();
    v.sort_by(|a, b| b.0.age_secs.total_cmp(&a.0.age_secs).then_with(|| a.0.id.cmp(&b.0.id)));
    v
}

/// The pid an owner string names (`pid:1234` or `pid-1234`), if any.
pub fn owner_pid(owner: &str) -> Option<u32> {
    owner.strip_prefix("pid:").or_else(|| owner.strip_prefix("pid-")).and_then(|p| p.parse().ok())
}

/// Parses a window such as `90s`, `15m`, `1h`, `1d` (or bare seconds) into milliseconds.
pub fn parse_window_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{text}' is not a window such as 30s, 15m, 1h or 1d"))?;
    let scale = match unit {
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("'{text}': unit must be s, m, h or d")),
    };
    match n.checked_mul(scale) {
        Some(0) => Err(format!("'{text}': the window must be longer than 0")),
        Some(ms) => Ok(ms),
        None => Err(format!("'{text}' is too long")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::MIB;

    fn point(at_ms: i64, used: u64, level: u8) -> Point {
        let mut level_ms = [0; LEVELS];
        level_ms[level as usize] = 1000;
        Point {
            at_ms,
            span_ms: 1000,
            used_bytes: used,
            used_max_bytes: used,
            total_bytes: 1000,
            level,
            level_ms,
            ..Point::default()
        }
    }

    #[test]
    fn ring_keeps_the_newest_capacity_items() {
        let mut r = Ring::new(3);
        assert_eq!(r.push(1), None);
        r.push(2);
        r.push(3);
        assert_eq!(r.push(4), Some(1));
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!((r.first(), r.last()), (Some(&2), Some(&4)));
        assert_eq!(r.remove_last_where(|x| *x == 3), Some(3));
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), vec![2, 4]);
        // Not full any more: the next push appends without dropping.
        assert_eq!(r.push(5), None);
        assert_eq!(r.push(6), Some(2));
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), vec![4, 5, 6]);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn coarse_points_aggregate_their_minute() {
        let res = Resolution { fine_ms: 1000, fine_points: 5, coarse_ms: 10_000, coarse_points: 10 };
        let mut s = Series::new(res);
        // 10 samples in [0, 10 s): used 100..=1000, level 2 for the last 3.
        for i in 0..10 {
            s.record(point(i * 1000, (i as u64 + 1) * 100, if i >= 7 { 2 } else { 0 }));
        }
        // The next bucket's first sample closes the first coarse point.
        s.record(point(10_000, 50, 0));
        assert_eq!(s.fine_len(), 5, "fine ring is bounded");
        assert_eq!(s.coarse_len(), 1);
        let (res_ms, pts) = s.window(60_000, 10_000);
        assert_eq!(res_ms, 10_000, "a window longer than the fine span uses coarse points");
        let c = pts[0];
        assert_eq!(c.used_bytes, 550, "mean of 100..=1000");
        assert_eq!(c.used_max_bytes, 1000);
        assert_eq!(c.level, 2);
        assert_eq!(c.level_ms, [7000, 0, 3000, 0]);
        assert_eq!(c.span_ms, 10_000);
        assert_eq!(pts.len(), 2, "the coarse point being built is included");
    }

    #[test]
    fn short_windows_use_fine_points() {
        let mut s = Series::new(Resolution::default());
        for i in 1..=120 {
            s.record(point(i * 1000, i as u64, 0));
        }
        let (res, pts) = s.window(30_000, 120_000);
        assert_eq!(res, 1000);
        assert_eq!(pts.len(), 30);
        assert_eq!(pts[0].used_bytes, 91);
        assert_eq!(s.at_or_before(60_500).map(|p| p.at_ms), Some(60_000));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 95.0), Some(95));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn histogram_buckets_by_power_of_two() {
        let h = size_histogram([1, 3, 4, 7, 8, MIB, MIB + 5]);
        let got: Vec<_> = h.iter().map(|b| (b.min_bytes, b.count)).collect();
        assert_eq!(got, vec![(1, 1), (2, 1), (4, 2), (8, 1), (MIB, 2)]);
        assert_eq!(h[4].bytes, 2 * MIB + 5);
        assert_eq!(h[2].max_bytes, 7);
    }

    #[test]
    fn top_sums_per_key() {
        let t = top_by_bytes([("a", 10), ("b", 30), ("a", 25), ("c", 1)], 2);
        assert_eq!(t, vec![("a", 35, 2), ("b", 30, 1)]);
    }

    #[test]
    fn peaks_reset_to_the_current_value() {
        let mut p = Peak::default();
        p.observe(5, 1);
        p.observe(9, 2);
        p.observe(3, 3);
        assert_eq!((p.value, p.at_ms), (9, 2));
        p.reset(3, 4);
        assert_eq!((p.value, p.at_ms, p.since_ms), (3, 4, 4));
        p.observe(4, 5);
        assert_eq!(p.value, 4);
    }

    #[test]
    fn leak_suspects_need_age_and_a_silent_owner() {
        let a = |id: &str, owner: Option<&str>, persistent: bool, age: f64| LiveAllocation {
            id: id.into(),
            device: "cpu".into(),
            size_bytes: 1,
            owner: owner.map(str::to_string),
            purpose: None,
            persistent,
            age_secs: age,
        };
        let live = vec![
            a("young", None, false, 10.0),
            a("kept", None, true, 1e6),
            a("busy", Some("svc"), false, 1e4),
            a("idle", Some("old"), false, 2e4),
            a("gone", Some("pid:1"), false, 1e4),
            a("anon", None, false, 3e4),
        ];
        let activity = |o: &str| match o {
            "svc" => OwnerActivity { idle_secs: Some(5.0), gone: false },
            "old" => OwnerActivity { idle_secs: Some(5000.0), gone: false },
            _ => OwnerActivity { idle_secs: Some(1.0), gone: true },
        };
        let s = leak_suspects(&live, activity, 600.0, 600.0);
        let got: Vec<_> = s.iter().map(|(a, r)| (a.id.as_str(), *r)).collect();
        assert_eq!(
            got,
            vec![("anon", LeakReason::NoOwner), ("idle", LeakReason::OwnerIdle), ("gone", LeakReason::OwnerGone)]
        );
    }

    #[test]
    fn windows_parse_with_units() {
        assert_eq!(parse_window_ms("1h"), Ok(3_600_000));
        assert_eq!(parse_window_ms("90s"), Ok(90_000));
        assert_eq!(parse_window_ms("15m"), Ok(900_000));
        assert_eq!(parse_window_ms("2d"), Ok(172_800_000));
        assert_eq!(parse_window_ms("45"), Ok(45_000));
        assert!(parse_window_ms("0m").is_err());
        assert!(parse_window_ms("1w").is_err());
        assert!(parse_window_ms("h").is_err());
        assert!(parse_window_ms("99999999999999999999d").is_err());
        assert_eq!(owner_pid("pid:42"), Some(42));
        assert_eq!(owner_pid("svc"), None);
    }

    #[test]
    fn a_point_stays_small() {
        // The documented footprint (docs/API.md): 3600 + 1440 points per device at the defaults.
        assert!(std::mem::size_of::<Point>() <= 256, "{}", std::mem::size_of::<Point>());
    }

    #[test]
    fn counters_subtract_saturating() {
        let a = Counters { allocations: 5, allocated_bytes: 500, ..Counters::default() };
        let b = Counters { allocations: 8, allocated_bytes: 900, frees: 2, ..Counters::default() };
        let d = b.since(&a);
        assert_eq!((d.allocations, d.allocated_bytes, d.frees), (3, 400, 2));
        let c = Counters { allocations: 5, reservations: 1, allocated_bytes: 400, ..Counters::default() };
        assert_eq!(c.average_allocation_bytes(), 100, "the reservation neither counts nor weighs");
        assert_eq!(Counters { allocations: 2, reservations: 2, ..Counters::default() }.average_allocation_bytes(), 0);
        assert_eq!(a.since(&b).allocations, 0);
    }
}
