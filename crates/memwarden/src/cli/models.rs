//! Model commands: `models`, `load`, `unload`, `move`, `optimize`, `optimize-history`.

use super::http::{path_segment, CliError, Client};
use super::operations;
use super::render::{indent, or_dash, pretty, signed_bytes, table};
use memwarden_core::units::{format_bytes, parse_size};
use memwarden_protocol::api::{
    GroupActionDto, HeldModelDto, LoadBody, LoadedDto, ModelsDto, MoveBody, MovedDto, OptimizeBody, OptimizeHistoryDto,
    OptimizeOutcome, RateDto, ResumeBody, UnloadedDto, WeightsActionDto,
};
use std::fmt::Write as _;

/// `memwarden models`: per device the loaded models, then every worker with its state.
pub fn models(client: &Client, device: Option<&str>, as_json: bool) -> Result<String, CliError> {
    let path = match device {
        Some(d) => format!("/api/memory/models?deviceId={}", path_segment(d)),
        None => "/api/memory/models".to_string(),
    };
    let a = client.get::<ModelsDto>(&path)?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let mut out = String::new();
    for d in &a.data.devices {
        let m = &d.model_memory;
        let measured = match m.process_bytes {
            Some(p) => format!(
                ", processes hold {} ({} unattributed)",
                format_bytes(p),
                signed_bytes(m.unattributed_bytes.unwrap_or(0))
            ),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "{}: {} model(s), {} reported{}; {} available for models of {}",
            d.device_id,
            m.loaded_model_count,
            format_bytes(m.total_model_memory),
            measured,
            format_bytes(m.available_for_models),
            format_bytes(d.system_memory.total_bytes),
        );
        let rows: Vec<Vec<String>> = m
            .loaded_models
            .iter()
            .map(|x| {
                vec![
                    x.model_id.clone(),
                    x.model_name.clone(),
                    format_bytes(x.size_bytes),
                    x.priority.to_string(),
                    if x.pinned { "yes".into() } else { "no".into() },
                    format!("{} ({})", x.worker_id, x.pid),
                    x.last_access.clone(),
                ]
            })
            .collect();
        if !rows.is_empty() {
            out.push_str(&indent(&table(
                &["MODEL", "NAME", "SIZE", "PRIORITY", "PINNED", "WORKER (PID)", "LAST USE"],
                &rows,
            )));
        }
    }
    let c = &a.data.coordination_status;
    let _ = writeln!(
        out,
        "workers ({}synchronized, socket {}):",
        if c.synchronized { "" } else { "not " },
        or_dash(&c.socket)
    );
    let rows: Vec<Vec<String>> = c
        .workers
        .iter()
        .map(|w| {
            vec![
                w.worker_id.clone(),
                w.role.clone(),
                w.state.as_str().to_string(),
                w.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                w.model_count.to_string(),
                w.restarts.to_string(),
                w.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out.push_str(&indent(&table(&["WORKER", "ROLE", "STATE", "PID", "MODELS", "RESTARTS", "LAST ERROR"], &rows)));
    Ok(out)
}

/// `memwarden load PATH`: on a terminal in the background, with a progress bar.
pub fn load(client: &Client, body: &LoadBody, as_json: bool) -> Result<String, CliError> {
    let route = "/api/memory/models/load";
    let a = if operations::with_bar() {
        let name = body.name.clone().unwrap_or_else(|| {
            let path = std::path::Path::new(&body.path);
            path.file_stem().map_or_else(|| body.path.clone(), |s| s.to_string_lossy().into_owned())
        });
        let body = LoadBody { run_async: true, ..body.clone() };
        operations::run::<LoadedDto, _>(client, route, &body, &format!("load {name}"))?
    } else {
        client.call::<LoadedDto, _>("POST", route, Some(body))?
    };
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let m = match a.data {
        LoadedDto::Held(h) => return Ok(held_line("loaded", &h, h.load.as_ref())),
        LoadedDto::Pipeline(p) => {
            let mut out = format!(
                "loaded pipeline {} ({} components, {}):\n",
                p.group,
                p.components.len(),
                format_bytes(p.size_bytes)
            );
            for c in &p.components {
                out.push_str(&held_line("  loaded", c, c.load.as_ref()));
            }
            return Ok(out);
        }
        LoadedDto::Worker(m) => m,
    };
    Ok(format!(
        "loaded {} ({}) on {}: {} in {:.0} ms, worker {} (pid {})\n",
        m.model_id,
        m.model_name,
        m.device_id,
        format_bytes(m.size_bytes),
        m.load_time_ms,
        m.worker_id,
        m.pid,
    ))
}

fn held_line(what: &str, h: &HeldModelDto, rate: Option<&RateDto>) -> String {
    let rate = rate.map(|r| format!(" in {:.0} ms ({:.1} GB/s)", r.ms, r.gb_per_s)).unwrap_or_default();
    format!(
        "{what} {} ({}) on {}: {}{rate}, held by memwarden, now {}; holders: {}\n",
        h.model_id,
        h.name,
        h.device_id,
        format_bytes(h.size_bytes),
        h.state.as_str(),
        if h.holders.is_empty() { "none".to_string() } else { h.holders.join(", ") },
    )
}

/// `memwarden park ID`, `memwarden resume ID [--device D]`, `memwarden drop ID`; with
/// `--group NAME` instead of an id, every component of a pipeline (one line each).
pub fn weights_action(
    client: &Client,
    id: &Option<String>,
    group: &Option<String>,
    action: &str,
    target: Option<&str>,
    as_json: bool,
) -> Result<String, CliError> {
    let (id, group) = (id.as_deref(), group.as_deref());
    if let Some(group) = group {
        let path = format!("/api/memory/models/groups/{}/{action}", path_segment(group));
        let a = client.call::<GroupActionDto, ()>("POST", &path, None)?;
        if as_json {
            return Ok(pretty(&a.raw));
        }
        return Ok(a.data.actions.iter().map(action_line).collect());
    }
    let id = id.ok_or_else(|| CliError(format!("{action}: give a model id or --group NAME")))?;
    let body = target.map(|t| ResumeBody { target_device_id: Some(t.to_string()) });
    let path = format!("/api/memory/models/{}/{action}", path_segment(id));
    let a = client.call::<WeightsActionDto, _>("POST", &path, body.as_ref())?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    Ok(action_line(&a.data))
}

/// One line for what a park, resume or drop did.
fn action_line(o: &WeightsActionDto) -> String {
    if o.action == "none" {
        return format!("{} is already {}\n", o.model.model_id, o.model.state.as_str());
    }
    let done = match o.action.as_str() {
        "park" => "parked",
        "resume" => "resumed",
        _ => "dropped",
    };
    held_line(done, &o.model, o.rate.as_ref())
}

/// `memwarden unload ID`.
pub fn unload(client: &Client, id: &str, as_json: bool) -> Result<String, CliError> {
    let a = client.call::<UnloadedDto, ()>("DELETE", &format!("/api/memory/models/{}", path_segment(id)), None)?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let r = a.data;
    let measured = match (r.process_bytes_before, r.process_bytes_after) {
        (Some(b), Some(a)) => {
            format!("; its process went from {} to {}", format_bytes(b), format_bytes(a))
        }
        _ => String::new(),
    };
    Ok(format!(
        "unloaded {} from {} on {}: {} released (claimed){measured}\n",
        r.model_id,
        r.worker_id,
        r.device_id,
        format_bytes(r.freed_bytes),
    ))
}

/// `memwarden move ID DEVICE`: a worker's model is loaded on the device, then unloaded where it
/// was (a new id); a model memwarden holds moves by park and resume (the same id).
pub fn move_model(client: &Client, id: &str, device: &str, as_json: bool) -> Result<String, CliError> {
    let body = MoveBody { target_device_id: device.to_string() };
    let path = format!("/api/memory/models/{}/move", path_segment(id));
    let a = client.call::<MovedDto, _>("POST", &path, Some(&body))?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let r = a.data;
    let renamed =
        if r.model.model_id == r.previous_model_id { String::new() } else { format!(", now {}", r.model.model_id) };
    Ok(format!(
        "moved {} ({}) from {} to {}{renamed}: {}; {} freed on {}\n",
        r.previous_model_id,
        r.model.model_name,
        r.previous_device_id,
        r.model.device_id,
        format_bytes(r.model.size_bytes),
        format_bytes(r.freed_bytes),
        r.previous_device_id,
    ))
}

/// `memwarden optimize-history`: the optimizer's last runs (manual, watchdog, admission).
pub fn optimize_history(client: &Client, as_json: bool) -> Result<String, CliError> {
    let a = client.get::<OptimizeHistoryDto>("/api/memory/models/optimize/history")?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    if a.data.runs.is_empty() {
        return Ok("no optimizer runs yet\n".into());
    }
    let rows: Vec<Vec<String>> = a
        .data
        .runs
        .iter()
        .map(|r| {
            vec![
                r.started_at.clone(),
                r.device_id.clone(),
                r.trigger.clone(),
                r.optimization_strategy.clone(),
                if r.optimization_triggered { "yes".into() } else { "no".into() },
                format_bytes(r.memory_freed),
                format_bytes(r.memory_claimed),
                r.steps.len().to_string(),
                format!("{} -> {} ({})", r.previous_pressure_level, r.new_pressure_level, r.new_pressure_category),
                format!("{:.0} ms", r.optimization_time_ms),
                r.message.clone(),
            ]
        })
        .collect();
    Ok(table(
        &[
            "STARTED", "DEVICE", "TRIGGER", "STRATEGY", "RAN", "FREED", "CLAIMED", "STEPS", "PRESSURE", "TIME",
            "MESSAGE",
        ],
        &rows,
    ))
}

/// What `memwarden optimize` asks for.
pub struct OptimizeArgs<'a> {
    pub device: &'a str,
    pub strategy: Option<&'a str>,
    pub min_free: Option<&'a str>,
    pub target: Option<f64>,
    pub force: bool,
    pub exclude: &'a [String],
}

/// `memwarden optimize DEVICE`: one ladder run, each step with its claimed and measured bytes.
pub fn optimize(client: &Client, args: OptimizeArgs<'_>, as_json: bool) -> Result<String, CliError> {
    let min = args.min_free.map(parse_size).transpose().map_err(|e| CliError(format!("--min-free: {e}")))?;
    let body = OptimizeBody {
        device_id: Some(args.device.to_string()),
        target_pressure_level: args.target,
        strategy: args.strategy.map(str::to_string),
        max_models_to_unload: None,
        min_memory_to_free: min,
        force_optimization: args.force,
        exclude_models: args.exclude.to_vec(),
        models: Vec::new(),
        max_optimization_time_ms: None,
    };
    let a = client.call::<OptimizeOutcome, _>("POST", "/api/memory/models/optimize", Some(&body))?;
    if as_json {
        return Ok(pretty(&a.raw));
    }
    let r = a.data;
    let mut out = String::new();
    if !r.optimization_triggered {
        let _ = writeln!(out, "not triggered: {}", r.message);
        return Ok(out);
    }
    let rows: Vec<Vec<String>> = r
        .steps
        .iter()
        .map(|st| {
            vec![
                st.action.clone(),
                st.target.clone(),
                format_bytes(st.claimed_bytes),
                signed_bytes(st.measured_bytes),
                format!("{:.1} ms", st.duration_ms),
                if st.verified { "yes".into() } else { "NO".into() },
                st.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out.push_str(&table(&["STEP", "TARGET", "CLAIMED", "MEASURED", "TIME", "VERIFIED", "ERROR"], &rows));
    // A change that is no gain shows as freed 0, with the signed measurement beside it.
    let measured = if r.memory_measured == r.memory_freed as i64 {
        String::new()
    } else {
        format!(" (measured {})", signed_bytes(r.memory_measured))
    };
    let _ = writeln!(
        out,
        "{} ({}): freed {}{measured} ({} claimed) of {} wanted in {:.0} ms; pressure {} → {} ({})",
        r.device_id,
        r.optimization_strategy,
        format_bytes(r.memory_freed),
        format_bytes(r.memory_claimed),
        format_bytes(r.target_bytes),
        r.optimization_time_ms,
        r.previous_pressure_level,
        r.new_pressure_level,
        r.new_pressure_category,
    );
    for skipped in &r.rungs_skipped {
        let _ = writeln!(out, "skipped {}: {}", skipped.rung, skipped.reason);
    }
    Ok(out)
}
