use clap::{Parser, Subcommand};
use memwarden::cli::{self, AllocArgs, Client, DEFAULT_URL};
use memwarden::config::Config;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// memwarden: host, GPU and model memory daemon, and its client.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Daemon to talk to (client commands).
    #[arg(long, global = true, env = "MEMWARDEN_URL", default_value = DEFAULT_URL)]
    url: String,
    /// Bearer token, when the daemon requires one.
    #[arg(long, global = true, env = "MEMWARDEN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the response data as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
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
    /// List live allocations (of one device when given).
    Allocations { device: Option<String> },
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
    },
    /// Unload a model by id.
    Unload { id: String },
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
        /// Run even below the target.
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Serve { listen, config } = cli.command {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
            .with_writer(std::io::stderr)
            .init();
        let mut cfg = match config {
            Some(path) => match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            },
            None => Config::default(),
        };
        if let Some(l) = listen {
            cfg.listen = l;
        }
        return match memwarden::server::run(cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
    let client = Client::new(&cli.url, cli.token);
    let json = cli.json;
    let result = match &cli.command {
        Command::Serve { .. } => unreachable!("handled above"),
        Command::Status { device } => cli::status(&client, device.as_deref(), json),
        Command::Alloc { device, size, kind, purpose, owner, alignment, persistent, immovable } => cli::alloc(
            &client,
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
        Command::Free { id } => cli::free(&client, id, json),
        Command::Allocations { device } => cli::allocations(&client, device.as_deref(), json),
        Command::Clear { device } => cli::clear(&client, device.as_deref(), json),
        Command::Defrag { device, strategy } => cli::defrag(&client, device.as_deref(), strategy.as_deref(), json),
        Command::Pools { device } => cli::pools(&client, device.as_deref(), json),
        Command::Models { device } => cli::models(&client, device.as_deref(), json),
        Command::Load { path, device, name, priority, pinned } => {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            let body = serde_json::json!({
                "path": path, "deviceId": device, "name": name, "priority": priority, "pinned": pinned,
            });
            cli::load(&client, body, json)
        }
        Command::Unload { id } => cli::unload(&client, id, json),
        Command::Optimize { device, strategy, min_free, target, force, exclude } => {
            cli::optimize(&client, device, strategy.as_deref(), min_free.as_deref(), *target, *force, exclude, json)
        }
        Command::Pressure { device, watch } => cli::pressure(&client, device.as_deref(), *watch, json),
        Command::Analytics { window } => cli::analytics(&client, window, json),
        Command::Recommend => cli::recommend(&client, json),
    };
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
