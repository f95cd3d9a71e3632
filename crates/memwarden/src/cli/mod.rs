//! The command line: `serve` runs the daemon; the client commands talk to a running daemon over
//! its REST API and print tables (or the envelope's `data` as JSON with `--json`). Responses are
//! read into the API's own types (`memwarden_protocol::api`). Failures print the server's code
//! and message and exit non-zero.
//!
//! `http` is the client, `render` the text helpers; `allocations`, `devices`, `models` and
//! `analytics` hold the commands by area; this file the arguments and the dispatch.

pub mod allocations;
pub mod analytics;
pub mod devices;
pub mod http;
pub mod models;
pub mod render;

use allocations::AllocArgs;
use clap::{Parser, Subcommand};
use http::{CliError, Client};
use memwarden_protocol::api::LoadBody;
use models::OptimizeArgs;
use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// Memory status of every device, or of one.
    Status { device: Option<String> },
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
    },
    /// Free an allocation by id.
    Free { id: String },
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
    /// Load a .safetensors model on a worker: `load /models/unet.safetensors --device cuda:0`.
    Load {
        /// Absolute path (relative paths are made absolute here).
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
    },
    /// Unload a model by id.
    Unload { id: String },
    /// Park a model memwarden holds: its bytes to pinned host memory, its GPU memory freed.
    Park { id: String },
    /// Bring a parked or dropped model back (to --device, another GPU, when given).
    Resume {
        id: String,
        #[arg(long)]
        device: Option<String>,
    },
    /// Keep only a held model's file (a resume reads it again).
    Drop { id: String },
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
    /// Memory pressure of every device (or one).
    Pressure {
        device: Option<String>,
        /// Then follow level changes as they happen (Ctrl-C to stop).
        #[arg(long)]
        watch: bool,
    },
    /// Analytics over a window: peaks, percentiles, activity, top owners and models, leak suspects
    Analytics {
        /// e.g. 30s, 15m, 1h (default), 1d.
        #[arg(long, default_value = "1h")]
        window: String,
    },
    /// Recommendations from the measured state, with their evidence and the request that applies each
    Recommend,
}

/// Runs a client command against the daemon at `client` and returns what to print.
pub fn run(client: &Client, command: &Command, json: bool) -> Result<String, CliError> {
    match command {
        Command::Serve { .. } => Err(CliError("serve is not a client command".into())),
        Command::Status { device } => devices::status(client, device.as_deref(), json),
        Command::Alloc { device, size, kind, purpose, owner, alignment, persistent, immovable } => allocations::alloc(
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
            },
            json,
        ),
        Command::Free { id } => allocations::free(client, id, json),
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
        Command::Load { path, device, name, priority, pinned, held_by } => {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            let path = path.to_str().ok_or_else(|| CliError(format!("path {} is not UTF-8", path.display())))?;
            let body = LoadBody {
                path: path.to_string(),
                name: name.clone(),
                device_id: device.clone(),
                priority: *priority,
                pinned: *pinned,
                held_by: held_by.clone(),
                keep_alive_ms: None,
            };
            models::load(client, &body, json)
        }
        Command::Unload { id } => models::unload(client, id, json),
        Command::Park { id } => models::weights_action(client, id, "park", None, json),
        Command::Resume { id, device } => models::weights_action(client, id, "resume", device.as_deref(), json),
        Command::Drop { id } => models::weights_action(client, id, "drop", None, json),
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
        Command::Pressure { device, watch } => devices::pressure(client, device.as_deref(), *watch, json),
        Command::Analytics { window } => analytics::analytics(client, window, json),
        Command::Recommend => analytics::recommend(client, json),
    }
}
