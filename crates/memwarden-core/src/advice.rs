//! Recommendations: rules over measured facts. Each rule looks for its evidence in the facts
//! the daemon measured (status, pools, pressure, models, the allocation ledger) and emits a
//! recommendation with the numbers that triggered it, the bytes it would save, and the action
//! that applies it; a rule without its evidence emits nothing. Pure: the API renders an
//! [`Action`] as the memwarden request that carries it out.

use crate::eviction::{self, Candidate};
use crate::pressure::Level;
use crate::units::MIB;

/// What the rules look at, per device.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceFacts {
    pub device: String,
    /// The product name (GPUs of one kind have the same name).
    pub name: String,
    pub is_gpu: bool,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub level: Level,
    /// Fragmentation index of memwarden's pools (0 – 1): the free-bytes-weighted mean of each
    /// pool's index (pools are separate address spaces).
    pub fragmentation: f64,
    /// Free bytes inside memwarden's pools, and the largest free range among them.
    pub free_in_pool_bytes: u64,
    pub largest_free_block_bytes: u64,
    /// Free bytes outside each pool's largest free range, summed over the pools: what
    /// compacting every pool makes contiguous.
    pub scattered_free_bytes: u64,
    /// Bytes in pool blocks that hold no allocation (what `clear` returns).
    pub empty_block_bytes: u64,
    /// The newest failed allocation: seconds ago, and the bytes it asked for.
    pub last_failure: Option<(f64, u64)>,
    /// Host only: bytes of live pinned (page-locked) allocations, and the largest one that may
    /// move (`id`, bytes).
    pub pinned_bytes: u64,
    pub largest_movable_pinned: Option<(String, u64)>,
    /// The models on this device (their `sizeBytes` is what they hold here).
    pub models: Vec<Candidate>,
}

impl DeviceFacts {
    pub fn utilization(&self) -> f64 {
        if self.total_bytes == 0 {
            0.0
        } else {
            self.used_bytes as f64 / self.total_bytes as f64
        }
    }
}

/// Where the rules draw their lines.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdviceThresholds {
    /// Fragmentation index at or above which a failed allocation calls for a defragmentation.
    pub fragmentation: f64,
    /// How long a failed allocation counts as recent, seconds.
    pub failure_recent_secs: f64,
    /// Idle time after which a model counts as idle, seconds.
    pub model_idle_secs: f64,
    /// Cached empty pool bytes worth a `clear` (at least this, or 1 % of the device).
    pub min_clear_bytes: u64,
    /// Pinned host bytes that count as large, as a fraction of host memory.
    pub pinned_fraction: f64,
    /// Difference in utilization between two devices of one kind that calls for a move.
    pub imbalance: f64,
}

impl Default for AdviceThresholds {
    fn default() -> Self {
        AdviceThresholds {
            fragmentation: 0.3,
            failure_recent_secs: 600.0,
            model_idle_secs: 300.0,
            min_clear_bytes: 64 * MIB,
            pinned_fraction: 0.1,
            imbalance: 0.3,
        }
    }
}

/// What a recommendation does, as a typed request.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `POST /api/memory/operations/defragment/{device}` with the strategy.
    Defragment { device: String, strategy: &'static str },
    /// `POST /api/memory/models/optimize` restricted to these models.
    Optimize { device: String, models: Vec<String>, min_memory_to_free: u64 },
    /// `POST /api/memory/operations/clear/{device}`.
    Clear { device: String },
    /// `POST /api/memory/transfer`: move an allocation into another memory kind on the host.
    MoveAllocation { allocation_id: String, target_device: String, target_memory_type: &'static str },
    /// `POST /api/memory/models/{id}/move` to another device.
    MoveModel { model_id: String, target_device: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    Low,
    Medium,
    High,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Medium => "medium",
            Priority::High => "high",
        }
    }
}

/// A number behind a recommendation.
#[derive(Debug, Clone, PartialEq)]
pub enum Evidence {
    Bytes(u64),
    Ratio(f64),
    Seconds(f64),
    Count(u64),
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Recommendation {
    /// `defragment`, `unloadIdleModels`, `clearCache`, `releasePinnedMemory`, `rebalanceModels`.
    pub kind: &'static str,
    pub priority: Priority,
    pub device: String,
    pub message: String,
    pub evidence: Vec<(&'static str, Evidence)>,
    pub estimated_savings_bytes: u64,
    pub action: Action,
}

fn pressured(level: Level) -> bool {
    level >= Level::High
}

/// Fragmented pools and a recent allocation that did not fit → defragment. A failed request
/// larger than the whole device could never have fitted, compacted or not: it is no evidence,
/// and emits nothing. One larger than the pools' free space is weaker evidence (medium).
pub fn defragment(d: &DeviceFacts, t: &AdviceThresholds) -> Option<Recommendation> {
    let (ago, requested) = d.last_failure?;
    if ago > t.failure_recent_secs || d.fragmentation < t.fragmentation || d.free_in_pool_bytes == 0 {
        return None;
    }
    if d.total_bytes > 0 && requested > d.total_bytes {
        return None;
    }
    let scattered = d.scattered_free_bytes.min(d.free_in_pool_bytes);
    let strategy = if d.fragmentation >= 0.6 { "thorough" } else { "balanced" };
    Some(Recommendation {
        kind: "defragment",
        priority: if requested <= d.free_in_pool_bytes { Priority::High } else { Priority::Medium },
        device: d.device.clone(),
        message: format!(
            "{}: pools {:.0} % fragmented and an allocation of {requested} bytes failed {ago:.0} s ago; \
             compacting makes {scattered} scattered free bytes contiguous",
            d.device,
            d.fragmentation * 100.0
        ),
        evidence: vec![
            ("fragmentation", Evidence::Ratio(d.fragmentation)),
            ("failedAllocationBytes", Evidence::Bytes(requested)),
            ("failedSecondsAgo", Evidence::Seconds(ago)),
            ("freeInPoolBytes", Evidence::Bytes(d.free_in_pool_bytes)),
            ("largestFreeBlockBytes", Evidence::Bytes(d.largest_free_block_bytes)),
        ],
        estimated_savings_bytes: scattered,
        action: Action::Defragment { device: d.device.clone(), strategy },
    })
}

/// Idle, unpinned models on a device under pressure (high or critical) → release them.
pub fn idle_models(d: &DeviceFacts, t: &AdviceThresholds) -> Option<Recommendation> {
    if !pressured(d.level) {
        return None;
    }
    // The eviction ranking (pinned models left out), narrowed to the idle ones: the same order
    // the optimizer would release them in.
    let idle: Vec<&Candidate> = eviction::rank(&d.models, &[])
        .into_iter()
        .filter(|m| m.size_bytes > 0 && m.idle_secs >= t.model_idle_secs)
        .collect();
    if idle.is_empty() {
        return None;
    }
    let longest_idle = idle.iter().map(|m| m.idle_secs).fold(0.0, f64::max);
    let bytes: u64 = idle.iter().map(|m| m.size_bytes).sum();
    let models: Vec<String> = idle.iter().map(|m| m.model_id.clone()).collect();
    Some(Recommendation {
        kind: "unloadIdleModels",
        priority: if d.level == Level::Critical { Priority::High } else { Priority::Medium },
        device: d.device.clone(),
        message: format!(
            "{} is at {} pressure ({:.0} % used); {} model(s) idle for {:.0} s or more hold {bytes} bytes",
            d.device,
            d.level.as_str(),
            d.utilization() * 100.0,
            models.len(),
            t.model_idle_secs
        ),
        evidence: vec![
            ("pressureLevel", Evidence::Text(d.level.as_str().into())),
            ("utilization", Evidence::Ratio(d.utilization())),
            ("idleModels", Evidence::Text(models.join(","))),
            ("idleModelBytes", Evidence::Bytes(bytes)),
            ("longestIdleSeconds", Evidence::Seconds(longest_idle)),
        ],
        estimated_savings_bytes: bytes,
        action: Action::Optimize { device: d.device.clone(), models, min_memory_to_free: bytes },
    })
}

/// Cached empty pool blocks worth giving back → clear. Under pressure any amount counts.
pub fn clear_cache(d: &DeviceFacts, t: &AdviceThresholds) -> Option<Recommendation> {
    let floor = t.min_clear_bytes.max(d.total_bytes / 100);
    if d.empty_block_bytes == 0 || (d.empty_block_bytes < floor && !pressured(d.level)) {
        return None;
    }
    Some(Recommendation {
        kind: "clearCache",
        priority: if pressured(d.level) { Priority::High } else { Priority::Low },
        device: d.device.clone(),
        message: format!(
            "{}: {} bytes of empty pool blocks are cached by memwarden; clearing returns them to the {}",
            d.device,
            d.empty_block_bytes,
            if d.is_gpu { "driver" } else { "OS" }
        ),
        evidence: vec![
            ("emptyBlockBytes", Evidence::Bytes(d.empty_block_bytes)),
            ("pressureLevel", Evidence::Text(d.level.as_str().into())),
        ],
        estimated_savings_bytes: d.empty_block_bytes,
        action: Action::Clear { device: d.device.clone() },
    })
}

/// Large pinned host memory while the host is under pressure (moderate or worse) → move the
/// largest movable pinned allocation to pageable memory (the kernel may then reclaim it).
pub fn pinned_host(d: &DeviceFacts, t: &AdviceThresholds) -> Option<Recommendation> {
    if d.is_gpu || d.level < Level::Moderate || d.total_bytes == 0 {
        return None;
    }
    let fraction = d.pinned_bytes as f64 / d.total_bytes as f64;
    if fraction < t.pinned_fraction {
        return None;
    }
    let (id, bytes) = d.largest_movable_pinned.clone()?;
    Some(Recommendation {
        kind: "releasePinnedMemory",
        priority: if pressured(d.level) { Priority::High } else { Priority::Medium },
        device: d.device.clone(),
        message: format!(
            "{} is at {} pressure and {:.0} % of it ({} bytes) is pinned, which the kernel cannot reclaim; \
             moving allocation {id} ({bytes} bytes) to pageable memory lets it",
            d.device,
            d.level.as_str(),
            fraction * 100.0,
            d.pinned_bytes
        ),
        evidence: vec![
            ("pinnedBytes", Evidence::Bytes(d.pinned_bytes)),
            ("pinnedFraction", Evidence::Ratio(fraction)),
            ("pressureLevel", Evidence::Text(d.level.as_str().into())),
            ("allocationBytes", Evidence::Bytes(bytes)),
        ],
        estimated_savings_bytes: bytes,
        action: Action::MoveAllocation {
            allocation_id: id,
            target_device: d.device.clone(),
            target_memory_type: "host",
        },
    })
}

/// A GPU much fuller than another of the same kind → move a model that fits to the emptier one
/// (the largest reloadable, unpinned model that brings the two closer without overshooting).
pub fn rebalance(devices: &[DeviceFacts], t: &AdviceThresholds) -> Vec<Recommendation> {
    let mut out = Vec::new();
    for full in devices.iter().filter(|d| d.is_gpu) {
        // Where the model would go: the placement rule over the twins (same product, so the
        // roomiest is also the least used).
        let twins = devices
            .iter()
            .filter(|o| o.is_gpu && o.device != full.device && o.name == full.name && o.total_bytes > 0)
            .map(|o| (o, o.total_bytes.saturating_sub(o.used_bytes)));
        let Some(empty) = crate::placement::roomiest(twins) else {
            continue;
        };
        let gap = full.utilization() - empty.utilization();
        if gap < t.imbalance {
            continue;
        }
        let room = empty.total_bytes.saturating_sub(empty.used_bytes);
        // Moving m changes the gap by 2m/total; keep the move at most the whole gap.
        let most = (gap * full.total_bytes as f64) as u64;
        let Some(m) = full
            .models
            .iter()
            .filter(|m| m.reloadable && !m.pinned && m.size_bytes > 0 && m.size_bytes < room && m.size_bytes <= most)
            .max_by(|a, b| a.size_bytes.cmp(&b.size_bytes).then_with(|| b.model_id.cmp(&a.model_id)))
        else {
            continue;
        };
        out.push(Recommendation {
            kind: "rebalanceModels",
            priority: if pressured(full.level) { Priority::High } else { Priority::Low },
            device: full.device.clone(),
            message: format!(
                "{} is {:.0} % used and {} ({}) only {:.0} %; moving {} ({} bytes) there evens them out",
                full.device,
                full.utilization() * 100.0,
                empty.device,
                empty.name,
                empty.utilization() * 100.0,
                m.model_id,
                m.size_bytes
            ),
            evidence: vec![
                ("utilization", Evidence::Ratio(full.utilization())),
                ("targetUtilization", Evidence::Ratio(empty.utilization())),
                ("targetDevice", Evidence::Text(empty.device.clone())),
                ("targetAvailableBytes", Evidence::Bytes(room)),
                ("modelBytes", Evidence::Bytes(m.size_bytes)),
            ],
            estimated_savings_bytes: m.size_bytes,
            action: Action::MoveModel { model_id: m.model_id.clone(), target_device: empty.device.clone() },
        });
    }
    out
}

/// Every rule over every device, highest priority first, then the largest savings.
pub fn recommend(devices: &[DeviceFacts], t: &AdviceThresholds) -> Vec<Recommendation> {
    let mut out: Vec<Recommendation> = devices
        .iter()
        .flat_map(|d| [defragment(d, t), idle_models(d, t), clear_cache(d, t), pinned_host(d, t)])
        .flatten()
        .chain(rebalance(devices, t))
        .collect();
    out.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(b.estimated_savings_bytes.cmp(&a.estimated_savings_bytes))
            .then_with(|| a.device.cmp(&b.device))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::TIB;

    use crate::units::GIB;
    use crate::units::MIB;

    fn gpu(name: &str, used: u64) -> DeviceFacts {
        DeviceFacts {
            device: name.into(),
            name: "NVIDIA H100".into(),
            is_gpu: true,
            total_bytes: 80 * GIB,
            used_bytes: used,
            ..DeviceFacts::default()
        }
    }

    fn model(id: &str, bytes: u64, idle: f64) -> Candidate {
        Candidate {
            model_id: id.into(),
            size_bytes: bytes,
            idle_secs: idle,
            reloadable: true,
            priority: 50,
            ..Candidate::default()
        }
    }

    fn t() -> AdviceThresholds {
        AdviceThresholds::default()
    }

    #[test]
    fn defragment_fires_on_fragmentation_and_a_recent_failure() {
        let mut d = gpu("cuda:0", 10 * GIB);
        d.fragmentation = 0.7;
        d.free_in_pool_bytes = 300 * MIB;
        d.largest_free_block_bytes = 90 * MIB;
        d.scattered_free_bytes = 210 * MIB;
        d.last_failure = Some((12.0, 200 * MIB));
        let r = defragment(&d, &t()).expect("fires");
        assert_eq!(r.action, Action::Defragment { device: "cuda:0".into(), strategy: "thorough" });
        assert_eq!(r.estimated_savings_bytes, 210 * MIB);
        assert_eq!(r.priority, Priority::High, "the failed request fits the free space once compacted");
        // Silent: no failure, an old failure, low fragmentation.
        assert!(defragment(&DeviceFacts { last_failure: None, ..d.clone() }, &t()).is_none());
        assert!(defragment(&DeviceFacts { last_failure: Some((601.0, 1)), ..d.clone() }, &t()).is_none());
        assert!(defragment(&DeviceFacts { fragmentation: 0.1, ..d.clone() }, &t()).is_none());
        assert!(defragment(&DeviceFacts { free_in_pool_bytes: 0, ..d }, &t()).is_none());
    }

    #[test]
    fn a_failure_larger_than_the_device_is_no_evidence_of_fragmentation() {
        let mut d = gpu("cuda:0", 10 * GIB);
        d.fragmentation = 0.7;
        d.free_in_pool_bytes = 300 * MIB;
        d.largest_free_block_bytes = 90 * MIB;
        d.scattered_free_bytes = 210 * MIB;
        d.last_failure = Some((5.0, TIB));
        assert!(defragment(&d, &t()).is_none(), "1 TiB on an 80 GiB device: no compaction makes it fit");
        assert!(recommend(&[d.clone()], &t()).iter().all(|r| r.kind != "defragment"));
        // Within the device but beyond the pools' free space: still a (weaker) case.
        d.last_failure = Some((5.0, GIB));
        assert_eq!(defragment(&d, &t()).map(|r| r.priority), Some(Priority::Medium));
    }

    #[test]
    fn idle_models_fire_only_under_pressure_and_list_only_idle_unpinned_ones() {
        let mut d = gpu("cuda:0", 75 * GIB);
        d.level = Level::High;
        d.models = vec![
            model("old", 4 * GIB, 900.0),
            model("older", 2 * GIB, 1800.0),
            model("busy", 8 * GIB, 3.0),
            Candidate { pinned: true, ..model("pinned", 8 * GIB, 5000.0) },
        ];
        let r = idle_models(&d, &t()).expect("fires");
        assert_eq!(
            r.action,
            Action::Optimize {
                device: "cuda:0".into(),
                models: vec!["older".into(), "old".into()],
                min_memory_to_free: 6 * GIB
            }
        );
        assert_eq!(r.estimated_savings_bytes, 6 * GIB);
        assert!(idle_models(&DeviceFacts { level: Level::Moderate, ..d.clone() }, &t()).is_none());
        d.models.retain(|m| m.model_id == "busy" || m.model_id == "pinned");
        assert!(idle_models(&d, &t()).is_none(), "no idle unpinned model: silent");
    }

    #[test]
    fn clear_fires_on_cached_blocks_worth_it() {
        let mut d = gpu("cuda:1", GIB);
        d.empty_block_bytes = 2 * GIB;
        let r = clear_cache(&d, &t()).expect("fires");
        assert_eq!(r.action, Action::Clear { device: "cuda:1".into() });
        assert_eq!(r.estimated_savings_bytes, 2 * GIB);
        assert_eq!(r.priority, Priority::Low);
        // 1 % of 80 GiB is the floor without pressure; under pressure any amount counts.
        d.empty_block_bytes = 100 * MIB;
        assert!(clear_cache(&d, &t()).is_none());
        d.level = Level::Critical;
        assert_eq!(clear_cache(&d, &t()).map(|r| r.priority), Some(Priority::High));
        d.empty_block_bytes = 0;
        assert!(clear_cache(&d, &t()).is_none());
    }

    #[test]
    fn pinned_host_fires_when_large_under_pressure_with_something_to_move() {
        let d = DeviceFacts {
            device: "cpu".into(),
            total_bytes: 16 * GIB,
            used_bytes: 14 * GIB,
            level: Level::High,
            pinned_bytes: 4 * GIB,
            largest_movable_pinned: Some(("a1".into(), 3 * GIB)),
            ..DeviceFacts::default()
        };
        let r = pinned_host(&d, &t()).expect("fires");
        assert_eq!(
            r.action,
            Action::MoveAllocation {
                allocation_id: "a1".into(),
                target_device: "cpu".into(),
                target_memory_type: "host"
            }
        );
        assert_eq!(r.estimated_savings_bytes, 3 * GIB);
        assert!(pinned_host(&DeviceFacts { level: Level::Low, ..d.clone() }, &t()).is_none());
        assert!(pinned_host(&DeviceFacts { pinned_bytes: GIB, ..d.clone() }, &t()).is_none());
        assert!(pinned_host(&DeviceFacts { largest_movable_pinned: None, ..d }, &t()).is_none());
    }

    #[test]
    fn rebalance_moves_a_model_that_fits_to_the_emptier_twin() {
        let mut full = gpu("cuda:0", 70 * GIB);
        full.models = vec![model("big", 30 * GIB, 0.0), model("mid", 20 * GIB, 0.0), model("small", 5 * GIB, 0.0)];
        let empty = gpu("cuda:1", 10 * GIB);
        let r = rebalance(&[full.clone(), empty.clone()], &t());
        assert_eq!(r.len(), 1);
        // Gap 75 % of 80 GiB = 60 GiB; room 70 GiB: the largest is "big".
        assert_eq!(r[0].action, Action::MoveModel { model_id: "big".into(), target_device: "cuda:1".into() });
        // Silent: a different kind of GPU, a small gap, nothing reloadable.
        let other = DeviceFacts { name: "NVIDIA A10".into(), ..empty.clone() };
        assert!(rebalance(&[full.clone(), other], &t()).is_empty());
        let close = gpu("cuda:1", 60 * GIB);
        assert!(rebalance(&[full.clone(), close], &t()).is_empty());
        for m in &mut full.models {
            m.reloadable = false;
        }
        assert!(rebalance(&[full, empty], &t()).is_empty());
    }

    #[test]
    fn recommend_orders_by_priority_then_savings() {
        let mut a = gpu("cuda:0", 79 * GIB);
        a.level = Level::Critical;
        a.empty_block_bytes = GIB;
        a.models = vec![model("m", 3 * GIB, 1000.0)];
        let r = recommend(&[a], &t());
        let kinds: Vec<_> = r.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, vec!["unloadIdleModels", "clearCache"]);
        assert!(recommend(&[gpu("cuda:0", GIB)], &t()).is_empty(), "no evidence, no recommendation");
    }
}
