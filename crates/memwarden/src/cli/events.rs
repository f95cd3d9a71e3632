//! `memwarden events`: follows `GET /api/memory/events` and prints one line per event until
//! Ctrl-C (or until the daemon closes the stream); with `--json`, each event's data as it came,
//! one JSON document per line.

use super::http::{CliError, Client};
use super::render::compact;
use memwarden_core::units::format_bytes;
use memwarden_protocol::api::{ModelStateEventDto, OptimizeOutcome, PressureEventDto};
use serde::Deserialize as _;
use serde_json::Value;
use std::io::Write as _;

pub fn events(client: &Client, device: Option<&str>, as_json: bool) -> Result<String, CliError> {
    let wanted = device.map(canonical);
    let stream = client.events()?;
    // On stderr, so that stdout carries the events alone; it also says the stream is open.
    eprintln!("following {}/api/memory/events (Ctrl-C to stop)", client.base());
    let stdout = std::io::stdout();
    for item in stream {
        let (name, raw) = item?;
        let dev = raw.get("deviceId").and_then(Value::as_str);
        if let (Some(w), Some(d)) = (&wanted, dev) {
            if *w != canonical(d) {
                continue;
            }
        }
        let text = if as_json { compact(&raw) } else { line(&name, &raw) };
        let mut out = stdout.lock();
        // The reader went away (a closed pipe): stop quietly.
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            return Ok(String::new());
        }
    }
    Err(CliError("the daemon closed the event stream (it is shutting down?)".into()))
}

/// A device id as the daemon spells it (`gpu0` → `cuda:0`), or as given when it does not parse.
fn canonical(d: &str) -> String {
    d.parse::<memwarden_core::DeviceId>().map(|id| id.to_string()).unwrap_or_else(|_| d.to_string())
}

/// One event as a line: its time, its kind, its device, what happened.
pub fn line(name: &str, raw: &Value) -> String {
    match name {
        "pressure" => {
            if let Ok(e) = PressureEventDto::deserialize(raw) {
                return format!(
                    "{} pressure {}: {} -> {} at {:.1}% used, {} available of {}",
                    e.timestamp,
                    e.device_id,
                    e.old_level,
                    e.new_level,
                    e.utilization_percentage,
                    format_bytes(e.available_memory),
                    format_bytes(e.total_memory),
                );
            }
        }
        "optimization" => {
            if let Ok(o) = OptimizeOutcome::deserialize(raw) {
                return format!(
                    "{} optimization {} ({}, {}): freed {} ({} claimed) in {} step(s); pressure {} -> {} ({})",
                    o.started_at,
                    o.device_id,
                    o.trigger,
                    o.optimization_strategy,
                    format_bytes(o.memory_freed),
                    format_bytes(o.memory_claimed),
                    o.steps.len(),
                    o.previous_pressure_level,
                    o.new_pressure_level,
                    o.new_pressure_category,
                );
            }
        }
        "modelState" => {
            if let Ok(e) = ModelStateEventDto::deserialize(raw) {
                let from = e.previous_state.map_or("new", |p| p.as_str());
                let to = if e.unloaded { "unloaded" } else { e.state.as_str() };
                return format!(
                    "{} model {} {} ({}) on {}: {} -> {}, resume in ~{} ms",
                    e.at,
                    e.model_id,
                    e.name,
                    format_bytes(e.bytes),
                    e.device_id,
                    from,
                    to,
                    e.resume_estimate_ms,
                );
            }
        }
        _ => {}
    }
    // A kind this client does not know (a newer daemon's): its name and data as they came.
    format!("{name} {}", compact(raw))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_model_state_event_reads_as_one_line() {
        let raw = serde_json::json!({
            "type": "modelState", "modelId": "w-3", "name": "llama", "deviceId": "cuda:0", "state": "parked",
            "previousState": "resident", "unloaded": false, "bytes": 1u64 << 30, "resumeEstimateMs": 43,
            "at": "2026-01-01T00:00:00Z"
        });
        let l = super::line("modelState", &raw);
        assert!(l.contains("w-3 llama") && l.contains("resident -> parked") && l.contains("~43 ms"), "{l}");
        let gone = serde_json::json!({
            "type": "modelState", "modelId": "w-3", "name": "llama", "deviceId": "cuda:0", "state": "dropped",
            "previousState": null, "unloaded": true, "bytes": 1, "resumeEstimateMs": 0, "at": "t"
        });
        assert!(super::line("modelState", &gone).contains("new -> unloaded"));
    }
}
