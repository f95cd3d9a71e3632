//! Per-device commands: `clear`, `defrag`, `pools`, `pressure`; and `health`.

use super::http::{one_or_all, CliError, Client, StreamEvent};
use super::operations;
use super::render::{block_bar, or_dash, pretty, table, uptime};
use memwarden_core::units::format_bytes;
use memwarden_protocol::api::{
    ClearDto, DefragAllDto, DefragBody, DefragDto, DevicePoolsDto, HealthDto, PoolsDto, PressureAllDto, PressureDto,
    PressureHistoryDto,
};
use std::fmt::Write as _;

/// `memwarden health`: the daemon, its backends (with the reason one is unavailable) and its
/// model workers.
pub fn health(client: &Client, as_json: bool) -> Result<String, CliError> {
    let a = client.get::<HealthDto>("/health")?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let h = a.data;
    let mut out = format!(
        "memwarden {} {}: pid {}, up {} (since {}); devices {}\n",
        h.version,
        h.status,
        h.pid,
        uptime(h.uptime_seconds),
        h.started_at,
        h.devices.join(", ")
    );
    let rows: Vec<Vec<String>> = h
        .backends
        .iter()
        .map(|b| {
            vec![
                b.name.clone(),
                if b.available { "yes".into() } else { "no".into() },
                b.devices.join(", "),
                or_dash(&b.reason).to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&["BACKEND", "AVAILABLE", "DEVICES", "REASON"], &rows));
    let w = &h.workers;
    let _ = writeln!(
        out,
        "workers {}: {} ready{}",
        if w.enabled { "enabled" } else { "disabled" },
        w.ready,
        w.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
    );
    if !w.workers.is_empty() {
        let rows: Vec<Vec<String>> = w
            .workers
            .iter()
            .map(|x| {
                vec![
                    x.worker_id.clone(),
                    x.role.clone(),
                    x.state.clone(),
                    x.pid.map_or("-".into(), |p| p.to_string()),
                    x.restarts.to_string(),
                    or_dash(&x.last_error).to_string(),
                ]
            })
            .collect();
        out.push_str(&table(&["WORKER", "ROLE", "STATE", "PID", "RESTARTS", "LAST ERROR"], &rows));
    }
    Ok(out)
}

pub fn clear(client: &Client, device: Option<&str>, as_json: bool) -> Result<String, CliError> {
    let a = client.call::<ClearDto, ()>("POST", &one_or_all("/api/memory/operations/clear", None, device), None)?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let mut out = String::new();
    for d in &a.data.devices {
        let _ = writeln!(
            out,
            "{}: released {} to the OS; pools still hold {}",
            d.device_id,
            format_bytes(d.cleared_bytes),
            format_bytes(d.reserved_bytes)
        );
    }
    Ok(out)
}

/// Runs a defragmentation pass and prints what it did.
pub fn defrag(
    client: &Client,
    device: Option<&str>,
    strategy: Option<&str>,
    as_json: bool,
) -> Result<String, CliError> {
    // On a terminal, in the background with a progress bar.
    let bar = operations::with_bar();
    let body = DefragBody { strategy: strategy.map(str::to_string), run_async: bar, ..DefragBody::default() };
    let path = one_or_all("/api/memory/operations/defragment", None, device);
    let label = format!("defrag {}", device.unwrap_or("all"));
    let (raw, reports) = match device {
        Some(_) if bar => {
            let a = operations::run::<DefragDto, _>(client, &path, &body, &label)?;
            (a.raw, vec![a.data])
        }
        Some(_) => {
            let a = client.call::<DefragDto, _>("POST", &path, Some(&body))?;
            (a.raw, vec![a.data])
        }
        None if bar => {
            let a = operations::run::<DefragAllDto, _>(client, &path, &body, &label)?;
            (a.raw, a.data.devices)
        }
        None => {
            let a = client.call::<DefragAllDto, _>("POST", &path, Some(&body))?;
            (a.raw, a.data.devices)
        }
    };
    if as_json {
        return Ok(pretty(&raw));
    }
    let mut out = String::new();
    for r in reports {
        let _ = writeln!(
            out,
            "{} ({}): moved {} allocation(s), {}; released {} block(s), {}; fragmentation {:.2} -> {:.2}; largest free {} -> {}; {:.1} ms",
            r.device_id,
            r.strategy,
            r.allocations_moved,
            format_bytes(r.bytes_moved),
            r.blocks_released,
            format_bytes(r.bytes_released),
            r.fragmentation_before,
            r.fragmentation_after,
            format_bytes(r.largest_free_block_before),
            format_bytes(r.largest_free_block_after),
            r.duration_ms,
        );
        if let Some(e) = &r.error {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    Ok(out)
}

/// Draws every pool block of every device (or one) as a bar of used and free ranges.
pub fn pools(client: &Client, device: Option<&str>, as_json: bool) -> Result<String, CliError> {
    let path = one_or_all("/api/memory/pools", None, device);
    let (raw, devices) = match device {
        Some(_) => {
            let a = client.get::<DevicePoolsDto>(&path)?;
            (a.raw, vec![a.data])
        }
        None => {
            let a = client.get::<PoolsDto>(&path)?;
            (a.raw, a.data.devices)
        }
    };
    if as_json {
        return Ok(pretty(&raw));
    }
    let mut out = String::new();
    for d in devices {
        for p in &d.pools {
            let st = &p.stats;
            let _ = writeln!(
                out,
                "{} {} pool: {} block(s), {} held, {} allocated, {} free in {} range(s), largest {}, fragmentation {:.2}",
                d.device_id,
                st.memory_type,
                st.block_count,
                format_bytes(st.reserved_bytes),
                format_bytes(st.allocated_bytes),
                format_bytes(st.free_in_pool_bytes),
                st.free_range_count,
                format_bytes(st.largest_free_block),
                st.fragmentation,
            );
            for b in &p.blocks {
                let used: u64 = b.ranges.iter().filter(|r| !r.free).map(|r| r.size_bytes).sum();
                let _ = writeln!(
                    out,
                    "  block {:<4} {:>10} [{}] {:>3}% used{}",
                    b.block_id,
                    format_bytes(b.size_bytes),
                    block_bar(b.size_bytes, &b.ranges),
                    used * 100 / b.size_bytes.max(1),
                    if b.dedicated { ", dedicated" } else { "" },
                );
            }
        }
    }
    Ok(out)
}

/// Pressure of every device (or one); with `watch`, then every level change as it happens.
pub fn pressure(client: &Client, device: Option<&str>, watch: bool, as_json: bool) -> Result<String, CliError> {
    let path = one_or_all("/api/memory/pressure", None, device);
    let (raw, devices) = match device {
        Some(_) => {
            let a = client.get::<PressureDto>(&path)?;
            (a.raw, vec![a.data])
        }
        None => {
            let a = client.get::<PressureAllDto>(&path)?;
            (a.raw, a.data.devices)
        }
    };
    let mut out = if as_json {
        pretty(&raw)
    } else {
        let rows: Vec<Vec<String>> = devices
            .iter()
            .map(|d| {
                vec![
                    d.device_id.clone(),
                    d.pressure_category.clone(),
                    d.pressure_level.to_string(),
                    format!("{:.1}%", d.utilization_percentage),
                    format_bytes(d.available_memory),
                    d.psi_some10.map(|p| format!("{p:.2}")).unwrap_or_else(|| "-".into()),
                    d.time_to_critical.map(|t| format!("{t:.0} s")).unwrap_or_else(|| "-".into()),
                    d.recommended_actions.len().to_string(),
                ]
            })
            .collect();
        table(&["DEVICE", "LEVEL", "PRESSURE", "USED", "AVAILABLE", "PSI SOME10", "TO CRITICAL", "ACTIONS"], &rows)
    };
    if watch {
        print!("{out}");
        out.clear();
        let wanted = device.map(|d| d.to_string());
        client.follow_events(|event, raw| {
            let dev = match &event {
                StreamEvent::Pressure(e) => e.device_id.as_str(),
                StreamEvent::Optimization(o) => o.device_id.as_str(),
            };
            if wanted
                .as_deref()
                .is_none_or(|w| w == dev || w.parse::<memwarden_core::DeviceId>().is_ok_and(|id| id.to_string() == dev))
            {
                if as_json {
                    println!("{raw}");
                } else {
                    println!("{}", watch_line(&event));
                }
            }
            true
        })?;
    }
    Ok(out)
}

/// `memwarden pressure --history`: the last level changes, oldest first.
pub fn pressure_history(client: &Client, as_json: bool) -> Result<String, CliError> {
    let a = client.get::<PressureHistoryDto>("/api/memory/pressure/history")?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let mut out = String::new();
    for e in &a.data.events {
        let _ = writeln!(out, "{}", watch_line(&StreamEvent::Pressure(e.clone())));
    }
    if out.is_empty() {
        out.push_str("no level changes yet\n");
    }
    Ok(out)
}

/// One line of `pressure --watch`.
fn watch_line(event: &StreamEvent) -> String {
    match event {
        StreamEvent::Pressure(e) => format!(
            "{} {}: {} -> {} at {:.1}% used, {} available",
            e.timestamp,
            e.device_id,
            e.old_level,
            e.new_level,
            e.utilization_percentage,
            format_bytes(e.available_memory),
        ),
        // An optimizer run carries no level change: the line keeps the shape it has had since the
        // stream began to carry these, with dashes and zeros for the fields it lacks.
        StreamEvent::Optimization(o) => {
            format!("- {}: - -> - at {:.1}% used, {} available", o.device_id, 0.0, format_bytes(0))
        }
    }
}
