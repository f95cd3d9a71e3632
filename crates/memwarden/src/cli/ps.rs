//! `memwarden ps`, like `ollama ps`: every model, one row each, from the model listing
//! (`GET /api/memory/models`): the workers' and clients' models and the weights memwarden holds.

use super::http::{path_segment, CliError, Client};
use super::render::{ago, from_now, parse_time, pretty, span_words, table};
use memwarden_core::units::format_bytes;
use memwarden_protocol::api::{CoordinationMode, HeldModelDto, ModelsDto, WeightState};
use std::fmt::Write as _;
use time::OffsetDateTime;

pub const HEADER: [&str; 9] = ["NAME", "ID", "DEVICE", "STATE", "SIZE", "PRIORITY", "HELD BY", "IDLE SINCE", "UNTIL"];

/// `memwarden ps [DEVICE]`. UNTIL is when keep-alive parks (cpu: drops) a model memwarden
/// holds; `forever` for a pinned model or one without keep-alive, `-` for a worker's own model
/// (memwarden keeps no keep-alive for those) and for one already parked or dropped.
pub fn ps(client: &Client, device: Option<&str>, as_json: bool) -> Result<String, CliError> {
    let path = match device {
        Some(d) => format!("/api/memory/models?deviceId={}", path_segment(d)),
        None => "/api/memory/models".to_string(),
    };
    let a = client.get::<ModelsDto>(&path)?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let m = a.data;
    let now = OffsetDateTime::now_utc();
    let mut rows = Vec::new();
    // A worker that maps weights memwarden holds lists them among its models too: they get
    // their row from `weights`.
    let held = |id: &str| m.weights.iter().any(|w| w.model_id == id);
    for d in &m.devices {
        for x in d.model_memory.loaded_models.iter().filter(|x| !held(&x.model_id)) {
            rows.push(vec![
                x.model_name.clone(),
                x.model_id.clone(),
                x.device_id.clone(),
                "loaded".into(),
                format_bytes(x.size_bytes),
                priority(x.priority, x.pinned),
                format!("{} (pid {})", x.worker_id, x.pid),
                ago(&x.last_access, now),
                "-".into(),
            ]);
        }
    }
    for w in &m.weights {
        if device.is_some() && !m.devices.iter().any(|d| d.device_id == w.device_id) {
            continue;
        }
        let holders = match w.holders.len() {
            0 => "memwarden".to_string(),
            n => format!("memwarden, {n} mapping"),
        };
        rows.push(vec![
            w.name.clone(),
            w.model_id.clone(),
            w.device_id.clone(),
            w.state.as_str().into(),
            format_bytes(w.size_bytes),
            priority(w.priority, w.pinned),
            holders,
            ago(&w.last_used, now),
            until(w, now),
        ]);
    }
    let mut out = table(&HEADER, &rows);
    if m.coordination_status.mode == CoordinationMode::Fallback {
        let why = m.coordination_status.reason.as_deref().unwrap_or("none is running");
        let _ = writeln!(out, "(no worker could be asked for its models: {why})");
    }
    Ok(out)
}

fn priority(p: u8, pinned: bool) -> String {
    if pinned {
        format!("{p} pinned")
    } else {
        p.to_string()
    }
}

/// When keep-alive lets go of a held model (see [`ps`]).
fn until(w: &HeldModelDto, now: OffsetDateTime) -> String {
    match w.state {
        WeightState::Orphaned => match w.orphaned_until.as_deref().and_then(parse_time) {
            Some(t) => format!("{} (orphaned)", from_now(t, now)),
            None => "- (orphaned)".into(),
        },
        WeightState::Resident if w.pinned => "forever".into(),
        WeightState::Resident => match (w.keep_alive_ms, parse_time(&w.last_used)) {
            (None, _) => "forever".into(),
            (Some(ms), Some(used)) => from_now(used + time::Duration::milliseconds(ms as i64), now),
            (Some(ms), None) => format!("{} after last use", span_words(ms as f64 / 1000.0)),
        },
        WeightState::Parked | WeightState::Dropped => "-".into(),
    }
}
