//! Daemon configuration: embedded defaults, optionally overridden by a TOML file. Every key is
//! documented with its unit and default in docs/CONFIG.md; keep the two in step.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
pub mod quotas;
mod vulkan;
mod workers;
use memwarden_core::advice::AdviceThresholds;
use memwarden_core::pressure::PressureThresholds;
use memwarden_core::units::{GIB, MIB};
pub use vulkan::{D3d12Section, NvidiaOwner, VulkanSection};
pub use workers::{WorkerSpec, WorkersSection};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the REST API listens on.
    pub listen: SocketAddr,
    /// Bearer token required on `/api/` routes. Required when `listen` is not a loopback address.
    pub auth_token: Option<String>,
    /// A file holding the token instead (a Kubernetes Secret, a systemd credential), read by
    /// [`Config::load`] into `auth_token`; surrounding whitespace is trimmed.
    pub auth_token_file: Option<PathBuf>,
    /// Threads serving the API; 0 means one per CPU. Handlers take microseconds, so a few
    /// threads suffice, and fewer threads mean fewer cross-CPU wake-ups per request.
    pub worker_threads: usize,
    pub api: ApiSection,
    pub pool: PoolSection,
    pub host: HostSection,
    pub cuda: CudaSection,
    pub vulkan: VulkanSection,
    pub d3d12: D3d12Section,
    pub transfer: TransferSection,
    pub defrag: DefragSection,
    pub pressure: PressureSection,
    pub workers: WorkersSection,
    pub optimizer: OptimizerSection,
    pub analytics: AnalyticsSection,
    pub weights: WeightsSection,
    /// `[[quotas]]`: per-owner byte limits per device and memory kind (none by default).
    pub quotas: Vec<quotas::QuotaEntry>,
}

/// Model weights held by memwarden (docs/API.md): loading, parking, keep-alive and orphans.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WeightsSection {
    /// Reader threads per load; 0 means one per CPU, at most 16.
    pub load_threads: usize,
    /// Idle time after which a resident model is parked (on cpu: dropped), in milliseconds;
    /// 0 means never. A load may set its own (`keepAliveMs`).
    pub keep_alive_ms: u64,
    /// Time a parked model keeps its pinned copy before it is dropped, in milliseconds; 0 means
    /// never.
    pub drop_after_ms: u64,
    /// How long the weights of a holder that died stay resident for a restarted process to
    /// re-attach, in milliseconds; then they are parked (on cpu: dropped).
    pub orphan_grace_ms: u64,
    /// How long a park waits for holders to leave `use()`, in milliseconds; past it the park
    /// is refused (`IN_USE`) and the optimizer moves on to the next model.
    pub use_bound_ms: u64,
    /// Free pinned host memory kept registered for parking whatever is held, in bytes: a
    /// floor under the automatic size (the largest unpinned model resident or loading on a
    /// GPU); 0: automatic only (docs/CONFIG.md).
    pub park_pool_bytes: u64,
    /// The most host memory the park pool registers in the background, free and parked
    /// together, in percent (0–100) of the host's memory (its cgroup limit when lower); a
    /// `park_pool_bytes` above it wins. 0: no automatic growth.
    pub park_pool_max_percent: f64,
    /// Hash every chunk while loading (BLAKE3; detects a file changed in place on reload). Off:
    /// a reload checks size and mtime only.
    pub hash_on_load: bool,
}

impl Default for WeightsSection {
    fn default() -> Self {
        WeightsSection {
            load_threads: 0,
            keep_alive_ms: 300_000,
            drop_after_ms: 3_600_000,
            orphan_grace_ms: 60_000,
            use_bound_ms: 2_000,
            park_pool_bytes: 0,
            park_pool_max_percent: 80.0,
            hash_on_load: true,
        }
    }
}

/// Measured history, analytics, recommendations and `/metrics`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AnalyticsSection {
    /// Record counters, peaks, the allocation event log and the history. Off: analytics and
    /// `/metrics` report current state only (no rates, peaks or events).
    pub enabled: bool,
    /// Interval of fine history points, in milliseconds.
    pub fine_interval_ms: u64,
    /// Fine points kept per device (3600 at 1 s: an hour).
    pub fine_points: usize,
    /// Interval of coarse history points, in milliseconds (a multiple of `fine_interval_ms`).
    pub coarse_interval_ms: u64,
    /// Coarse points kept per device (1440 at 1 min: a day).
    pub coarse_points: usize,
    /// Entries of the allocation event log (allocated, freed, moved, exported); 0: no log
    /// (counters and peaks are still kept).
    pub event_log_size: usize,
    /// Models whose memory is tracked over time (the longest gone are forgotten first).
    pub max_tracked_models: usize,
    /// A non-persistent allocation at least this old, in seconds, whose owner is gone or idle
    /// is a leak suspect.
    pub leak_min_age_secs: u64,
    /// An owner with no allocation or free for this long, in seconds, counts as idle.
    pub leak_owner_idle_secs: u64,
    /// Replaced by `defrag.fragmentation_threshold` (one threshold for the automatic pass and
    /// the recommendations); setting it is an error that says so.
    #[doc(hidden)]
    pub fragmentation_threshold: Option<f64>,
    /// Recommendations: how long a failed allocation counts as recent, in seconds.
    pub failure_recent_secs: u64,
    /// Recommendations: idle time after which a model counts as idle, in seconds.
    pub model_idle_secs: u64,
    /// Recommendations: cached empty pool bytes worth a clear (or 1 % of the device, if more).
    pub min_clear_bytes: u64,
    /// Recommendations: pinned host memory that counts as large, as a fraction (0–1) of the host.
    pub pinned_fraction: f64,
    /// Recommendations: utilization difference (0–1) between two GPUs of one kind that calls
    /// for moving a model.
    pub imbalance: f64,
}

impl Default for AnalyticsSection {
    fn default() -> Self {
        AnalyticsSection {
            enabled: true,
            fine_interval_ms: 1000,
            fine_points: 3600,
            coarse_interval_ms: 60_000,
            coarse_points: 1440,
            event_log_size: 10_000,
            max_tracked_models: 256,
            leak_min_age_secs: 600,
            leak_owner_idle_secs: 600,
            fragmentation_threshold: None,
            failure_recent_secs: 600,
            model_idle_secs: 300,
            min_clear_bytes: 64 * MIB,
            pinned_fraction: 0.1,
            imbalance: 0.3,
        }
    }
}

impl AnalyticsSection {
    pub fn resolution(&self) -> memwarden_core::history::Resolution {
        memwarden_core::history::Resolution {
            fine_ms: self.fine_interval_ms,
            fine_points: self.fine_points,
            coarse_ms: self.coarse_interval_ms,
            coarse_points: self.coarse_points,
        }
    }
}

impl Config {
    /// Where the recommendation rules draw their lines: the analytics section's, with the
    /// fragmentation threshold of the defragmentation section.
    pub fn advice_thresholds(&self) -> AdviceThresholds {
        let a = &self.analytics;
        AdviceThresholds {
            fragmentation: self.defrag.fragmentation_threshold,
            failure_recent_secs: a.failure_recent_secs as f64,
            model_idle_secs: a.model_idle_secs as f64,
            min_clear_bytes: a.min_clear_bytes,
            pinned_fraction: a.pinned_fraction,
            imbalance: a.imbalance,
        }
    }
}

/// Pressure-driven model memory optimization (the release ladder).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerSection {
    /// Run the ladder on pressure events: `balanced` when a device reaches `high`,
    /// `aggressive` at `critical`.
    pub watchdog: bool,
    /// Least time between two automatic runs on one device, in milliseconds.
    pub cooldown_ms: u64,
    /// Utilization (0–100) automatic runs bring a device down to.
    pub target_pressure_level: f64,
    /// Time limit of an automatic run, in milliseconds (checked between steps).
    pub max_time_ms: u64,
    /// How long a released model's bytes have to show up in the measurement, in milliseconds.
    pub verify_ms: u64,
    /// Restart a supervised worker whose claimed release did not show up (escalation).
    pub restart_unverified: bool,
    /// Before a model load, reserve its size; if it does not fit, run the ladder for the
    /// difference; if it still does not fit, refuse the load with 507.
    pub admission: bool,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        OptimizerSection {
            watchdog: true,
            cooldown_ms: 10_000,
            target_pressure_level: 70.0,
            max_time_ms: 30_000,
            verify_ms: 2_000,
            restart_unverified: false,
            admission: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PressureSection {
    /// Run the pressure sampler.
    pub enabled: bool,
    /// Sampling interval of host memory (/proc/meminfo, cgroup, PSI), in milliseconds. A
    /// multiple of `gpu_interval_ms` lets one wake-up serve both.
    pub host_interval_ms: u64,
    /// Sampling interval of each GPU (cuMemGetInfo), in milliseconds.
    pub gpu_interval_ms: u64,
    /// `moderate`, `high`, `critical`, `hysteresis`, `psi_some_percent`, `psi_full_percent`:
    /// keys of this section, defined (with their defaults and checks) by the core type.
    #[serde(flatten)]
    pub thresholds: PressureThresholds,
    /// Level changes kept for `GET /api/memory/pressure/history`.
    pub history_size: usize,
    /// PSI trigger on the host: wake the sampler at once when tasks stall on memory this many
    /// milliseconds within `psi_trigger_window_ms`. 0: no trigger.
    pub psi_trigger_stall_ms: u64,
    /// Window of the PSI trigger, in milliseconds (a multiple of 2000 without CAP_SYS_RESOURCE).
    pub psi_trigger_window_ms: u64,
}

impl From<&Config> for memwarden_backends::DiscoverConfig {
    fn from(c: &Config) -> Self {
        memwarden_backends::DiscoverConfig {
            proc_root: c.host.proc_root.clone(),
            cgroup_root: c.host.cgroup_root.clone(),
            shared_memory_dir: (!c.host.shared_memory_dir.as_os_str().is_empty())
                .then(|| c.host.shared_memory_dir.clone()),
            shared_memory_group: c.host.shared_memory_group,
            cuda: c.cuda.enabled,
            vulkan: (&c.vulkan).into(),
            d3d12_include_software: c.d3d12.include_software,
        }
    }
}

impl Default for PressureSection {
    fn default() -> Self {
        PressureSection {
            enabled: true,
            host_interval_ms: 60,
            gpu_interval_ms: 20,
            thresholds: PressureThresholds::default(),
            history_size: 1000,
            psi_trigger_stall_ms: 150,
            psi_trigger_window_ms: 2000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DefragSection {
    /// Run a bounded pass when an allocation does not fit on a device whose fragmentation index
    /// is at least `fragmentation_threshold`, then retry it once.
    pub auto: bool,
    /// 0–1: `1 − largest free range / free bytes` of the device's pools.
    pub fragmentation_threshold: f64,
    /// Strategy of the automatic pass.
    #[serde(deserialize_with = "strategy")]
    pub strategy: memwarden_core::defrag::DefragStrategy,
    /// Time limit of the automatic pass, in milliseconds (checked between moves).
    pub max_time_ms: u64,
    /// Byte limit of the automatic pass.
    pub max_bytes_to_move: u64,
}

fn strategy<'de, D: serde::Deserializer<'de>>(d: D) -> Result<memwarden_core::defrag::DefragStrategy, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

impl Default for DefragSection {
    fn default() -> Self {
        DefragSection {
            auto: false,
            fragmentation_threshold: 0.3,
            strategy: memwarden_core::defrag::DefragStrategy::Balanced,
            max_time_ms: 100,
            max_bytes_to_move: GIB,
        }
    }
}

/// The REST API's limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSection {
    /// Largest JSON request body in bytes; a larger one is answered 413 `PAYLOAD_TOO_LARGE`.
    /// `PUT …/data` has its own limit of 64 MiB.
    pub max_body_bytes: u64,
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection { max_body_bytes: MIB }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CudaSection {
    /// Use NVIDIA GPUs when a driver is present.
    pub enabled: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TransferSection {
    /// Transfers and copies up to this many bytes answer when done; larger ones return a
    /// transferId at once and run in the background.
    pub sync_max_bytes: u64,
}

impl Default for CudaSection {
    fn default() -> Self {
        CudaSection { enabled: true }
    }
}

impl Default for TransferSection {
    fn default() -> Self {
        TransferSection { sync_max_bytes: 64 * MIB }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolSection {
    /// Size of a shared pool block, in bytes.
    pub block_size_bytes: u64,
    /// Requests of at least this many bytes get a dedicated block, released when freed.
    pub dedicated_threshold_bytes: u64,
    /// Bytes of each device's available memory that allocations never take.
    pub headroom_bytes: u64,
    /// Largest age of a memory status sample used for a budget check, in milliseconds. Creating
    /// a new block always reads a fresh sample.
    pub status_max_age_ms: u64,
    /// Largest size of each pool (per device and memory kind), in bytes; 0: no cap.
    pub max_pool_bytes: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HostSection {
    /// Root of the proc filesystem.
    pub proc_root: PathBuf,
    /// Root of the cgroup filesystem.
    pub cgroup_root: PathBuf,
    /// Directory (a tmpfs) whose files back host blocks so allocations can be exported to other
    /// processes; empty: anonymous memory, not exportable.
    pub shared_memory_dir: PathBuf,
    /// A group (gid) that may map exported host memory: the files get it, mode 0660. None:
    /// only the daemon's user (mode 0600).
    pub shared_memory_group: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            auth_token: None,
            auth_token_file: None,
            worker_threads: 2,
            api: ApiSection::default(),
            pool: PoolSection::default(),
            host: HostSection::default(),
            cuda: CudaSection::default(),
            vulkan: VulkanSection::default(),
            d3d12: D3d12Section::default(),
            transfer: TransferSection::default(),
            defrag: DefragSection::default(),
            pressure: PressureSection::default(),
            workers: WorkersSection::default(),
            optimizer: OptimizerSection::default(),
            analytics: AnalyticsSection::default(),
            weights: WeightsSection::default(),
            quotas: Vec::new(),
        }
    }
}

impl Default for PoolSection {
    fn default() -> Self {
        PoolSection {
            block_size_bytes: 64 * MIB,
            dedicated_threshold_bytes: 32 * MIB,
            headroom_bytes: 0,
            status_max_age_ms: 100,
            max_pool_bytes: 0,
        }
    }
}

impl Default for HostSection {
    fn default() -> Self {
        HostSection {
            proc_root: memwarden_sys::status::PROC_ROOT.into(),
            cgroup_root: memwarden_sys::status::CGROUP_ROOT.into(),
            shared_memory_dir: "/dev/shm".into(),
            shared_memory_group: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads a TOML file; keys it omits keep their defaults. Reads `auth_token_file`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        config.read_token_file()?;
        config.validate()?;
        Ok(config)
    }

    /// Sets `auth_token` from `auth_token_file`, when one is configured.
    fn read_token_file(&mut self) -> Result<(), ConfigError> {
        let Some(file) = &self.auth_token_file else { return Ok(()) };
        if self.auth_token.is_some() {
            return Err(ConfigError::Invalid("set auth_token or auth_token_file, not both".into()));
        }
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::Invalid(format!("auth_token_file {}: {e}", file.display())))?;
        if text.trim().is_empty() {
            return Err(ConfigError::Invalid(format!("auth_token_file {} is empty", file.display())));
        }
        self.auth_token = Some(text.trim().to_string());
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        // A token file not read yet (a config checked without its secrets) will give one.
        let token = self.auth_token.as_deref().is_some_and(|t| !t.is_empty()) || self.auth_token_file.is_some();
        if !self.listen.ip().is_loopback() && !token {
            return Err(ConfigError::Invalid(format!(
                "listen address {} is not loopback: set auth_token (or auth_token_file) so the API is not open to \
                 the network",
                self.listen
            )));
        }
        if self.api.max_body_bytes < 1024 {
            return Err(ConfigError::Invalid("api.max_body_bytes must be at least 1024".into()));
        }
        if self.pool.block_size_bytes < MIB {
            return Err(ConfigError::Invalid("pool.block_size_bytes must be at least 1 MiB".into()));
        }
        if self.pool.dedicated_threshold_bytes == 0 || self.pool.dedicated_threshold_bytes > self.pool.block_size_bytes
        {
            return Err(ConfigError::Invalid(
                "pool.dedicated_threshold_bytes must be between 1 and pool.block_size_bytes".into(),
            ));
        }
        self.pressure.thresholds.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !(0.0..=100.0).contains(&self.optimizer.target_pressure_level) {
            return Err(ConfigError::Invalid("optimizer.target_pressure_level must be between 0 and 100".into()));
        }
        let a = &self.analytics;
        if a.fine_interval_ms == 0
            || a.coarse_interval_ms < a.fine_interval_ms
            || a.fine_points == 0
            || a.coarse_points == 0
        {
            return Err(ConfigError::Invalid(
                "analytics: intervals and point counts must be above 0, coarse_interval_ms at least fine_interval_ms"
                    .into(),
            ));
        }
        if a.fragmentation_threshold.is_some() {
            return Err(ConfigError::Invalid(
                "analytics.fragmentation_threshold was replaced by defrag.fragmentation_threshold (one threshold for \
                 the automatic pass and the recommendations); set that instead"
                    .into(),
            ));
        }
        for (name, v) in [("pinned_fraction", a.pinned_fraction), ("imbalance", a.imbalance)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(ConfigError::Invalid(format!("analytics.{name} must be between 0 and 1")));
            }
        }
        let w = &self.workers;
        if w.call_timeout_ms == 0 || w.load_timeout_ms == 0 || w.start_timeout_ms == 0 {
            return Err(ConfigError::Invalid("workers: timeouts must be above 0".into()));
        }
        if w.restart_backoff_ms == 0 || w.restart_backoff_max_ms < w.restart_backoff_ms {
            return Err(ConfigError::Invalid(
                "workers.restart_backoff_ms must be above 0 and at most restart_backoff_max_ms".into(),
            ));
        }
        let mut ids = std::collections::HashSet::new();
        for spec in &w.worker {
            if spec.id.is_empty() || spec.id.len() > 128 || !ids.insert(spec.id.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "workers.worker id {:?} is empty, too long or repeated",
                    spec.id
                )));
            }
            for d in &spec.devices {
                d.parse::<memwarden_core::DeviceId>()
                    .map_err(|e| ConfigError::Invalid(format!("workers.worker {}: device {d}: {e}", spec.id)))?;
            }
        }
        if !(0.0..=100.0).contains(&self.weights.park_pool_max_percent) {
            return Err(ConfigError::Invalid("weights.park_pool_max_percent must be between 0 and 100".into()));
        }
        if !(0.0..=1.0).contains(&self.defrag.fragmentation_threshold) {
            return Err(ConfigError::Invalid("defrag.fragmentation_threshold must be between 0 and 1".into()));
        }
        quotas::rules(&self.quotas).map_err(ConfigError::Invalid)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse(""), Ok(Config::default()));
        assert_eq!(Config::default().listen.to_string(), "127.0.0.1:5000");
    }

    #[test]
    fn keys_override_and_unknown_keys_are_refused() {
        let c = parse("listen = \"127.0.0.1:6000\"\n[pool]\nblock_size_bytes = 134217728\n").expect("valid");
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.pool.block_size_bytes, 128 * MIB);
        assert_eq!(c.pool.dedicated_threshold_bytes, 32 * MIB, "other keys keep defaults");
        assert!(parse("lisen = \"127.0.0.1:1\"").is_err());
        assert!(parse("[pool]\nblock_size = 1").is_err());
    }

    #[test]
    fn the_replaced_fragmentation_key_names_its_replacement_and_one_threshold_serves_both() {
        let e = parse("[analytics]\nfragmentation_threshold = 0.4\n").expect_err("refused");
        assert!(e.contains("replaced by defrag.fragmentation_threshold"), "{e}");
        let c = parse("[defrag]\nfragmentation_threshold = 0.45\n").expect("valid");
        assert_eq!(c.advice_thresholds().fragmentation, 0.45);
    }

    #[test]
    fn non_loopback_needs_a_token() {
        assert!(parse("listen = \"0.0.0.0:5000\"").expect_err("refused").contains("auth_token"));
        assert!(parse("listen = \"0.0.0.0:5000\"\nauth_token = \"s3cret\"").is_ok());
    }

    #[test]
    fn the_token_can_come_from_a_file() {
        let dir = std::env::temp_dir().join(format!("mw-token-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (token, config) = (dir.join("token"), dir.join("memwarden.toml"));
        std::fs::write(&token, "s3cret\n").expect("token");
        let listen = "listen = \"0.0.0.0:5000\"\n";
        std::fs::write(&config, format!("{listen}auth_token_file = \"{}\"\n", token.display())).expect("config");
        assert_eq!(Config::load(&config).expect("valid").auth_token.as_deref(), Some("s3cret"), "trimmed");
        std::fs::write(&token, " \n").expect("token");
        assert!(Config::load(&config).expect_err("refused").to_string().contains("is empty"));
        std::fs::remove_file(&token).expect("rm");
        assert!(Config::load(&config).expect_err("refused").to_string().contains("auth_token_file"));
        let both = format!("{listen}auth_token = \"a\"\nauth_token_file = \"{}\"\n", token.display());
        std::fs::write(&config, both).expect("config");
        assert!(Config::load(&config).expect_err("refused").to_string().contains("not both"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn defrag_section_parses_and_is_checked() {
        let c =
            parse("[defrag]\nauto = true\nstrategy = \"thorough\"\nfragmentation_threshold = 0.5\n").expect("valid");
        assert!(c.defrag.auto);
        assert_eq!(c.defrag.strategy, memwarden_core::defrag::DefragStrategy::Thorough);
        assert!(parse("[defrag]\nstrategy = \"tidy\"").expect_err("refused").contains("strategy"));
        assert!(parse("[defrag]\nfragmentation_threshold = 1.5").is_err());
        let c = parse("[pool]\nmax_pool_bytes = 1073741824\n[host]\nshared_memory_dir = \"\"\n[cuda]\nenabled = false")
            .expect("valid");
        assert_eq!(c.pool.max_pool_bytes, GIB);
        assert!(c.host.shared_memory_dir.as_os_str().is_empty());
        assert!(!c.cuda.enabled);
    }

    #[test]
    fn pressure_thresholds_are_keys_of_the_pressure_section_with_the_core_defaults() {
        assert_eq!(Config::default().pressure.thresholds, memwarden_core::pressure::PressureThresholds::default());
        let c = parse("[pressure]\nmoderate = 0.5\npsi_full_percent = 7\nhistory_size = 10\n").expect("valid");
        let t = c.pressure.thresholds;
        assert_eq!((t.moderate, t.high, t.psi_full_percent), (0.5, 0.90, 7.0), "other keys keep defaults");
        assert_eq!(c.pressure.history_size, 10);
        assert!(parse("[pressure]\nmoderat = 0.5").expect_err("refused").contains("unknown field `moderat`"));
        let e = parse("[pressure]\nhigh = 0.7").expect_err("refused");
        assert!(e.contains("pressure thresholds must satisfy 0 ≤ moderate ≤ high ≤ critical ≤ 1"), "{e}");
        assert!(parse("[pressure]\nhysteresis = 0.6").expect_err("refused").contains("hysteresis"));
    }

    #[test]
    fn pool_sizes_are_checked() {
        assert!(parse("[pool]\nblock_size_bytes = 1000").is_err());
        assert!(parse("[pool]\ndedicated_threshold_bytes = 0").is_err());
    }
}
