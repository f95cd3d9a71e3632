//! The reports: usage and analytics over a window, the allocation event log, and the
//! recommendations, each computed from the recorded history and the measured state.

use super::{from_unix_ms, unix_ms, Analytics};
use crate::models::ModelView;
use crate::pressure::PressureReport;
use crate::service::{EventKind, ServiceError};
use crate::sync::lock;
use memwarden_core::advice::{self, Action, DeviceFacts, Evidence};
use memwarden_core::history::{
    self, leak_suspects, owner_pid, percentile, size_histogram, time_per_level, top_by_bytes, Counters, LiveAllocation,
    OwnerActivity, Point,
};
use memwarden_core::pressure::Level;
use memwarden_core::{DeviceId, MemoryKind};
use memwarden_protocol::api::analytics::{
    ActionDto, ActivityDto, AnalyticsDto, BucketDto, DefragWindowDto, DeviceAnalyticsDto, EventDto, EventListDto,
    EventLogInfoDto, FragmentationTrendDto, HolderDto, LeakSuspectDto, ModelUsageDto, PeakDto, PercentilesDto,
    PressureTimeDto, RecommendationDto, RecommendationsDto, TransfersDto, TrendPointDto, UsageDto,
};
use memwarden_protocol::api::rfc3339;
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// Entries per "top" list.
const TOP: usize = 10;
/// Leak suspects listed at most.
const SUSPECTS: usize = 50;
/// Points of the fragmentation series in a report at most.
const TREND_POINTS: usize = 60;

pub fn render_action(a: &Action) -> ActionDto {
    use serde_json::json;
    let (method, path, body) = match a {
        Action::Defragment { device, strategy } => {
            ("POST", format!("/api/memory/operations/defragment/{device}"), Some(json!({ "strategy": strategy })))
        }
        Action::Optimize { device, models, min_memory_to_free } => (
            "POST",
            "/api/memory/models/optimize".to_string(),
            Some(json!({
                "deviceId": device,
                "models": models,
                "minMemoryToFree": min_memory_to_free,
                "strategy": "balanced",
                "forceOptimization": true
            })),
        ),
        Action::Clear { device } => ("POST", format!("/api/memory/operations/clear/{device}"), None),
        Action::MoveAllocation { allocation_id, target_device, target_memory_type } => (
            "POST",
            "/api/memory/transfer".to_string(),
            Some(json!({
                "sourceAllocationId": allocation_id,
                "targetDeviceId": target_device,
                "targetMemoryType": target_memory_type,
                "transferType": "move"
            })),
        ),
        Action::MoveModel { model_id, target_device } => {
            ("POST", format!("/api/memory/models/{model_id}/move"), Some(json!({ "targetDeviceId": target_device })))
        }
    };
    ActionDto { method: method.into(), path, body }
}

fn evidence_json(e: &Evidence) -> serde_json::Value {
    match e {
        Evidence::Bytes(b) | Evidence::Count(b) => (*b).into(),
        Evidence::Ratio(r) => ((r * 10_000.0).round() / 10_000.0).into(),
        Evidence::Seconds(s) => ((s * 10.0).round() / 10.0).into(),
        Evidence::Text(t) => t.clone().into(),
    }
}

fn per_second(n: u64, ms: u64) -> f64 {
    if ms == 0 {
        0.0
    } else {
        n as f64 * 1000.0 / ms as f64
    }
}

/// A window's bounds: `(start ms, end ms, length actually covered ms)`. The covered length is
/// shorter than asked while the daemon has not run that long.
struct Window {
    start_ms: i64,
    end_ms: i64,
    covered_ms: u64,
}

impl Analytics {
    /// Checks a window (`1h`, `15m`, …) against what the history can hold.
    pub fn parse_window(&self, text: &str) -> Result<u64, ServiceError> {
        let ms = history::parse_window_ms(text).map_err(|m| ServiceError::invalid("window", m))?;
        let most = self.config.resolution().coarse_span_ms();
        if ms > most {
            return Err(ServiceError::invalid(
                "window",
                format!("{text} is longer than the history keeps ({} s)", most / 1000),
            ));
        }
        Ok(ms)
    }

    fn window(&self, window_ms: u64, now: OffsetDateTime) -> Window {
        let end_ms = unix_ms(now);
        let start_ms = end_ms - window_ms as i64;
        Window { start_ms, end_ms, covered_ms: (end_ms - start_ms.max(self.started_ms)).max(0) as u64 }
    }

    /// The counters at the window's start: the newest point at or before it, or zero when the
    /// daemon started within the window (counters start at zero).
    fn baseline(&self, device: DeviceId, w: &Window) -> Counters {
        let s = lock(&self.state);
        s.series.get(&device).and_then(|se| se.at_or_before(w.start_ms)).map(|p| p.counters).unwrap_or_default()
    }

    fn points(&self, device: DeviceId, w: &Window) -> (u64, Vec<Point>) {
        let s = lock(&self.state);
        s.series
            .get(&device)
            .map(|se| se.window((w.end_ms - w.start_ms) as u64, w.end_ms))
            .unwrap_or((self.config.fine_interval_ms, Vec::new()))
    }

    /// `GET /api/memory/usage[/{deviceId}]`.
    pub fn usage(&self, device: Option<DeviceId>, window_ms: u64) -> Result<Vec<UsageDto>, ServiceError> {
        let now = OffsetDateTime::now_utc();
        let w = self.window(window_ms, now);
        let ids = match device {
            Some(d) => vec![d],
            None => self.service.device_ids(),
        };
        ids.into_iter()
            .map(|id| {
                let st = self.service.status(id)?;
                let rec = self.service.device_record(id);
                let d = rec.counters.since(&self.baseline(id, &w));
                let (_, pts) = self.points(id, &w);
                let peak = pts.iter().max_by_key(|p| p.used_max_bytes);
                let (peak_bytes, peak_at) = match peak {
                    Some(p) if p.used_max_bytes >= st.used_bytes => (p.used_max_bytes, Some(from_unix_ms(p.at_ms))),
                    _ => (st.used_bytes, Some(st.last_updated)),
                };
                Ok(UsageDto {
                    device_id: id.to_string(),
                    current_usage_bytes: st.used_bytes,
                    peak_usage_bytes: peak_bytes,
                    peak_usage_at: peak_at.map(rfc3339),
                    allocation_count: self.service.allocations(Some(id)).len() as u64,
                    allocated_bytes: rec.live_bytes,
                    peak_allocated_bytes: rec.peak_live.value,
                    allocations_in_window: d.allocations,
                    frees_in_window: d.frees,
                    allocations_per_second: per_second(d.allocations, w.covered_ms),
                    frees_per_second: per_second(d.frees, w.covered_ms),
                    average_allocation_size_bytes: d.average_allocation_bytes(),
                    window_start: rfc3339(from_unix_ms(w.start_ms)),
                    window_end: rfc3339(from_unix_ms(w.end_ms)),
                })
            })
            .collect()
    }

    /// `GET /api/memory/analytics?window=`.
    pub fn analytics(&self, window_ms: u64, window_text: &str) -> Result<AnalyticsDto, ServiceError> {
        let now = OffsetDateTime::now_utc();
        let w = self.window(window_ms, now);
        let since = from_unix_ms(w.start_ms);
        let events = self.service.allocation_events(None, Some(since));
        let (capacity, oldest, dropped_at) = self.service.event_log_extent();
        let mut devices = Vec::new();
        for id in self.service.device_ids() {
            devices.push(self.device_analytics(id, &w, &events)?);
        }
        // The live allocations through the ledger's running totals: the cost follows the number
        // of owners and purposes, not of allocations (the events are bounded by the log's size).
        let min_age = time::Duration::seconds(self.config.leak_min_age_secs as i64);
        let live = self.service.live_digest(now - min_age, SUSPECTS);
        let holders = |key: fn(&crate::service::AllocationRecord) -> Option<&String>,
                       live: &[crate::service::GroupTotals]|
         -> Vec<HolderDto> {
            let name = |r: &crate::service::AllocationRecord| key(r).cloned().unwrap_or_else(|| "(none)".into());
            let mut live_top: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for g in live {
                let e = live_top.entry(g.name.clone().unwrap_or_else(|| "(none)".into())).or_default();
                *e = (e.0 + g.bytes, e.1 + g.count);
            }
            let window_top: BTreeMap<String, (u64, u64)> = top_by_bytes(
                events
                    .iter()
                    .filter(|e| e.kind == EventKind::Allocated)
                    .map(|e| (name(&e.record), e.record.committed_bytes())),
                usize::MAX,
            )
            .into_iter()
            .map(|(k, b, c)| (k, (b, c)))
            .collect();
            let mut names: Vec<&String> = live_top.keys().chain(window_top.keys()).collect();
            names.sort();
            names.dedup();
            let mut v: Vec<HolderDto> = names
                .into_iter()
                .map(|n| {
                    let (lb, lc) = live_top.get(n).copied().unwrap_or_default();
                    let (wb, wc) = window_top.get(n).copied().unwrap_or_default();
                    HolderDto {
                        name: n.clone(),
                        live_bytes: lb,
                        live_count: lc,
                        allocated_bytes_in_window: wb,
                        allocations_in_window: wc,
                    }
                })
                .collect();
            v.sort_by(|a, b| {
                b.live_bytes
                    .cmp(&a.live_bytes)
                    .then(b.allocated_bytes_in_window.cmp(&a.allocated_bytes_in_window))
                    .then_with(|| a.name.cmp(&b.name))
            });
            v.truncate(TOP);
            v
        };
        let top_owners = holders(|r| r.owner.as_ref(), &live.owners);
        let top_purposes = holders(|r| r.purpose.as_ref(), &live.purposes);
        let top_models = self.top_models(&w);
        let leak_suspects = self.leak_suspects(&live, now);
        Ok(AnalyticsDto {
            window: window_text.to_string(),
            window_start: rfc3339(since),
            window_end: rfc3339(from_unix_ms(w.end_ms)),
            recording: self.service.recording(),
            devices,
            top_owners,
            top_purposes,
            top_models,
            leak_suspects,
            event_log: EventLogInfoDto {
                capacity,
                oldest: oldest.map(rfc3339),
                covers_window: dropped_at.is_none_or(|d| d < since),
            },
        })
    }

    fn device_analytics(
        &self,
        id: DeviceId,
        w: &Window,
        events: &[crate::service::AllocationEvent],
    ) -> Result<DeviceAnalyticsDto, ServiceError> {
        let st = self.service.status(id)?;
        let pressure = self.pressure.report(id)?;
        let rec = self.service.device_record(id);
        let d = rec.counters.since(&self.baseline(id, w));
        let (resolution_ms, pts) = self.points(id, w);
        let (reserved, allocated) = st.pool_totals();
        let percentiles = usage_percentiles(&pts);
        let used_peak = lock(&self.state).used_peaks.get(&id).copied().unwrap_or_default();
        let peak = |p: history::Peak| PeakDto {
            value_bytes: p.value,
            at: (p.at_ms != 0).then(|| rfc3339(from_unix_ms(p.at_ms))),
            since: rfc3339(from_unix_ms(if p.since_ms != 0 { p.since_ms } else { self.started_ms })),
        };
        let sizes = events
            .iter()
            .filter(|e| {
                e.kind == EventKind::Allocated && e.record.device == id && e.record.kind != MemoryKind::Reservation
            })
            .map(|e| e.record.size_bytes);
        let trend = fragmentation_trend(&pts);
        let levels = time_per_level(&pts);
        Ok(DeviceAnalyticsDto {
            device_id: id.to_string(),
            samples: pts.len(),
            resolution_ms,
            total_bytes: st.total_bytes,
            used_bytes: st.used_bytes,
            available_bytes: st.available_bytes,
            pool_reserved_bytes: reserved,
            pool_allocated_bytes: allocated,
            reservation_bytes: st.reservation_bytes,
            model_bytes: lock(&self.state)
                .series
                .get(&id)
                .and_then(|se| se.latest())
                .map(|p| p.model_bytes)
                .unwrap_or(0),
            fragmentation: st.fragmentation(),
            pressure_level: pressure.level.as_str().to_string(),
            peak_used: peak(used_peak),
            peak_allocated: peak(rec.peak_live),
            window_peak_used_bytes: pts.iter().map(|p| p.used_max_bytes).max().unwrap_or(st.used_bytes),
            usage_percentiles: percentiles,
            activity: activity(&d, w),
            size_histogram: size_histogram(sizes)
                .into_iter()
                .map(|b| BucketDto { min_bytes: b.min_bytes, max_bytes: b.max_bytes, count: b.count, bytes: b.bytes })
                .collect(),
            fragmentation_trend: trend,
            transfers: transfers(&d, w, &pts),
            defragmentation: DefragWindowDto {
                runs: d.defrag_runs,
                moved_bytes: d.defrag_moved_bytes,
                released_bytes: d.defrag_released_bytes,
            },
            pressure_time: PressureTimeDto {
                low_seconds: levels[0] as f64 / 1000.0,
                moderate_seconds: levels[1] as f64 / 1000.0,
                high_seconds: levels[2] as f64 / 1000.0,
                critical_seconds: levels[3] as f64 / 1000.0,
            },
        })
    }

    fn top_models(&self, w: &Window) -> Vec<ModelUsageDto> {
        let s = lock(&self.state);
        let mut v: Vec<ModelUsageDto> = s
            .models
            .values()
            .filter(|t| t.last_seen_ms > w.start_ms)
            .map(|t| ModelUsageDto {
                model_id: t.model_id.clone(),
                model_name: t.model_name.clone(),
                device_id: t.device.clone(),
                worker_id: t.worker_id.clone(),
                loaded: t.loaded,
                current_bytes: if t.loaded { t.current_bytes() } else { 0 },
                peak_bytes_in_window: t.max_in(w.start_ms, w.end_ms),
                peak_bytes: t.peak.value,
                first_seen: rfc3339(from_unix_ms(t.first_seen_ms)),
                last_seen: rfc3339(from_unix_ms(t.last_seen_ms)),
            })
            .collect();
        v.sort_by(|a, b| b.peak_bytes_in_window.cmp(&a.peak_bytes_in_window).then_with(|| a.model_id.cmp(&b.model_id)));
        v.truncate(TOP);
        v
    }

    /// The oldest allocations of owners that are gone, idle or unnamed (the digest holds each
    /// owner's `SUSPECTS` oldest, which is all the ranking below can use).
    fn leak_suspects(&self, live: &crate::service::LiveDigest, now: OffsetDateTime) -> Vec<LeakSuspectDto> {
        let items: Vec<LiveAllocation> = live
            .oldest
            .iter()
            .flat_map(|(_, old)| old)
            .map(|r| LiveAllocation {
                id: r.id.clone(),
                device: r.device.to_string(),
                size_bytes: r.size_bytes,
                owner: r.owner.clone(),
                purpose: r.purpose.clone(),
                persistent: r.persistent,
                age_secs: (now - r.allocated_at).as_seconds_f64(),
            })
            .collect();
        let proc_root = self.supervisor.proc_root().to_path_buf();
        let now_ns = now.unix_timestamp_nanos() as i64;
        // An owner's last allocate or free, kept by the ledger (exact, not bounded by the log).
        let last_active: std::collections::HashMap<&str, i64> =
            live.owners.iter().filter_map(|g| Some((g.name.as_deref()?, g.last_active_ns))).collect();
        let activity = |owner: &str| OwnerActivity {
            idle_secs: last_active.get(owner).map(|t| (now_ns - *t).max(0) as f64 / 1e9),
            gone: owner_pid(owner).is_some_and(|pid| !proc_root.join(pid.to_string()).exists()),
        };
        leak_suspects(&items, activity, self.config.leak_min_age_secs as f64, self.config.leak_owner_idle_secs as f64)
            .into_iter()
            .take(SUSPECTS)
            .map(|(a, reason)| LeakSuspectDto {
                allocation_id: a.id.clone(),
                device_id: a.device.clone(),
                size_bytes: a.size_bytes,
                owner: a.owner.clone(),
                purpose: a.purpose.clone(),
                age_seconds: a.age_secs,
                reason: reason.as_str().into(),
                owner_idle_seconds: a.owner.as_deref().and_then(|o| activity(o).idle_secs),
            })
            .collect()
    }

    /// `GET /api/memory/analytics/events`: the newest `limit` events, oldest first.
    pub fn events(&self, device: Option<DeviceId>, limit: usize) -> EventListDto {
        let all = self.service.allocation_events(device, None);
        let skip = all.len().saturating_sub(limit);
        EventListDto {
            capacity: self.service.event_log_extent().0,
            events: all
                .into_iter()
                .skip(skip)
                .map(|e| EventDto {
                    at: rfc3339(e.at()),
                    event: e.kind.as_str().into(),
                    allocation_id: e.record.id.clone(),
                    device_id: e.record.device.to_string(),
                    memory_type: e.record.kind.to_string(),
                    size_bytes: e.record.size_bytes,
                    owner: e.record.owner.clone(),
                    purpose: e.record.purpose.clone(),
                    generation: e.record.generation,
                })
                .collect(),
        }
    }

    /// The facts the recommendation rules look at, measured now.
    pub fn facts(&self) -> Result<Vec<DeviceFacts>, ServiceError> {
        let now = OffsetDateTime::now_utc();
        let view = ModelView::snapshot(&self.supervisor);
        let live = self.service.allocations(None);
        let mut out = Vec::new();
        for id in self.service.device_ids() {
            let st = self.service.status(id)?;
            let level = self.pressure.report(id).map(|p| p.level).unwrap_or(Level::Low);
            let rec = self.service.device_record(id);
            let pools: Vec<_> = st.pools.iter().map(|(_, s)| *s).collect();
            let dev = id.to_string();
            let pinned: Vec<_> = live.iter().filter(|r| r.device == id && r.kind == MemoryKind::Pinned).collect();
            out.push(DeviceFacts {
                device: dev.clone(),
                name: st.name.clone(),
                is_gpu: id.is_gpu(),
                total_bytes: st.total_bytes,
                used_bytes: st.used_bytes,
                level,
                fragmentation: st.fragmentation(),
                free_in_pool_bytes: pools.iter().map(|p| p.free_in_pool_bytes).sum(),
                largest_free_block_bytes: pools.iter().map(|p| p.largest_free_block_bytes).max().unwrap_or(0),
                scattered_free_bytes: pools
                    .iter()
                    .map(|p| p.free_in_pool_bytes - p.largest_free_block_bytes.min(p.free_in_pool_bytes))
                    .sum(),
                empty_block_bytes: pools.iter().map(|p| p.empty_block_bytes).sum(),
                last_failure: rec.last_failure.map(|(at, bytes)| ((now - at).as_seconds_f64(), bytes)),
                pinned_bytes: pinned.iter().map(|r| r.allocated_bytes).sum(),
                largest_movable_pinned: pinned
                    .iter()
                    .filter(|r| r.movable && !r.exported)
                    .max_by_key(|r| r.allocated_bytes)
                    .map(|r| (r.id.clone(), r.allocated_bytes)),
                models: view.facts(id),
            });
        }
        Ok(out)
    }

    /// `GET /api/memory/optimization`.
    pub fn recommendations(&self) -> Result<RecommendationsDto, ServiceError> {
        let facts = self.facts()?;
        let recs = advice::recommend(&facts, &self.advice);
        Ok(RecommendationsDto {
            generated_at: rfc3339(OffsetDateTime::now_utc()),
            total_estimated_savings_bytes: recs.iter().map(|r| r.estimated_savings_bytes).sum(),
            recommendations: recs
                .iter()
                .map(|r| RecommendationDto {
                    kind: r.kind.into(),
                    priority: r.priority.as_str().into(),
                    device_id: r.device.clone(),
                    message: r.message.clone(),
                    evidence: r.evidence.iter().map(|(k, v)| (k.to_string(), evidence_json(v))).collect(),
                    estimated_savings_bytes: r.estimated_savings_bytes,
                    action: render_action(&r.action),
                })
                .collect(),
        })
    }
}

impl Analytics {
    /// The recommendations for each of `reports`' devices, as the pressure report lists them
    /// (`kind: message (METHOD path)`): only at `high` or above, as far as the rules' evidence
    /// goes. The facts are measured once for all of them.
    pub fn pressure_actions(&self, reports: &[&PressureReport]) -> Vec<Vec<String>> {
        let wanted = |r: &PressureReport| r.level >= Level::High;
        let recs = match reports.iter().any(|r| wanted(r)).then(|| self.facts()) {
            Some(Ok(facts)) => advice::recommend(&facts, &self.advice),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "no recommendations for the pressure report");
                Vec::new()
            }
            None => Vec::new(),
        };
        reports
            .iter()
            .map(|r| {
                let dev = r.device.to_string();
                recs.iter()
                    .filter(|rec| wanted(r) && rec.device == dev)
                    .map(|rec| {
                        let a = render_action(&rec.action);
                        format!("{}: {} ({} {})", rec.kind, rec.message, a.method, a.path)
                    })
                    .collect()
            })
            .collect()
    }
}

fn fragmentation_trend(pts: &[Point]) -> Option<FragmentationTrendDto> {
    if pts.is_empty() {
        return None;
    }
    let f: Vec<f64> = pts.iter().map(|p| p.fragmentation).collect();
    let mean = |v: &[f64]| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
    let (a, b) = f.split_at(f.len() / 2);
    let delta = mean(b) - if a.is_empty() { mean(b) } else { mean(a) };
    let trend = if delta > 0.05 {
        "rising"
    } else if delta < -0.05 {
        "falling"
    } else {
        "flat"
    };
    let step = pts.len().div_ceil(TREND_POINTS).max(1);
    Some(FragmentationTrendDto {
        first: f[0],
        last: f[f.len() - 1],
        min: f.iter().copied().fold(f64::INFINITY, f64::min),
        max: f.iter().copied().fold(0.0, f64::max),
        mean: mean(&f),
        trend: trend.into(),
        series: pts
            .iter()
            .step_by(step)
            .map(|p| TrendPointDto {
                at: rfc3339(from_unix_ms(p.at_ms)),
                fragmentation: (p.fragmentation * 10_000.0).round() / 10_000.0,
            })
            .collect(),
    })
}

/// The spread of a window's used bytes; `None` for a window without points.
fn usage_percentiles(pts: &[Point]) -> Option<PercentilesDto> {
    let used: Vec<u64> = pts.iter().map(|p| p.used_bytes).collect();
    (!used.is_empty()).then(|| PercentilesDto {
        min_bytes: used.iter().copied().min().unwrap_or(0),
        p50_bytes: percentile(&used, 50.0).unwrap_or(0),
        p90_bytes: percentile(&used, 90.0).unwrap_or(0),
        p95_bytes: percentile(&used, 95.0).unwrap_or(0),
        p99_bytes: percentile(&used, 99.0).unwrap_or(0),
        max_bytes: used.iter().copied().max().unwrap_or(0),
        mean_bytes: (used.iter().map(|&u| u as u128).sum::<u128>() / used.len() as u128) as u64,
    })
}

/// The allocations and frees of a window (`d`: its counters' change).
fn activity(d: &Counters, w: &Window) -> ActivityDto {
    ActivityDto {
        allocations: d.allocations,
        allocated_bytes: d.allocated_bytes,
        frees: d.frees,
        freed_bytes: d.freed_bytes,
        reclaims: d.reclaims,
        reclaimed_bytes: d.reclaimed_bytes,
        failed_allocations: d.failed_allocations,
        moves: d.moves,
        exports: d.exports,
        allocations_per_second: per_second(d.allocations, w.covered_ms),
        frees_per_second: per_second(d.frees, w.covered_ms),
        average_allocation_size_bytes: d.average_allocation_bytes(),
    }
}

/// The transfers of a window (`d`: its counters' change), with the highest rate between two of
/// its points.
fn transfers(d: &Counters, w: &Window, pts: &[Point]) -> TransfersDto {
    let mut peak_rate = 0.0f64;
    for pair in pts.windows(2) {
        let moved = pair[1].counters.since(&pair[0].counters);
        let span = (pair[1].at_ms - pair[0].at_ms).max(1) as u64;
        peak_rate = peak_rate.max(per_second(moved.transfer_out_bytes + moved.transfer_in_bytes, span));
    }
    TransfersDto {
        count: d.transfers,
        out_bytes: d.transfer_out_bytes,
        in_bytes: d.transfer_in_bytes,
        out_bytes_per_second: per_second(d.transfer_out_bytes, w.covered_ms),
        in_bytes_per_second: per_second(d.transfer_in_bytes, w.covered_ms),
        peak_bytes_per_second: peak_rate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_render_as_memwarden_requests() {
        let a = render_action(&Action::Defragment { device: "cuda:0".into(), strategy: "thorough" });
        assert_eq!((a.method.as_str(), a.path.as_str()), ("POST", "/api/memory/operations/defragment/cuda:0"));
        assert_eq!(a.body, Some(serde_json::json!({"strategy": "thorough"})));
        let o =
            render_action(&Action::Optimize { device: "cpu".into(), models: vec!["m".into()], min_memory_to_free: 5 });
        assert_eq!(o.path, "/api/memory/models/optimize");
        assert_eq!(o.body.as_ref().and_then(|b| b.get("models")), Some(&serde_json::json!(["m"])));
        let c = render_action(&Action::Clear { device: "cpu".into() });
        assert_eq!((c.path.as_str(), c.body), ("/api/memory/operations/clear/cpu", None));
    }

    #[test]
    fn trend_compares_halves() {
        let p = |f: f64| Point { fragmentation: f, ..Point::default() };
        let t = fragmentation_trend(&[p(0.1), p(0.1), p(0.5), p(0.6)]).expect("points");
        assert_eq!(t.trend, "rising");
        assert_eq!((t.first, t.last, t.max), (0.1, 0.6, 0.6));
        assert!(fragmentation_trend(&[]).is_none());
        assert_eq!(fragmentation_trend(&[p(0.4), p(0.1)]).map(|t| t.trend), Some("falling".into()));
    }
}
