//! Which models to release under pressure, and how far down the ladder to go. Pure: the daemon
//! feeds it the models its workers report and the bytes it needs, then executes and
//! re-measures each step itself.
//!
//! The ladder, cheapest first: (1) trim caches (workers' allocator caches, memwarden's own empty
//! pool blocks); (2) offload idle models to the CPU (they stay loaded, a reload is a copy);
//! (3) unload models. Processes are never killed. Pinned and excluded models are never touched.

use serde::{Deserialize, Serialize};

/// One model on a device: what the ladder ranks and the advice rules look at.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Candidate {
    pub model_id: String,
    pub worker_id: String,
    /// Bytes it occupies on the device under pressure.
    pub size_bytes: u64,
    /// 0 (first to go) … 100 (last).
    pub priority: u8,
    pub pinned: bool,
    /// Seconds since it was last used.
    pub idle_secs: f64,
    /// How long it took to load (its reload cost), in milliseconds.
    pub load_time_ms: f64,
    /// Whether its holder can move it to the CPU (torch models on a GPU).
    pub offloadable: bool,
    /// It was loaded from a file by a supervised worker, so it can be loaded elsewhere.
    pub reloadable: bool,
}

/// Reload speed, in bytes per second: a model that reloads fast is cheap to drop.
pub fn reload_rate_bytes_per_s(c: &Candidate) -> f64 {
    c.size_bytes as f64 / (c.load_time_ms.max(1.0) / 1000.0)
}

/// How readily a model is released: higher goes first. Grows with idle time (doubling weight
/// after 5 minutes idle), with lower priority (priority 100 weighs 1/101 of priority 0), and with
/// cheaper reloads (one order of magnitude of reload speed above 100 MB/s adds one unit). Size
/// enters through the reload rate and through the ladder, which needs fewer big models.
pub fn eviction_score(c: &Candidate) -> f64 {
    let priority = f64::from(101 - c.priority.min(100));
    let idle = 1.0 + c.idle_secs.max(0.0) / 300.0;
    let reload = 1.0 + (1.0 + reload_rate_bytes_per_s(c) / 100e6).log10();
    priority * idle * reload
}

/// Candidates in release order (highest score first; ties: larger first, then by id so the
/// order is stable). Pinned models and those in `exclude` are left out.
pub fn rank<'a>(candidates: &'a [Candidate], exclude: &[String]) -> Vec<&'a Candidate> {
    let mut v: Vec<&Candidate> =
        candidates.iter().filter(|c| !c.pinned && !exclude.iter().any(|e| e == &c.model_id)).collect();
    v.sort_by(|a, b| {
        eviction_score(b)
            .total_cmp(&eviction_score(a))
            .then(b.size_bytes.cmp(&a.size_bytes))
            .then(a.model_id.cmp(&b.model_id))
    });
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EvictionStrategy {
    /// Trim caches and offload idle models; never unload.
    Conservative,
    /// The whole ladder, stopping at the target.
    #[default]
    Balanced,
    /// The whole ladder, unloading rather than offloading, and freeing 50 % beyond the target
    /// so the next spike has room.
    Aggressive,
    /// The whole ladder; per model, offload when the CPU has room and reloading is slow
    /// (under 1 GB/s), unload otherwise.
    Smart,
}

impl std::str::FromStr for EvictionStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "conservative" => Ok(EvictionStrategy::Conservative),
            "balanced" => Ok(EvictionStrategy::Balanced),
            "aggressive" => Ok(EvictionStrategy::Aggressive),
            "smart" => Ok(EvictionStrategy::Smart),
            _ => Err(format!("unknown strategy {s:?}: conservative, balanced, aggressive or smart")),
        }
    }
}

impl EvictionStrategy {
    pub fn name(self) -> &'static str {
        match self {
            EvictionStrategy::Conservative => "conservative",
            EvictionStrategy::Balanced => "balanced",
            EvictionStrategy::Aggressive => "aggressive",
            EvictionStrategy::Smart => "smart",
        }
    }

    /// Bytes to free for a need of `need_bytes`.
    pub fn target_bytes(self, need_bytes: u64) -> u64 {
        match self {
            EvictionStrategy::Aggressive => need_bytes.saturating_add(need_bytes / 2),
            _ => need_bytes,
        }
    }

    pub fn may_unload(self) -> bool {
        !matches!(self, EvictionStrategy::Conservative)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StepAction {
    TrimCache,
    Offload,
    Unload,
}

/// One planned release of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub action: StepAction,
    pub model_id: String,
    pub worker_id: String,
    pub size_bytes: u64,
}

/// What to release after the caches were trimmed: `still_needed` bytes remain to be freed.
/// `host_room_bytes` is what the CPU can take for offloads (0 when the host is itself under
/// pressure); `max_models` bounds how many models are touched (`None`: no bound). The plan may
/// fall short of the need when there is not enough to release; the caller reports that.
pub fn plan(
    candidates: &[Candidate],
    exclude: &[String],
    still_needed: u64,
    strategy: EvictionStrategy,
    mut host_room_bytes: u64,
    max_models: Option<usize>,
) -> Vec<Planned> {
    let mut out = Vec::new();
    let mut freed = 0u64;
    for c in rank(candidates, exclude) {
        if freed >= still_needed || max_models.is_some_and(|m| out.len() >= m) {
            break;
        }
        let can_offload = c.offloadable && c.size_bytes <= host_room_bytes;
        let action = match strategy {
            EvictionStrategy::Conservative if can_offload => StepAction::Offload,
            EvictionStrategy::Conservative => continue,
            EvictionStrategy::Balanced if can_offload => StepAction::Offload,
            EvictionStrategy::Smart if can_offload && reload_rate_bytes_per_s(c) < 1e9 => StepAction::Offload,
            _ => StepAction::Unload,
        };
        if action == StepAction::Offload {
            host_room_bytes -= c.size_bytes;
        }
        freed += c.size_bytes;
        out.push(Planned {
            action,
            model_id: c.model_id.clone(),
            worker_id: c.worker_id.clone(),
            size_bytes: c.size_bytes,
        });
    }
    out
}

/// Bytes that must be freed on a device of `total_bytes` with `available_bytes` free to bring its
/// utilization to `target_percent` (0–100), or `min_bytes`, whichever is more.
pub fn need_bytes(total_bytes: u64, available_bytes: u64, target_percent: f64, min_bytes: u64) -> u64 {
    let used = total_bytes.saturating_sub(available_bytes) as f64;
    let allowed = total_bytes as f64 * target_percent.clamp(0.0, 100.0) / 100.0;
    let by_target = (used - allowed).max(0.0) as u64;
    by_target.max(min_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::units::MIB;

    fn model(id: &str, size_mib: u64, priority: u8, idle_secs: f64) -> Candidate {
        Candidate {
            model_id: id.into(),
            worker_id: "w".into(),
            size_bytes: size_mib * MIB,
            priority,
            pinned: false,
            idle_secs,
            load_time_ms: 500.0,
            offloadable: false,
            reloadable: false,
        }
    }

    fn ids(v: &[&Candidate]) -> Vec<String> {
        v.iter().map(|c| c.model_id.clone()).collect()
    }

    #[test]
    fn lower_priority_goes_first_other_things_equal() {
        let ms = [model("high", 100, 90, 10.0), model("low", 100, 10, 10.0), model("mid", 100, 50, 10.0)];
        assert_eq!(ids(&rank(&ms, &[])), ["low", "mid", "high"]);
    }

    #[test]
    fn idle_models_go_before_busy_ones_of_the_same_priority() {
        let ms = [model("busy", 100, 50, 1.0), model("idle", 100, 50, 3600.0)];
        assert_eq!(ids(&rank(&ms, &[])), ["idle", "busy"]);
    }

    #[test]
    fn cheap_reloads_go_before_expensive_ones() {
        let mut slow = model("slow", 100, 50, 10.0);
        slow.load_time_ms = 60_000.0; // 1.7 MB/s: a reload from a network share
        let fast = model("fast", 100, 50, 10.0); // 210 MB/s
        assert_eq!(ids(&rank(&[slow, fast], &[])), ["fast", "slow"]);
    }

    #[test]
    fn pinned_and_excluded_models_are_never_ranked() {
        let mut pinned = model("pinned", 100, 0, 9999.0);
        pinned.pinned = true;
        let ms = [pinned, model("excluded", 100, 0, 9999.0), model("ok", 100, 99, 0.0)];
        assert_eq!(ids(&rank(&ms, &["excluded".into()])), ["ok"]);
        assert!(plan(&ms, &["excluded".into()], 10_000 * MIB, EvictionStrategy::Aggressive, 0, None)
            .iter()
            .all(|p| p.model_id == "ok"));
    }

    #[test]
    fn plan_stops_once_the_need_is_met() {
        let ms = [model("a", 100, 10, 0.0), model("b", 100, 20, 0.0), model("c", 100, 30, 0.0)];
        let p = plan(&ms, &[], 150 * MIB, EvictionStrategy::Balanced, 0, None);
        assert_eq!(p.iter().map(|s| s.model_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(p.iter().all(|s| s.action == StepAction::Unload));
        assert!(plan(&ms, &[], 0, EvictionStrategy::Balanced, 0, None).is_empty(), "nothing needed, nothing planned");
    }

    #[test]
    fn max_models_bounds_the_plan_even_when_short() {
        let ms = [model("a", 100, 10, 0.0), model("b", 100, 20, 0.0), model("c", 100, 30, 0.0)];
        assert_eq!(plan(&ms, &[], 1000 * MIB, EvictionStrategy::Balanced, 0, Some(1)).len(), 1);
        assert_eq!(
            plan(&ms, &[], 1000 * MIB, EvictionStrategy::Balanced, 0, None).len(),
            3,
            "short: everything it can"
        );
    }

    #[test]
    fn strategies_differ_in_how_far_they_go() {
        let mut ms = vec![model("a", 100, 10, 0.0), model("b", 100, 20, 0.0), model("c", 100, 30, 0.0)];
        // Nothing offloadable: conservative frees nothing, the others unload.
        assert!(plan(&ms, &[], 150 * MIB, EvictionStrategy::Conservative, u64::MAX, None).is_empty());
        assert_eq!(plan(&ms, &[], 150 * MIB, EvictionStrategy::Balanced, u64::MAX, None).len(), 2);
        // Aggressive frees half again beyond the need.
        assert_eq!(EvictionStrategy::Aggressive.target_bytes(200 * MIB), 300 * MIB);
        assert_eq!(
            plan(&ms, &[], EvictionStrategy::Aggressive.target_bytes(150 * MIB), EvictionStrategy::Aggressive, 0, None)
                .len(),
            3
        );
        // Offloadable models: balanced and conservative offload while the host has room, then
        // balanced unloads; aggressive always unloads.
        for m in &mut ms {
            m.offloadable = true;
        }
        let p = plan(&ms, &[], 250 * MIB, EvictionStrategy::Balanced, 150 * MIB, None);
        assert_eq!(
            p.iter().map(|s| s.action).collect::<Vec<_>>(),
            [StepAction::Offload, StepAction::Unload, StepAction::Unload]
        );
        let p = plan(&ms, &[], 250 * MIB, EvictionStrategy::Conservative, 150 * MIB, None);
        assert_eq!(p.iter().map(|s| s.action).collect::<Vec<_>>(), [StepAction::Offload]);
        assert!(plan(&ms, &[], 250 * MIB, EvictionStrategy::Aggressive, u64::MAX, None)
            .iter()
            .all(|s| s.action == StepAction::Unload));
        // Smart offloads slow reloads, unloads fast ones.
        let mut slow = model("slow", 100, 10, 0.0);
        slow.offloadable = true;
        slow.load_time_ms = 10_000.0;
        let mut fast = model("fast", 1000, 10, 0.0);
        fast.offloadable = true;
        fast.load_time_ms = 100.0; // 10 GB/s
        let p = plan(&[slow, fast], &[], u64::MAX, EvictionStrategy::Smart, u64::MAX, None);
        let by_id: std::collections::HashMap<_, _> = p.iter().map(|s| (s.model_id.as_str(), s.action)).collect();
        assert_eq!(by_id["slow"], StepAction::Offload);
        assert_eq!(by_id["fast"], StepAction::Unload);
    }

    #[test]
    fn need_is_the_larger_of_target_and_minimum() {
        // 100 GiB device, 90 GiB used; target 50 % → 40 GiB.
        let g = 1u64 << 30;
        assert_eq!(need_bytes(100 * g, 10 * g, 50.0, 0), 40 * g);
        assert_eq!(need_bytes(100 * g, 10 * g, 50.0, 41 * g), 41 * g);
        assert_eq!(need_bytes(100 * g, 60 * g, 50.0, 0), 0, "already below the target");
        assert_eq!(need_bytes(100 * g, 60 * g, 50.0, MIB), MIB);
    }

    #[test]
    fn strategy_names_parse() {
        for s in [
            EvictionStrategy::Conservative,
            EvictionStrategy::Balanced,
            EvictionStrategy::Aggressive,
            EvictionStrategy::Smart,
        ] {
            assert_eq!(s.name().parse::<EvictionStrategy>(), Ok(s));
        }
        assert!("reckless".parse::<EvictionStrategy>().is_err());
    }
}
