//! `[workers]`: the model workers memwarden supervises and the socket clients attach to.

use serde::Deserialize;
use std::path::PathBuf;

/// The Python processes that hold models: supervised workers and attached clients.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkersSection {
    /// Start workers. With no `[[workers.worker]]` entries, one default worker serving every
    /// device is started when `python` is found.
    pub enabled: bool,
    /// The Python interpreter that runs `memwarden.worker`.
    pub python: String,
    /// Directory holding the `memwarden` package; empty: the copy embedded in this binary,
    /// written to a private runtime directory at start (no install step).
    pub python_path: PathBuf,
    /// Unix socket attached clients connect to; empty: `memwarden.sock` in `runtime_dir`;
    /// `none`: no socket.
    pub socket: String,
    /// Where the embedded package is written (and the socket goes when `socket` is empty);
    /// empty: `$XDG_RUNTIME_DIR`, else `/tmp/memwarden-<uid>`. A system service has neither
    /// (no session, `/tmp` read-only or private), so its unit sets its `RuntimeDirectory`.
    pub runtime_dir: PathBuf,
    /// Timeout of one call to a worker, in milliseconds (idempotent calls are retried once).
    pub call_timeout_ms: u64,
    /// Timeout of `loadModel`, in milliseconds.
    pub load_timeout_ms: u64,
    /// Time a started worker has to send its `hello`, in milliseconds.
    pub start_timeout_ms: u64,
    /// How long a load, or the model listing, waits for a worker that is still `starting` (right
    /// after the daemon's start or a restart) before answering without it, in milliseconds.
    pub ready_wait_ms: u64,
    /// Interval of health pings to each worker, in milliseconds; 0: none.
    pub health_interval_ms: u64,
    /// A worker that fails this many health pings in a row is killed and restarted.
    pub unhealthy_restart_after: u32,
    /// First wait before restarting a worker that exited, in milliseconds; doubles per
    /// consecutive failure up to `restart_backoff_max_ms`, and resets after a minute of health.
    pub restart_backoff_ms: u64,
    pub restart_backoff_max_ms: u64,
    /// Explicit workers; when present they replace the default one.
    pub worker: Vec<WorkerSpec>,
    /// Users (uids) besides the daemon's own that may attach through the socket. Checked on each
    /// connection with SO_PEERCRED; with either list non-empty the socket is made connectable by
    /// everyone (mode 0666) and this check decides.
    pub allowed_uids: Vec<u32>,
    /// Groups (the peer's primary gid) whose members may attach, as `allowed_uids`.
    pub allowed_gids: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkerSpec {
    /// Unique id, used in the API and the logs.
    pub id: String,
    /// Devices it places models on (`cpu`, `cuda:0`, …); empty: every device.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Full command line instead of `<python> -m memwarden.worker …` (for wrappers and tests).
    #[serde(default)]
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

impl Default for WorkersSection {
    fn default() -> Self {
        WorkersSection {
            enabled: true,
            python: "python3".into(),
            python_path: PathBuf::new(),
            socket: String::new(),
            runtime_dir: PathBuf::new(),
            call_timeout_ms: 10_000,
            load_timeout_ms: 300_000,
            start_timeout_ms: 60_000,
            ready_wait_ms: 5_000,
            health_interval_ms: 5_000,
            unhealthy_restart_after: 3,
            restart_backoff_ms: 500,
            restart_backoff_max_ms: 30_000,
            worker: Vec::new(),
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
        }
    }
}
