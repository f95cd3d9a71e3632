//! `analytics`, `analytics-events`, `reset-peaks`, `usage`, and `recommend` (`--apply`).

use super::http::{one_or_all, path_segment, CliError, Client};
use super::render::{or_dash, pct, pretty, table};
use super::transfers;
use memwarden_core::units::format_bytes;
use memwarden_protocol::api::analytics::{
    AnalyticsDto, DeviceAnalyticsDto, EventListDto, HolderDto, RecommendationDto, RecommendationsDto, ResetDto,
    UsageDto, UsageListDto,
};
use memwarden_protocol::api::{ClearDto, DefragDto, MovedDto, OptimizeReply, TransferDto};
use serde::Deserialize as _;
use serde_json::Value;
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

/// `memwarden recommend --apply N|TYPE`: sends the request of the Nth recommendation (as
/// `recommend` numbers them) or of the first of that type, as the daemon gives it now.
pub fn apply(client: &Client, which: &str, as_json: bool) -> Result<String, CliError> {
    let list = client.get::<RecommendationsDto>("/api/memory/optimization")?.data.recommendations;
    let pick: Option<(usize, &RecommendationDto)> = match which.parse::<usize>() {
        Ok(n) => list.get(n.wrapping_sub(1)).map(|r| (n, r)),
        Err(_) => list.iter().enumerate().find(|(_, r)| r.kind == which).map(|(i, r)| (i + 1, r)),
    };
    let Some((n, rec)) = pick else {
        let known: Vec<String> = list.iter().enumerate().map(|(i, r)| format!("{}. {}", i + 1, r.kind)).collect();
        return Err(CliError(format!(
            "no recommendation {which} now ({})",
            if known.is_empty() { "there are none".to_string() } else { known.join(", ") }
        )));
    };
    let action = &rec.action;
    let body = action.body.as_ref().filter(|b| !b.is_null());
    let answer = client.call::<Value, Value>(&action.method, &action.path, body)?;
    // A transfer that runs in the background is followed like `memwarden transfer`'s.
    let raw = match TransferDto::deserialize(&answer.raw) {
        Ok(t) if action.path.starts_with("/api/memory/transfer") && t.status == "running" => {
            transfers::follow(client, t)?.raw
        }
        _ => answer.raw,
    };
    if as_json {
        return Ok(pretty(&raw));
    }
    let mut out = format!("applied {n}. {} on {}: {} {}\n", rec.kind, rec.device_id, action.method, action.path);
    out.push_str(&applied(&action.path, &raw));
    Ok(out)
}

/// What an applied action's answer says, by the route it went to.
fn applied(path: &str, raw: &Value) -> String {
    if path.starts_with("/api/memory/operations/clear") {
        if let Ok(c) = ClearDto::deserialize(raw) {
            return format!("released {} to the OS or driver\n", format_bytes(c.cleared_bytes));
        }
    } else if path.starts_with("/api/memory/operations/defragment") {
        if let Ok(d) = DefragDto::deserialize(raw) {
            return format!(
                "moved {} allocation(s), {}; released {}; fragmentation {:.2} -> {:.2}\n",
                d.allocations_moved,
                format_bytes(d.bytes_moved),
                format_bytes(d.bytes_released),
                d.fragmentation_before,
                d.fragmentation_after
            );
        }
    } else if path.starts_with("/api/memory/models/optimize") {
        if let Ok(o) = OptimizeReply::deserialize(raw) {
            let (freed, message) = match o {
                OptimizeReply::Device(o) => (o.memory_freed, o.message),
                OptimizeReply::Devices(o) => (o.memory_freed, o.message),
            };
            return format!("freed {}: {message}\n", format_bytes(freed));
        }
    } else if path.starts_with("/api/memory/transfer") {
        if let Ok(t) = TransferDto::deserialize(raw) {
            return transfers::line(&t);
        }
    } else if path.ends_with("/move") {
        if let Ok(m) = MovedDto::deserialize(raw) {
            return format!(
                "{} is now {} on {}; {} freed on {}\n",
                m.previous_model_id,
                m.model.model_id,
                m.model.device_id,
                format_bytes(m.freed_bytes),
                m.previous_device_id
            );
        }
    }
    pretty(raw)
}

/// `memwarden usage [DEVICE] [--window W]`.
pub fn usage(client: &Client, device: Option<&str>, window: &str, as_json: bool) -> Result<String, CliError> {
    let path = format!("{}?window={}", one_or_all("/api/memory/usage", None, device), path_segment(window));
    let (raw, label, devices) = match device {
        Some(_) => {
            let a = client.get::<UsageDto>(&path)?;
            (a.raw, window.to_string(), vec![a.data])
        }
        None => {
            let a = client.get::<UsageListDto>(&path)?;
            (a.raw, a.data.window, a.data.devices)
        }
    };
    if as_json {
        return Ok(pretty(&raw));
    }
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|u| {
            vec![
                u.device_id.clone(),
                format_bytes(u.current_usage_bytes),
                format_bytes(u.peak_usage_bytes),
                u.allocation_count.to_string(),
                format_bytes(u.allocated_bytes),
                format_bytes(u.peak_allocated_bytes),
                format!("{} ({:.2}/s)", u.allocations_in_window, u.allocations_per_second),
                format!("{} ({:.2}/s)", u.frees_in_window, u.frees_per_second),
                format_bytes(u.average_allocation_size_bytes),
            ]
        })
        .collect();
    let mut out = format!("window {label}\n");
    out.push_str(&table(
        &["DEVICE", "USED", "PEAK USED", "LIVE", "ALLOCATED", "PEAK ALLOCATED", "ALLOCATIONS", "FREES", "AVERAGE SIZE"],
        &rows,
    ));
    Ok(out)
}

/// `memwarden analytics-events [--device D] [--limit N]`: the allocation event log, oldest first.
pub fn events(client: &Client, device: Option<&str>, limit: Option<u64>, as_json: bool) -> Result<String, CliError> {
    let mut query = Vec::new();
    if let Some(d) = device {
        query.push(format!("deviceId={}", path_segment(d)));
    }
    if let Some(n) = limit {
        query.push(format!("limit={n}"));
    }
    let path = match query.is_empty() {
        true => "/api/memory/analytics/events".to_string(),
        false => format!("/api/memory/analytics/events?{}", query.join("&")),
    };
    let a = client.get::<EventListDto>(&path)?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let rows: Vec<Vec<String>> = a
        .data
        .events
        .iter()
        .map(|e| {
            vec![
                e.at.clone(),
                e.event.clone(),
                e.allocation_id.clone(),
                e.device_id.clone(),
                e.memory_type.clone(),
                format_bytes(e.size_bytes),
                e.owner.as_deref().unwrap_or("-").to_string(),
                e.purpose.as_deref().unwrap_or("-").to_string(),
                e.generation.to_string(),
            ]
        })
        .collect();
    let mut out =
        table(&["AT", "EVENT", "ALLOCATION", "DEVICE", "KIND", "SIZE", "OWNER", "PURPOSE", "GENERATION"], &rows);
    let _ = writeln!(out, "{} event(s); the log keeps {}", a.data.events.len(), a.data.capacity);
    Ok(out)
}

/// `memwarden reset-peaks`.
pub fn reset_peaks(client: &Client, as_json: bool) -> Result<String, CliError> {
    let a = client.call::<ResetDto, ()>("POST", "/api/memory/analytics/reset-peaks", None)?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    Ok(format!("peaks start over from their current values, since {}\n", a.data.since))
}
