//! The command line: `serve` runs the daemon; the client commands talk to a running daemon over
//! its REST API and print tables (or the envelope's `data` as JSON with `--json`). Responses are
//! read into the API's own types (`memwarden_protocol::api`). Failures print the server's code
//! and message and exit non-zero.
//!
//! `http` is the client, `render` the text helpers, `operations` the progress bar of work run in
//! the background; `status` (nvidia-smi's shape), `ps` (`ollama ps`'s), `allocations`, `data`,
//! `transfers`, `devices`, `events`, `models` and `analytics` hold the commands by area; this
//! file the arguments and the dispatch.

pub mod allocations;
pub mod analytics;
pub mod data;
pub mod devices;
pub mod events;
pub mod http;
pub mod models;
pub mod operations;
pub mod ps;
pub mod render;
pub mod status;
pub mod transfers;

use allocations::AllocArgs;
use clap::{Parser, Subcommand};
use http::{CliError, Client};
use memwarden_protocol::api::LoadBody;
use models::OptimizeArgs;
use std::net::SocketAddr;
use std::path::PathBuf;
use transfers::{CopyArgs, TransferArgs};

pub use http::DEFAULT_URL;

/// memwarden: host, GPU and model memory daemon, and its client.
#[derive(Parser)]
#[command(name = "memwarden", version, about)]
pub struct Cli {
    /// Daemon to talk to (client commands).
    #[arg(long, global = true, env = "MEMWARDEN_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// Bearer token, when the daemon requires one.
    #[arg(long, global = true, env = "MEMWARDEN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the response data as JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// `serve --help`: its own flags, without the client flags clap propagates to every command.
const SERVE_HELP: &str = "\
{about-with-newline}
Usage: memwarden serve [--listen <LISTEN>] [--config <CONFIG>]

Options:
      --listen <LISTEN>  Listen address (default 127.0.0.1:5000, or the config file's `listen`)
      --config <CONFIG>  TOML config file (see docs/CONFIG.md); embedded defaults without one
  -h, --help             Print help
";

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon.
    // The client flags are global (they go before or after any client command), so clap would
    // list them under `serve` too, where they do nothing: its help names its own flags only.
    #[command(help_template = SERVE_HELP)]
    Serve {
        /// Listen address (default 127.0.0.1:5000, or the config file's `listen`).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// TOML config file (see docs/CONFIG.md); embedded defaults without one.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Memory of every device (or one) and the processes holding it, like nvidia-smi.
    ///
    /// Per device: name, UUID (GPUs), total / used / free with a usage bar, pressure level,
    /// fragmentation and memwarden's pools; then every process with memory on the devices (pid,
    /// name, bytes, share of the device, models it holds), memwarden's own row first. `--json`:
    /// the status route's data as it came.
    Status {
        device: Option<String>,
        /// Redraw every --interval until Ctrl-C (needs a terminal; with --json, one line per
        /// interval instead).
        #[arg(long)]
        watch: bool,
        /// Seconds between redraws (with --watch).
        #[arg(long, default_value_t = 2.0, requires = "watch")]
        interval: f64,
        /// Whether this much would fit now (with DEVICE): in the pool, in new memory, or not.
        #[arg(long)]
        can_allocate: Option<String>,
        /// The memory kind for --can-allocate.
        #[arg(long, requires = "can_allocate")]
        kind: Option<String>,
    },
    /// Models, like `ollama ps`.
    ///
    /// Each model's device, state, size, priority, holder, idle time, and when keep-alive parks
    /// (cpu: drops) a model memwarden holds.
    Ps { device: Option<String> },
    /// The daemon's version, uptime, backends (and why one is unavailable) and workers.
    Health,
    /// Allocate memory: `alloc cpu 512MiB --kind pinned --purpose kv-cache`.
    Alloc {
        device: String,
        /// Size, e.g. 4096, 512MiB, 2GiB.
        size: String,
        /// host | pinned | device | reservation.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        purpose: Option<String>,
        #[arg(long)]
        owner: Option<String>,
        /// Power of two, e.g. 4096 or 2MiB (default 256).
        #[arg(long)]
        alignment: Option<String>,
        #[arg(long)]
        persistent: bool,
        /// Never let defragmentation move it.
        #[arg(long)]
        immovable: bool,
        /// The process that owns it: when that process exits, memwarden frees it.
        #[arg(long)]
        owner_pid: Option<u32>,
    },
    /// Free an allocation by id.
    Free { id: String },
    /// One allocation's record.
    Allocation { id: String },
    /// Share an allocation with another process (a /dev/shm file or a CUDA IPC handle).
    Export { id: String },
    /// Read or write an allocation's bytes (`data read ID -o FILE`, `data write ID -i FILE`).
    Data {
        #[command(subcommand)]
        command: data::DataCommand,
    },
    /// Copy or move bytes into a new allocation (--to DEVICE) or an existing one (--into ID).
    ///
    /// A transfer the daemon runs in the background (over `transfer.sync_max_bytes`) is
    /// followed to its end, with a progress bar on a terminal; --no-wait prints its id at once.
    Transfer(TransferArgs),
    /// Copy bytes between two existing allocations.
    Copy(CopyArgs),
    /// A transfer's status and progress (--wait: follow it to its end).
    TransferStatus {
        id: String,
        #[arg(long)]
        wait: bool,
    },
    /// List every live allocation (of one device when given), oldest first.
    Allocations {
        device: Option<String>,
        /// Only this owner's (exact match).
        #[arg(long)]
        owner: Option<String>,
        /// Only this kind's: host | pinned | device | reservation.
        #[arg(long)]
        kind: Option<String>,
        /// Only those with this purpose (exact match).
        #[arg(long)]
        purpose: Option<String>,
    },
    /// Per owner, device and memory type: bytes held, allocations and the quota; then the quotas.
    Owners,
    /// Return cached empty pool blocks to the OS/driver.
    Clear { device: Option<String> },
    /// Defragment one device's pools (or every device's): move movable allocations together and
    /// return emptied blocks.
    ///
    /// On a terminal it runs in the background and draws a progress bar (bytes moved against
    /// bytes planned, then the total, time and rate).
    Defrag {
        device: Option<String>,
        /// quick | balanced (default) | thorough.
        #[arg(long)]
        strategy: Option<String>,
    },
    /// Draw every pool block as a bar of used (#) and free (.) ranges.
    Pools { device: Option<String> },
    /// Models per device (with what their processes measurably hold), and the workers' states.
    Models { device: Option<String> },
    /// Load a model: `load /models/unet.safetensors --device cuda:0`.
    ///
    /// PATH is a `.safetensors` file, a sharded checkpoint's `*.safetensors.index.json`, a model
    /// folder (its `model.safetensors.index.json` or `model.safetensors`; diffusers' component
    /// names too) or a diffusers pipeline folder (`model_index.json`: each component with
    /// weights is held as a model of its own, grouped under the pipeline).
    ///
    /// On a terminal it runs in the background and draws a progress bar (bytes read against the
    /// model's tensor bytes; a worker's load reports nothing until it ends).
    Load {
        /// A file, an index or a folder (relative paths are made absolute here).
        path: PathBuf,
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// 0 (first to go under pressure) … 100 (last); default 50.
        #[arg(long)]
        priority: Option<u8>,
        /// Never offloaded or unloaded by memwarden.
        #[arg(long)]
        pinned: bool,
        /// `memwarden` (default: the daemon holds the weights) or `worker`.
        #[arg(long)]
        held_by: Option<String>,
        /// Idle time after which held weights are parked (cpu: dropped), e.g. 10m, 30s, 0
        /// (never); default the daemon's `weights.keep_alive_ms`.
        #[arg(long)]
        keep_alive: Option<String>,
    },
    /// Unload a model by id.
    Unload { id: String },
    /// Park a model memwarden holds: its bytes to pinned host memory, its GPU memory freed.
    /// `--group NAME`: every component of a pipeline.
    Park {
        #[arg(required_unless_present = "group")]
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        group: Option<String>,
    },
    /// Bring a parked or dropped model back (to --device, another GPU, when given).
    /// `--group NAME`: every component of a pipeline, on its own device.
    Resume {
        #[arg(required_unless_present = "group")]
        id: Option<String>,
        #[arg(long)]
        device: Option<String>,
        #[arg(long, conflicts_with_all = ["id", "device"])]
        group: Option<String>,
    },
    /// Keep only a held model's file (a resume reads it again). `--group NAME`: every component
    /// of a pipeline.
    Drop {
        #[arg(required_unless_present = "group")]
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        group: Option<String>,
    },
    /// Move a model to another device.
    ///
    /// A worker's model is loaded there, then unloaded here (it gets a new id); one memwarden
    /// holds is parked and resumed there (same id).
    Move { id: String, device: String },
    /// Free model memory on a device: trim caches, offload, unload (cheapest first).
    Optimize {
        device: String,
        /// conservative | balanced (default) | aggressive | smart.
        #[arg(long)]
        strategy: Option<String>,
        /// Free at least this much, e.g. 2GiB.
        #[arg(long)]
        min_free: Option<String>,
        /// Utilization (0–100) to bring the device down to (default 50).
        #[arg(long)]
        target: Option<f64>,
        /// Run even below the target: free --min-free, or else trim the caches and release the
        /// single least valuable unpinned model.
        #[arg(long)]
        force: bool,
        /// Model ids never touched (repeatable).
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// The optimizer's last runs (manual, watchdog, admission).
    OptimizeHistory,
    /// Memory pressure of every device (or one).
    Pressure {
        device: Option<String>,
        /// Then follow level changes as they happen (Ctrl-C to stop).
        #[arg(long, conflicts_with = "history")]
        watch: bool,
        /// The last level changes instead, oldest first.
        #[arg(long)]
        history: bool,
    },
    /// Follow the event stream (pressure changes, optimizer runs) until Ctrl-C.
    ///
    /// One line per event; with `--json`, each event's data as it came, one JSON document per
    /// line.
    Events {
        /// Only this device's events.
        device: Option<String>,
    },
    /// Usage over a window per device: used and peak, live allocations, rates.
    Usage {
        device: Option<String>,
        /// e.g. 30s, 15m, 1h (default), 1d.
        #[arg(long, default_value = "1h")]
        window: String,
    },
    /// Analytics over a window: peaks, percentiles, activity, top owners and models, leak suspects
    Analytics {
        /// e.g. 30s, 15m, 1h (default), 1d.
        #[arg(long, default_value = "1h")]
        window: String,
    },
    /// The allocation event log (allocated, freed, moved, exported), oldest first.
    AnalyticsEvents {
        #[arg(long)]
        device: Option<String>,
        /// The newest N (default 100).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Start every peak over from its current value.
    ResetPeaks,
    /// Recommendations from the measured state, with their evidence and the request that applies each
    Recommend {
        /// Apply one now: its number as listed, or its type (the first of it), e.g. clearCache.
        #[arg(long)]
        apply: Option<String>,
    },
}

/// Runs a client command against the daemon at `client` and returns what to print.
pub fn run(client: &Client, command: &Command, json: bool) -> Result<String, CliError> {
    match command {
        Command::Serve { .. } => Err(CliError("serve is not a client command".into())),
        Command::Status { device, watch, interval, can_allocate, kind } => status::status(
            client,
            status::StatusArgs {
                device: device.as_deref(),
                watch: *watch,
                interval: *interval,
                can_allocate: can_allocate.as_deref(),
                kind: kind.as_deref(),
            },
            json,
        ),
        Command::Ps { device } => ps::ps(client, device.as_deref(), json),
        Command::Health => devices::health(client, json),
        Command::Alloc { device, size, kind, purpose, owner, alignment, persistent, immovable, owner_pid } => {
            allocations::alloc(
                client,
                AllocArgs {
                    device,
                    size,
                    kind: kind.as_deref(),
                    purpose: purpose.as_deref(),
                    owner: owner.as_deref(),
                    alignment: alignment.as_deref(),
                    persistent: *persistent,
                    immovable: *immovable,
                    owner_pid: *owner_pid,
                },
                json,
            )
        }
        Command::Free { id } => allocations::free(client, id, json),
        Command::Allocation { id } => allocations::allocation(client, id, json),
        Command::Export { id } => allocations::export(client, id, json),
        Command::Data { command } => data::data(client, command, json),
        Command::Transfer(args) => transfers::transfer(client, args, json),
        Command::Copy(args) => transfers::copy(client, args, json),
        Command::TransferStatus { id, wait } => transfers::status(client, id, *wait, json),
        Command::Allocations { device, owner, kind, purpose } => {
            let filter =
                allocations::ListFilter { owner: owner.as_deref(), kind: kind.as_deref(), purpose: purpose.as_deref() };
            allocations::allocations(client, device.as_deref(), filter, json)
        }
        Command::Owners => allocations::owners(client, json),
        Command::Clear { device } => devices::clear(client, device.as_deref(), json),
        Command::Defrag { device, strategy } => devices::defrag(client, device.as_deref(), strategy.as_deref(), json),
        Command::Pools { device } => devices::pools(client, device.as_deref(), json),
        Command::Models { device } => models::models(client, device.as_deref(), json),
        Command::Load { path, device, name, priority, pinned, held_by, keep_alive } => {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            let path = path.to_str().ok_or_else(|| CliError(format!("path {} is not UTF-8", path.display())))?;
            let body = LoadBody {
                path: path.to_string(),
                name: name.clone(),
                device_id: device.clone(),
                priority: *priority,
                pinned: *pinned,
                held_by: held_by.clone(),
                keep_alive_ms: keep_alive
                    .as_deref()
                    .map(parse_duration_ms)
                    .transpose()
                    .map_err(|e| CliError(format!("--keep-alive: {e}")))?,
                run_async: false,
            };
            models::load(client, &body, json)
        }
        Command::Unload { id } => models::unload(client, id, json),
        Command::Park { id, group } => models::weights_action(client, id, group, "park", None, json),
        Command::Resume { id, device, group } => {
            models::weights_action(client, id, group, "resume", device.as_deref(), json)
        }
        Command::Drop { id, group } => models::weights_action(client, id, group, "drop", None, json),
        Command::Move { id, device } => models::move_model(client, id, device, json),
        Command::Optimize { device, strategy, min_free, target, force, exclude } => models::optimize(
            client,
            OptimizeArgs {
                device,
                strategy: strategy.as_deref(),
                min_free: min_free.as_deref(),
                target: *target,
                force: *force,
                exclude,
            },
            json,
        ),
        Command::OptimizeHistory => models::optimize_history(client, json),
        Command::Pressure { history: true, .. } => devices::pressure_history(client, json),
        Command::Pressure { device, watch, .. } => devices::pressure(client, device.as_deref(), *watch, json),
        Command::Events { device } => events::events(client, device.as_deref(), json),
        Command::Usage { device, window } => analytics::usage(client, device.as_deref(), window, json),
        Command::Analytics { window } => analytics::analytics(client, window, json),
        Command::AnalyticsEvents { device, limit } => analytics::events(client, device.as_deref(), *limit, json),
        Command::ResetPeaks => analytics::reset_peaks(client, json),
        Command::Recommend { apply: Some(which) } => analytics::apply(client, which, json),
        Command::Recommend { apply: None } => analytics::recommend(client, json),
    }
}

/// A duration as `500ms`, `30s`, `10m`, `2h`, `1d` or plain milliseconds, in milliseconds.
fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number.parse().map_err(|_| format!("'{text}' is not a duration (e.g. 30s, 10m, 1h)"))?;
    let scale = match unit.trim() {
        "" | "ms" => 1.0,
        "s" => 1e3,
        "m" | "min" => 60e3,
        "h" => 3600e3,
        "d" => 86_400e3,
        u => return Err(format!("'{u}' is not a unit of time (ms, s, m, h, d)")),
    };
    Ok((n * scale).round() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_in_their_units() {
        assert_eq!(super::parse_duration_ms("10m"), Ok(600_000));
        assert_eq!(super::parse_duration_ms("1.5s"), Ok(1500));
        assert_eq!(super::parse_duration_ms("250"), Ok(250));
        assert!(super::parse_duration_ms("soon").is_err());
        assert!(super::parse_duration_ms("3 weeks").is_err());
    }
}
