//! `analytics` and `recommend`.

use super::http::{path_segment, CliError, Client};
use super::render::{or_dash, pct, pretty, table};
use memwarden_core::units::format_bytes;
use memwarden_protocol::api::analytics::{AnalyticsDto, DeviceAnalyticsDto, HolderDto, RecommendationsDto};
use std::fmt::Write as _;

/// `memwarden analytics`: per device, then the top holders and leak suspects.
pub fn analytics(client: &Client, window: &str, as_json: bool) -> Result<String, CliError> {
    let answer = client.get::<AnalyticsDto>(&format!("/api/memory/analytics?window={}", path_segment(window)))?;
    if as_json {
        return Ok(pretty(&answer.raw));
    }
    let a = answer.data;
    let mut out = String::new();
    let _ = writeln!(out, "window {} ({} → {})", a.window, a.window_start, a.window_end);
    if !a.recording {
        let _ = writeln!(out, "recording is off (analytics.enabled = false): current figures only");
    }
    for d in &a.devices {
        device(&mut out, d);
    }
    let holders = |v: &[HolderDto]| -> Vec<Vec<String>> {
        v.iter()
            .map(|h| {
                vec![
                    h.name.clone(),
                    format_bytes(h.live_bytes),
                    h.live_count.to_string(),
                    format_bytes(h.allocated_bytes_in_window),
                    h.allocations_in_window.to_string(),
                ]
            })
            .collect()
    };
    for (title, list) in [("owners", &a.top_owners), ("purposes", &a.top_purposes)] {
        let rows = holders(list);
        if !rows.is_empty() {
            let _ = writeln!(out, "\ntop {title}");
            out.push_str(&table(&["NAME", "LIVE", "COUNT", "ALLOCATED IN WINDOW", "ALLOCATIONS"], &rows));
        }
    }
    let models: Vec<Vec<String>> = a
        .top_models
        .iter()
        .map(|m| {
            vec![
                m.model_name.clone(),
                m.model_id.clone(),
                m.device_id.clone(),
                format_bytes(m.current_bytes),
                format_bytes(m.peak_bytes_in_window),
                if m.loaded { "loaded".into() } else { "gone".into() },
            ]
        })
        .collect();
    if !models.is_empty() {
        let _ = writeln!(out, "\ntop models");
        out.push_str(&table(&["NAME", "ID", "DEVICE", "NOW", "PEAK", "STATE"], &models));
    }
    let leaks: Vec<Vec<String>> = a
        .leak_suspects
        .iter()
        .map(|l| {
            vec![
                l.allocation_id.clone(),
                l.device_id.clone(),
                format_bytes(l.size_bytes),
                l.owner.as_deref().unwrap_or("(none)").to_string(),
                format!("{:.0} s", l.age_seconds),
                l.reason.clone(),
            ]
        })
        .collect();
    if !leaks.is_empty() {
        let _ = writeln!(out, "\nleak suspects");
        out.push_str(&table(&["ALLOCATION", "DEVICE", "SIZE", "OWNER", "AGE", "REASON"], &leaks));
    }
    if !a.event_log.covers_window {
        let _ = writeln!(out, "\n(the event log no longer reaches the window's start: histograms are partial)");
    }
    Ok(out)
}

/// One device's paragraph of `memwarden analytics`.
fn device(out: &mut String, d: &DeviceAnalyticsDto) {
    let act = &d.activity;
    let t = &d.pressure_time;
    let _ = writeln!(
        out,
        "\n{}: used {} of {} ({} samples at {} ms), pressure {}",
        d.device_id,
        format_bytes(d.used_bytes),
        format_bytes(d.total_bytes),
        d.samples,
        d.resolution_ms,
        d.pressure_level,
    );
    let _ = writeln!(
        out,
        "  peak used {} at {} (window peak {}); peak allocated {} at {}",
        format_bytes(d.peak_used.value_bytes),
        or_dash(&d.peak_used.at),
        format_bytes(d.window_peak_used_bytes),
        format_bytes(d.peak_allocated.value_bytes),
        or_dash(&d.peak_allocated.at),
    );
    if let Some(p) = &d.usage_percentiles {
        let _ = writeln!(
            out,
            "  used p50 {}  p90 {}  p99 {}  max {}",
            format_bytes(p.p50_bytes),
            format_bytes(p.p90_bytes),
            format_bytes(p.p99_bytes),
            format_bytes(p.max_bytes),
        );
    }
    let _ = writeln!(
        out,
        "  {} allocations ({}, {:.2}/s, average {}), {} frees, {} failed, {} moved, {} exported",
        act.allocations,
        format_bytes(act.allocated_bytes),
        act.allocations_per_second,
        format_bytes(act.average_allocation_size_bytes),
        act.frees,
        act.failed_allocations,
        act.moves,
        act.exports,
    );
    let _ = writeln!(
        out,
        "  pools {} reserved, {} allocated; fragmentation {} ({}); models {}",
        format_bytes(d.pool_reserved_bytes),
        format_bytes(d.pool_allocated_bytes),
        pct(d.fragmentation),
        d.fragmentation_trend.as_ref().map(|t| t.trend.as_str()).unwrap_or("-"),
        format_bytes(d.model_bytes),
    );
    let _ = writeln!(
        out,
        "  transfers {} out, {} in; defragmentation {} runs, {} moved, {} released",
        format_bytes(d.transfers.out_bytes),
        format_bytes(d.transfers.in_bytes),
        d.defragmentation.runs,
        format_bytes(d.defragmentation.moved_bytes),
        format_bytes(d.defragmentation.released_bytes),
    );
    let _ = writeln!(
        out,
        "  time at pressure: low {:.0} s, moderate {:.0} s, high {:.0} s, critical {:.0} s",
        t.low_seconds, t.moderate_seconds, t.high_seconds, t.critical_seconds,
    );
}

/// `memwarden recommend`: each recommendation with its evidence and the request that applies it.
pub fn recommend(client: &Client, as_json: bool) -> Result<String, CliError> {
    let answer = client.get::<RecommendationsDto>("/api/memory/optimization")?;
    if as_json {
        return Ok(pretty(&answer.raw));
    }
    let r = answer.data;
    if r.recommendations.is_empty() {
        return Ok("no recommendations: no rule found its evidence in the measured state\n".into());
    }
    let mut out = String::new();
    for (i, rec) in r.recommendations.iter().enumerate() {
        let _ = writeln!(
            out,
            "{}. [{}] {} on {}: saves about {}",
            i + 1,
            rec.priority,
            rec.kind,
            rec.device_id,
            format_bytes(rec.estimated_savings_bytes),
        );
        let _ = writeln!(out, "   {}", rec.message);
        let parts: Vec<String> = rec.evidence.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "   evidence: {}", parts.join(", "));
        let a = &rec.action;
        let body = match &a.body {
            Some(b) if !b.is_null() => format!(" {b}"),
            _ => String::new(),
        };
        let _ = writeln!(out, "   apply: {} {}{}", a.method, a.path, body);
    }
    let _ = writeln!(out, "total estimated savings: {}", format_bytes(r.total_estimated_savings_bytes));
    Ok(out)
}
