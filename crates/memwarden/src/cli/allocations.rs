//! `alloc`, `free`, `allocation`, `allocations`, `owners`, `export`.

use super::http::{one_or_all, path_segment, CliError, Client};
use super::render::{pretty, table};
use memwarden_core::units::{format_bytes, parse_size};
use memwarden_protocol::api::{AllocationDto, AllocationListDto, ExportDto, FreedDto, OwnersDto};
use serde_json::{json, Value};
use std::fmt::Write as _;

pub struct AllocArgs<'a> {
    pub device: &'a str,
    pub size: &'a str,
    pub kind: Option<&'a str>,
    pub purpose: Option<&'a str>,
    pub owner: Option<&'a str>,
    pub alignment: Option<&'a str>,
    pub persistent: bool,
    pub immovable: bool,
    pub owner_pid: Option<u32>,
}

pub fn alloc(client: &Client, args: AllocArgs<'_>, as_json: bool) -> Result<String, CliError> {
    let size = parse_size(args.size).map_err(|e| CliError(e.to_string()))?;
    // Untyped: `AllocateBody` takes signed sizes (so that the daemon can name a negative one),
    // and a size past i64 must reach the daemon as it was given.
    let mut body = json!({ "sizeBytes": size, "persistent": args.persistent, "movable": !args.immovable });
    if let Some(k) = args.kind {
        body["memoryType"] = json!(k);
    }
    if let Some(p) = args.purpose {
        body["purpose"] = json!(p);
    }
    if let Some(o) = args.owner {
        body["owner"] = json!(o);
    }
    if let Some(pid) = args.owner_pid {
        body["ownerPid"] = json!(pid);
    }
    if let Some(a) = args.alignment {
        body["alignment"] = json!(parse_size(a).map_err(|e| CliError(format!("alignment: {e}")))?);
    }
    let path = format!("/api/memory/allocations/allocate/{}", path_segment(args.device));
    let a = client.call::<AllocationDto, Value>("POST", &path, Some(&body))?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let d = a.data;
    Ok(format!(
        "allocated {} ({}) of {} memory on {} at {}\n{}\n",
        format_bytes(d.size_bytes),
        d.size_bytes,
        d.memory_type,
        d.device_id,
        d.address.as_deref().unwrap_or("(no memory: reservation)"),
        d.allocation_id,
    ))
}

/// `memwarden allocation ID`: one allocation's record.
pub fn allocation(client: &Client, id: &str, as_json: bool) -> Result<String, CliError> {
    let a = client.get::<AllocationDto>(&format!("/api/memory/allocation/{}", path_segment(id)))?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let d = a.data;
    let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows = [
        ("allocation", d.allocation_id.clone()),
        ("device", d.device_id.clone()),
        ("kind", d.memory_type.clone()),
        ("size", format!("{} ({} bytes; {} in its pool)", format_bytes(d.size_bytes), d.size_bytes, d.allocated_size)),
        ("alignment", d.alignment.to_string()),
        ("address", or(&d.address)),
        ("offset", d.offset.map_or("-".into(), |o| o.to_string())),
        ("purpose", or(&d.purpose)),
        ("owner", or(&d.owner)),
        ("owner pid", d.owner_pid.map_or("-".into(), |p| p.to_string())),
        ("persistent", d.persistent.to_string()),
        ("movable", d.movable.to_string()),
        ("exported", d.exported.to_string()),
        ("generation", d.generation.to_string()),
        ("allocated at", d.allocated_at.clone()),
    ];
    Ok(rows.iter().map(|(k, v)| format!("{k:<13}{v}\n")).collect())
}

/// `memwarden export ID`: what another process needs to map the allocation.
pub fn export(client: &Client, id: &str, as_json: bool) -> Result<String, CliError> {
    let path = format!("/api/memory/allocations/{}/export", path_segment(id));
    let a = client.call::<ExportDto, ()>("POST", &path, None)?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let e = a.data;
    let what = match (e.kind.as_str(), &e.path, &e.ipc_handle) {
        ("shm", Some(p), _) => format!("map {p}"),
        (_, _, Some(h)) => format!("open CUDA IPC handle {h}"),
        (kind, p, h) => format!("{kind} {}", p.as_deref().or(h.as_deref()).unwrap_or("-")),
    };
    Ok(format!(
        "exported {} ({} on {}): {what}, then add offset {}\n",
        e.allocation_id,
        format_bytes(e.size_bytes),
        e.device_id,
        e.offset
    ))
}

pub fn free(client: &Client, id: &str, as_json: bool) -> Result<String, CliError> {
    let a = client.call::<FreedDto, ()>("DELETE", &format!("/api/memory/allocations/{}", path_segment(id)), None)?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let d = a.data;
    Ok(format!("freed {} ({}) on {}\n", d.allocation_id, format_bytes(d.freed_bytes), d.device_id))
}

/// The filters of `allocations`.
pub struct ListFilter<'a> {
    pub owner: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub purpose: Option<&'a str>,
}

/// Every matching allocation: the listing's pages one after another, following `nextCursor`
/// (the daemon answers at most 1000 a page by default). With `--json`, one listing of them all,
/// shaped as a page (`nextCursor` null).
pub fn allocations(
    client: &Client,
    device: Option<&str>,
    filter: ListFilter<'_>,
    as_json: bool,
) -> Result<String, CliError> {
    let route = one_or_all("/api/memory/allocations", Some("/api/memory/allocations/device"), device);
    let filters: Vec<(&str, &str)> =
        [("owner", filter.owner), ("memoryType", filter.kind), ("purpose", filter.purpose)]
            .into_iter()
            .filter_map(|(name, value)| value.map(|v| (name, v)))
            .collect();
    let page = |cursor: Option<&str>| {
        let query: Vec<String> = filters
            .iter()
            .copied()
            .chain(cursor.map(|c| ("cursor", c)))
            .map(|(name, value)| format!("{name}={}", path_segment(value)))
            .collect();
        let path = if query.is_empty() { route.clone() } else { format!("{route}?{}", query.join("&")) };
        client.get::<AllocationListDto>(&path)
    };
    // The pages joined into one; its figures are the newest page's (allocations may come and go
    // between pages, and the daemon counts them as they are when it answers).
    let first = page(None)?;
    let (mut list, mut raw) = (first.data, first.raw);
    while let Some(cursor) = list.next_cursor.take() {
        let mut next = page(Some(&cursor))?;
        list.allocations.append(&mut next.data.allocations);
        (list.count, list.total_bytes, list.next_cursor) =
            (next.data.count, next.data.total_bytes, next.data.next_cursor);
        if let (Some(all), Value::Array(more)) = (raw["allocations"].as_array_mut(), next.raw["allocations"].take()) {
            all.extend(more);
        }
        (raw["count"], raw["totalBytes"]) = (next.raw["count"].take(), next.raw["totalBytes"].take());
    }
    raw["nextCursor"] = Value::Null;
    if as_json {
        return Ok(pretty(&raw));
    }
    let rows: Vec<Vec<String>> = list
        .allocations
        .iter()
        .map(|a| {
            vec![
                a.allocation_id.clone(),
                a.device_id.clone(),
                a.memory_type.clone(),
                format_bytes(a.size_bytes),
                a.address.as_deref().unwrap_or("-").to_string(),
                a.purpose.as_deref().unwrap_or("-").to_string(),
                a.owner.as_deref().unwrap_or("-").to_string(),
                a.allocated_at.clone(),
            ]
        })
        .collect();
    let mut out = table(&["ID", "DEVICE", "KIND", "SIZE", "ADDRESS", "PURPOSE", "OWNER", "ALLOCATED AT"], &rows);
    let _ = writeln!(out, "{} allocation(s), {}", list.count, format_bytes(list.total_bytes));
    Ok(out)
}

pub fn owners(client: &Client, as_json: bool) -> Result<String, CliError> {
    let a = client.get::<OwnersDto>("/api/memory/owners")?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let scope = |device: &str, kind: &str| format!("{device} {kind}");
    let rows: Vec<Vec<String>> = a
        .data
        .owners
        .iter()
        .map(|o| {
            vec![
                o.owner.as_deref().unwrap_or("(none)").to_string(),
                o.device_id.clone(),
                o.memory_type.clone(),
                format_bytes(o.allocated_bytes),
                o.allocation_count.to_string(),
                o.quota.as_ref().map_or("-".into(), |q| {
                    format!(
                        "{} of {} ({})",
                        format_bytes(q.used_bytes),
                        format_bytes(q.max_bytes),
                        scope(&q.device_id, &q.memory_type)
                    )
                }),
            ]
        })
        .collect();
    let mut out = table(&["OWNER", "DEVICE", "KIND", "ALLOCATED", "COUNT", "QUOTA"], &rows);
    if !a.data.quotas.is_empty() {
        let quotas: Vec<Vec<String>> = a
            .data
            .quotas
            .iter()
            .map(|q| {
                vec![
                    q.owner.clone(),
                    scope(&q.device_id, &q.memory_type),
                    format_bytes(q.max_bytes),
                    format_bytes(q.used_bytes),
                    format_bytes(q.remaining_bytes),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(&["QUOTA OWNER", "COVERS", "MAX", "USED", "REMAINING"], &quotas));
    }
    Ok(out)
}
