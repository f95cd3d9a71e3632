//! Per-device commands: `status`, `clear`, `defrag`, `pools`, `pressure`.

use super::http::{one_or_all, CliError, Client, StreamEvent};
use super::render::{block_bar, or_dash, pretty, table};
use memwarden_core::units::format_bytes;
use memwarden_protocol::api::{
    ClearDto, DefragAllDto, DefragBody, DefragDto, DevicePoolsDto, DeviceStatusDto, PoolsDto, PressureAllDto,
    PressureDto, StatusListDto,
};
use std::fmt::Write as _;

pub fn status(client: &Client, device: Option<&str>, as_json: bool) -> Result<String, CliError> {
    let path = one_or_all("/api/memory/status", None, device);
    let (raw, devices, backends) = match device {
        Some(_) => {
            let a = client.get::<DeviceStatusDto>(&path)?;
            (a.raw, vec![a.data], Vec::new())
        }
        None => {
            let a = client.get::<StatusListDto>(&path)?;
            (a.raw, a.data.devices, a.data.backends)
        }
    };
    if as_json {
        return Ok(pretty(&raw));
    }
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            vec![
                d.device_id.clone(),
                d.memory_type.clone(),
                format_bytes(d.total_memory),
                format_bytes(d.used_memory),
                format_bytes(d.available_memory),
                format!("{:.1}%", d.memory_utilization * 100.0),
                format_bytes(d.reserved_bytes),
                format_bytes(d.allocated_bytes),
                d.source.clone(),
            ]
        })
        .collect();
    let mut out = table(
        &["DEVICE", "MEMORY", "TOTAL", "USED", "AVAILABLE", "UTIL", "POOL HELD", "POOL ALLOCATED", "SOURCE"],
        &rows,
    );
    // Backends that could not start, and why (only in the all-device answer).
    for b in backends.iter().filter(|b| !b.available) {
        let _ = writeln!(out, "{}: {}", b.name, or_dash(&b.reason));
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
    let body = DefragBody { strategy: strategy.map(str::to_string), ..DefragBody::default() };
    let path = one_or_all("/api/memory/operations/defragment", None, device);
    let (raw, reports) = match device {
        Some(_) => {
            let a = client.call::<DefragDto, _>("POST", &path, Some(&body))?;
            (a.raw, vec![a.data])
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
