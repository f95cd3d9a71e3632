//! `memwarden status`, shaped like nvidia-smi: a line on the daemon, then per device its name
//! (and UUID on a GPU), total / used / free memory with a usage bar, its pressure level and
//! fragmentation and memwarden's pools; then every process with memory on the devices: pid,
//! name, bytes, share of the device and the models it holds, memwarden's own row first.
//! `--watch` redraws that screen in place every interval.
//!
//! `--json` prints the status route's data as it came (`GET /api/memory/status[/{deviceId}]`);
//! with `--watch`, one compact line of it per interval.

use super::http::{one_or_all, path_segment, CliError, Client};
use super::render::{compact, pct, pretty, table, uptime, usage_bar};
use memwarden_core::units::{format_bytes, parse_size};
use memwarden_protocol::api::{
    BackendDto, DeviceStatusDto, HealthDto, HeldModelDto, ModelsDto, PressureAllDto, PressureDto, StatusListDto,
    WeightState,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

/// What `memwarden status` was asked.
pub struct StatusArgs<'a> {
    pub device: Option<&'a str>,
    pub watch: bool,
    /// Seconds between redraws.
    pub interval: f64,
    /// Ask whether this many bytes would fit now (one device).
    pub can_allocate: Option<&'a str>,
    pub kind: Option<&'a str>,
}

/// Cells of a device's usage bar.
const BAR: usize = 20;

/// The model listing is a nicety here (model counts per process): it may wait for a worker that
/// is starting, so the status does not wait for it longer than this.
const MODELS_WAIT: Duration = Duration::from_secs(2);

pub fn status(client: &Client, args: StatusArgs<'_>, as_json: bool) -> Result<String, CliError> {
    let path = status_path(&args)?;
    if args.watch {
        return watch(client, &args, &path, as_json);
    }
    let (raw, devices, backends) = read_status(client, &path, args.device.is_some())?;
    if as_json {
        return Ok(pretty(&raw));
    }
    Ok(render(&gather(client, args.device, devices, backends)?, client.base()))
}

fn status_path(args: &StatusArgs<'_>) -> Result<String, CliError> {
    let mut path = one_or_all("/api/memory/status", None, args.device);
    if let Some(size) = args.can_allocate {
        if args.device.is_none() {
            return Err(CliError("--can-allocate needs a DEVICE".into()));
        }
        let n = parse_size(size).map_err(|e| CliError(format!("--can-allocate: {e}")))?;
        let _ = write!(path, "?canAllocate={n}");
        if let Some(k) = args.kind {
            let _ = write!(path, "&memoryType={}", path_segment(k));
        }
    } else if args.kind.is_some() {
        return Err(CliError("--kind goes with --can-allocate".into()));
    }
    Ok(path)
}

/// The status route's answer: as it came, its devices, and (all devices) its backends.
fn read_status(
    client: &Client,
    path: &str,
    one: bool,
) -> Result<(Value, Vec<DeviceStatusDto>, Vec<BackendDto>), CliError> {
    if one {
        let a = client.get::<DeviceStatusDto>(path)?;
        Ok((a.raw, vec![a.data], Vec::new()))
    } else {
        let a = client.get::<StatusListDto>(path)?;
        Ok((a.raw, a.data.devices, a.data.backends))
    }
}

/// Everything one screen shows.
struct Screen {
    health: HealthDto,
    devices: Vec<DeviceStatusDto>,
    backends: Vec<BackendDto>,
    /// Per device: category and level (0–100).
    pressure: BTreeMap<String, (String, u8)>,
    /// The model listing, or why it is missing.
    models: Result<ModelsDto, String>,
}

fn gather(
    client: &Client,
    device: Option<&str>,
    devices: Vec<DeviceStatusDto>,
    backends: Vec<BackendDto>,
) -> Result<Screen, CliError> {
    let health = client.get::<HealthDto>("/health")?.data;
    let pressure: Vec<PressureDto> = match device {
        Some(d) => vec![client.get::<PressureDto>(&format!("/api/memory/pressure/{}", path_segment(d)))?.data],
        None => client.get::<PressureAllDto>("/api/memory/pressure")?.data.devices,
    };
    let pressure = pressure.into_iter().map(|p| (p.device_id, (p.pressure_category, p.pressure_level))).collect();
    let models_path = match device {
        Some(d) => format!("/api/memory/models?deviceId={}", path_segment(d)),
        None => "/api/memory/models".to_string(),
    };
    let models = client.get_within::<ModelsDto>(&models_path, MODELS_WAIT).map(|a| a.data).map_err(|e| e.0);
    Ok(Screen { health, devices, backends, pressure, models })
}

/// One process row.
struct Proc {
    pid: Option<u32>,
    name: String,
    bytes: Option<u64>,
    /// Models it holds on the device; None when the model listing is missing.
    models: Option<usize>,
    daemon: bool,
}

fn render(s: &Screen, url: &str) -> String {
    let h = &s.health;
    let now = time::OffsetDateTime::now_utc();
    let clock = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let mut out = format!(
        "memwarden {} at {url}, pid {}, up {}; {} UTC\n\n",
        h.version,
        h.pid,
        uptime(h.uptime_seconds),
        now.format(&clock).unwrap_or_default(),
    );
    // Devices: one row each, with a line under it for what a row has no room for.
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for d in &s.devices {
        let (category, level) = s.pressure.get(&d.device_id).cloned().unwrap_or_else(|| ("-".into(), 0));
        rows.push(vec![
            d.device_id.clone(),
            d.name.clone(),
            format_bytes(d.total_memory),
            format_bytes(d.used_memory),
            format_bytes(d.available_memory),
            format!("{} {:>5}", usage_bar(d.memory_utilization, BAR), pct(d.memory_utilization)),
            if category == "-" { category } else { format!("{category} ({level})") },
            pct(d.fragmentation),
            format!("{} ({} used)", format_bytes(d.reserved_bytes), format_bytes(d.allocated_bytes)),
        ]);
        notes.push(device_notes(d));
    }
    let header = ["DEVICE", "NAME", "TOTAL", "USED", "FREE", "USAGE", "PRESSURE", "FRAG", "POOLS"];
    let text = table(&header, &rows);
    let mut lines = text.lines();
    let _ = writeln!(out, "{}", lines.next().unwrap_or_default());
    for (line, note) in lines.zip(&notes) {
        let _ = writeln!(out, "{line}");
        for n in note {
            let _ = writeln!(out, "        {n}");
        }
    }
    // Backends that could not start, and why (only in the all-device answer).
    for b in s.backends.iter().filter(|b| !b.available) {
        let _ = writeln!(out, "{}: {}", b.name, b.reason.as_deref().unwrap_or("-"));
    }
    // Processes.
    let mut rows = Vec::new();
    for d in &s.devices {
        for p in processes(d, s) {
            let share = p.bytes.map(|b| pct(b as f64 / d.total_memory.max(1) as f64));
            rows.push(vec![
                d.device_id.clone(),
                p.pid.map_or("-".into(), |p| p.to_string()),
                p.name,
                p.bytes.map_or("-".into(), format_bytes),
                share.unwrap_or_else(|| "-".into()),
                p.models.map_or("?".into(), |n| n.to_string()),
            ]);
        }
    }
    out.push('\n');
    out.push_str(&table(&["DEVICE", "PID", "PROCESS", "MEMORY", "SHARE", "MODELS"], &rows));
    if rows.is_empty() {
        let _ = writeln!(out, "(no process holds memory on these devices)");
    }
    if let Err(e) = &s.models {
        let _ = writeln!(out, "(model counts unknown: the model listing answered {e})");
    }
    out
}

/// The lines under a device's row: a GPU's UUID and bus, a fault, a `--can-allocate` answer.
fn device_notes(d: &DeviceStatusDto) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(uuid) = &d.uuid {
        let mut n = uuid.clone();
        if let Some(bus) = &d.pci_bus_id {
            let _ = write!(n, "  bus {bus}");
        }
        if let Some(cc) = &d.compute_capability {
            let _ = write!(n, "  compute {cc}");
        }
        notes.push(n);
    }
    if !d.healthy {
        notes.push(format!("UNHEALTHY: {}", d.last_error.as_deref().unwrap_or("-")));
    }
    if let Some(c) = &d.can_allocate {
        let why = c.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
        notes.push(format!("can allocate {} of {}: {}{why}", format_bytes(c.size_bytes), c.memory_type, c.fits));
    }
    notes
}

/// The processes with memory on `d`: memwarden first, then the largest first. On a GPU, what
/// NVML lists (the daemon's own row found by its pid); on the host, memwarden's pools and held
/// weights, and each model worker or client by its measured RSS.
fn processes(d: &DeviceStatusDto, s: &Screen) -> Vec<Proc> {
    let here = Here { models: s.models.as_ref().ok(), dev: d.device_id.as_str(), is_host: d.device_type == "CPU" };
    let daemon_pid = (s.health.pid != 0).then_some(s.health.pid);
    let held = here.held();
    let held_bytes: u64 =
        held.iter().map(|w| if w.state == WeightState::Parked { w.parked_bytes } else { w.resident_bytes }).sum();
    // memwarden's own share as the API counts it: its pools and the weights it holds here.
    let mine = d.reserved_bytes + held_bytes;
    let held_count = here.models.map(|_| held.len());
    let own_row = |bytes| Proc { pid: daemon_pid, name: "memwarden".into(), bytes, models: held_count, daemon: true };
    let mut rows = Vec::new();
    if here.is_host || d.processes.is_empty() {
        if mine > 0 || here.is_host {
            rows.push(own_row(Some(mine)));
        }
        rows.extend(here.worker_rows());
    } else {
        // NVML's rows, measured (the daemon's includes its CUDA context).
        for p in &d.processes {
            if Some(p.pid) == daemon_pid {
                rows.push(own_row(p.used_memory));
                continue;
            }
            let name = match here.worker_name(p.pid) {
                Some(w) => format!("{} ({w})", p.name),
                None => p.name.clone(),
            };
            rows.push(Proc {
                pid: Some(p.pid),
                name,
                bytes: p.used_memory,
                models: here.worker_models(p.pid),
                daemon: false,
            });
        }
        // NVML does not list the daemon (another pid namespace): its share as the API counts it.
        if mine > 0 && !rows.iter().any(|p| p.daemon) {
            rows.push(own_row(Some(mine)));
        }
    }
    rows.sort_by_key(|p| (!p.daemon, std::cmp::Reverse(p.bytes.unwrap_or(0)), p.pid));
    rows
}

/// One device's view of the model listing (`None`: the listing could not be read).
struct Here<'a> {
    models: Option<&'a ModelsDto>,
    dev: &'a str,
    is_host: bool,
}

impl Here<'_> {
    /// Models per worker pid on this device (its own: weights memwarden holds and the worker
    /// maps count on memwarden's row).
    fn worker_models(&self, pid: u32) -> Option<usize> {
        self.models.map(|m| {
            m.devices
                .iter()
                .filter(|x| x.device_id == self.dev)
                .flat_map(|x| &x.model_memory.loaded_models)
                .filter(|x| x.pid == pid && !m.weights.iter().any(|w| w.model_id == x.model_id))
                .count()
        })
    }

    /// memwarden's held weights whose bytes are here (parked copies are in host memory).
    fn held(&self) -> Vec<&HeldModelDto> {
        self.models
            .map(|m| {
                m.weights
                    .iter()
                    .filter(|w| match w.state {
                        WeightState::Resident | WeightState::Orphaned => w.device_id == self.dev,
                        WeightState::Parked => self.is_host,
                        WeightState::Dropped => false,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn worker_name(&self, pid: u32) -> Option<String> {
        self.models.and_then(|m| {
            m.coordination_status.workers.iter().find(|w| w.pid == Some(pid)).map(|w| w.worker_id.clone())
        })
    }

    /// The workers' rows from what the listing measured of their processes (the host, or a GPU
    /// without NVML's process list).
    fn worker_rows(&self) -> Vec<Proc> {
        let workers = self.models.map(|m| m.coordination_status.workers.as_slice()).unwrap_or_default();
        workers
            .iter()
            .filter_map(|w| {
                let pid = w.pid?;
                let bytes = w.process_bytes.get(self.dev).copied();
                let count = self.worker_models(pid);
                (bytes.is_some() || count.unwrap_or(0) > 0).then(|| Proc {
                    pid: Some(pid),
                    name: format!("{} ({})", w.worker_id, w.role),
                    bytes,
                    models: count,
                    daemon: false,
                })
            })
            .collect()
    }
}

/// `status --watch`: the screen redrawn in place every interval, until Ctrl-C. Text needs a
/// terminal (a redraw means nothing in a file or pipe): without one it refuses. With `--json`
/// it prints the status data as one line per interval, terminal or not.
fn watch(client: &Client, args: &StatusArgs<'_>, path: &str, as_json: bool) -> Result<String, CliError> {
    if !(args.interval.is_finite() && args.interval >= 0.1) {
        return Err(CliError(format!("--interval: at least 0.1 seconds (got {})", args.interval)));
    }
    let interval = Duration::from_secs_f64(args.interval);
    let stdout = std::io::stdout();
    if !as_json && !stdout.is_terminal() {
        return Err(CliError(
            "status --watch redraws the screen and needs a terminal, and stdout is not one: run `memwarden status` \
             for one screen, or `memwarden status --watch --json` for one JSON line per interval"
                .into(),
        ));
    }
    let mut first = true;
    loop {
        let frame = read_status(client, path, args.device.is_some()).and_then(|(raw, devices, backends)| {
            if as_json {
                Ok(compact(&raw))
            } else {
                Ok(render(&gather(client, args.device, devices, backends)?, client.base()))
            }
        });
        let mut out = stdout.lock();
        let written = if as_json {
            match frame {
                Ok(line) => writeln!(out, "{line}"),
                Err(e) => {
                    eprintln!("error: {e}");
                    Ok(())
                }
            }
        } else {
            let frame = frame.unwrap_or_else(|e| format!("error: {e}\n(retrying every {:.1} s)\n", args.interval));
            let frame = format!("{frame}\nevery {:.1} s; Ctrl-C to stop\n", args.interval);
            write!(out, "{}", redraw(&frame, first, console::Term::stdout().size_checked()))
        };
        // The reader went away (a closed pipe): stop quietly.
        if written.and_then(|()| out.flush()).is_err() {
            return Ok(String::new());
        }
        first = false;
        drop(out);
        std::thread::sleep(interval);
    }
}

/// A frame drawn over the previous one: cursor home, each line cleared to its end, the rest of
/// the screen cleared; the first frame clears the screen first. Lines past the terminal's
/// height or width (`size`: rows, columns) are cut, so that the frame never scrolls.
fn redraw(frame: &str, first: bool, size: Option<(u16, u16)>) -> String {
    let (rows, cols) = size.map_or((usize::MAX, usize::MAX), |(r, c)| (r.max(2) as usize - 1, c as usize));
    let mut out = String::from(if first { "\x1b[2J\x1b[H" } else { "\x1b[H" });
    for line in frame.lines().take(rows) {
        out.extend(line.chars().take(cols));
        out.push_str("\x1b[K\n");
    }
    out.push_str("\x1b[J");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_redraw_in_place_within_the_terminal() {
        let f = redraw("abc\ndefgh\nij\nkl\n", false, Some((3, 4)));
        assert_eq!(f, "\x1b[Habc\x1b[K\ndefg\x1b[K\n\x1b[J");
        assert!(redraw("x\n", true, None).starts_with("\x1b[2J\x1b[H"));
    }

    /// A GPU's screen, as the daemon would answer on a CUDA host: NVML's processes with the
    /// daemon found by its pid, a worker named and its models counted (a held model it maps
    /// counts on memwarden's row), the UUID under the device's row.
    #[test]
    fn a_gpu_shows_nvml_processes_with_memwarden_first() {
        let gib = 1u64 << 30;
        let device: DeviceStatusDto = serde_json::from_value(serde_json::json!({
            "deviceId": "cuda:0", "deviceType": "GPU", "name": "NVIDIA H200", "memoryType": "VRAM",
            "totalMemory": 140 * gib, "availableMemory": 130 * gib, "usedMemory": 10 * gib,
            "memoryUtilization": 10.0 / 140.0, "source": "cuMemGetInfo+nvml", "lastUpdated": "t",
            "reservedBytes": gib, "allocatedBytes": gib / 2, "reservationBytes": 0, "pools": [],
            "fragmentation": 0.25, "uuid": "GPU-5b1e0a4c", "pciBusId": "0000:19:00.0",
            "computeCapability": "9.0", "memoryBandwidth": null, "reservedMemory": null,
            "processes": [
                {"pid": 300, "name": "vllm", "usedMemory": 6 * gib},
                {"pid": 200, "name": "python3", "usedMemory": gib},
                {"pid": 100, "name": "memwarden", "usedMemory": 3 * gib}
            ],
            "healthy": true, "lastError": null
        }))
        .expect("device");
        let model = |id: &str, backend: &str| {
            serde_json::json!({
                "modelId": id, "modelName": id, "workerId": "worker-0", "pid": 200, "deviceId": "cuda:0",
                "sizeBytes": gib, "bytesByDevice": {}, "loadedAt": "t", "lastAccess": "t", "loadTimeMs": 1.0,
                "priority": 50, "pinned": false, "path": null, "backend": backend, "reservedBytes": null
            })
        };
        let models: ModelsDto = serde_json::from_value(serde_json::json!({
            "devices": [{
                "deviceId": "cuda:0",
                "systemMemory": {"totalBytes": 1, "availableBytes": 1, "usedBytes": 0, "source": "s"},
                "modelMemory": {
                    "loadedModels": [model("m-1", "torch"), model("w-1", "memwarden")], "loadedModelCount": 2,
                    "totalModelMemory": 0, "availableForModels": 0, "processBytes": null, "unattributedBytes": null
                }
            }],
            "coordinationStatus": {"synchronized": true, "lastSync": null, "socket": null, "workers": [{
                "workerId": "worker-0", "role": "worker", "state": "ready", "since": "t", "pid": 200,
                "lastError": null, "restarts": 0, "devices": ["cuda:0"], "frameworks": {}, "modelCount": 2,
                "modelBytes": {}, "processBytes": {}, "unattributedBytes": {}, "unverifiedReleases": 0,
                "allocator": {}
            }]},
            "weights": [{
                "modelId": "w-1", "name": "w", "path": "/m", "deviceId": "cuda:0", "state": "resident",
                "sizeBytes": gib, "residentBytes": gib, "parkedBytes": 0, "tensorCount": 1, "hash": "h",
                "holders": ["worker-0"], "priority": 50, "pinned": false, "keepAliveMs": null, "loadedAt": "t",
                "lastUsed": "t", "load": null, "lastPark": null, "lastResume": null, "orphanedUntil": null
            }]
        }))
        .expect("models");
        let health: HealthDto = serde_json::from_value(serde_json::json!({
            "status": "healthy", "version": "0.1.0", "startedAt": "t", "uptimeSeconds": 42, "pid": 100,
            "devices": ["cuda:0"], "backends": [],
            "workers": {"enabled": true, "ready": 1, "reason": null, "workers": []}
        }))
        .expect("health");
        let screen = Screen {
            health,
            devices: vec![device],
            backends: Vec::new(),
            pressure: [("cuda:0".to_string(), ("low".to_string(), 7))].into_iter().collect(),
            models: Ok(models),
        };
        let out = render(&screen, "http://x");
        let lines: Vec<&str> = out.lines().collect();
        let row = lines.iter().position(|l| l.starts_with("cuda:0  NVIDIA H200")).expect("device row");
        assert!(lines[row].contains("low (7)") && lines[row].contains("25.0 %"), "{out}");
        assert!(lines[row + 1].trim_start().starts_with("GPU-5b1e0a4c  bus 0000:19:00.0  compute 9.0"), "{out}");
        let procs: Vec<Vec<&str>> = lines
            .iter()
            .skip_while(|l| !l.contains("PROCESS"))
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(procs[0][..5], ["cuda:0", "100", "memwarden", "3.00", "GiB"], "{out}");
        assert_eq!(procs[0].last(), Some(&"1"), "the held model: {out}");
        assert_eq!(procs[1][..3], ["cuda:0", "300", "vllm"], "then the largest: {out}");
        assert_eq!(procs[1].last(), Some(&"0"), "{out}");
        assert_eq!(procs[2][..4], ["cuda:0", "200", "python3", "(worker-0)"], "{out}");
        assert_eq!(procs[2].last(), Some(&"1"), "its own model, not the mapped one: {out}");
        assert_eq!(procs.len(), 3, "{out}");
    }
}
