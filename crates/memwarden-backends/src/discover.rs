//! Which backends this machine has. The host backend is always there; each GPU API registers
//! one discovery function in [`GPU_APIS`], which finds its devices or says why it cannot.
//! Adding a GPU API is its sys module, its backend module, its line in [`GPU_APIS`], its
//! config section and its status fields ([`crate::DeviceInfo::extra`]). An API listed later
//! sees what earlier ones found, and may take a GPU both see (`Found::claims`).

use crate::backend::Backend;
use crate::cuda::CudaSystem;
use crate::host::{HostBackend, HostStatusReader};
use crate::signals::HostSignals;
use crate::vulkan::{self, VulkanOptions};
use memwarden_sys::cuda::CudaContext;
use std::path::PathBuf;
use std::sync::Arc;

/// What discovery reads from the daemon's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoverConfig {
    /// Root of the proc filesystem and of the cgroup tree (tests point them at fixtures).
    pub proc_root: PathBuf,
    pub cgroup_root: PathBuf,
    /// Host blocks are files here (a tmpfs) so they can be exported; `None`: anonymous memory.
    pub shared_memory_dir: Option<PathBuf>,
    /// Group (gid) given the shared files, mode 0660; `None`: the daemon's user only, 0600.
    pub shared_memory_group: Option<u32>,
    /// Use NVIDIA GPUs when a driver is present.
    pub cuda: bool,
    /// `[vulkan]`.
    pub vulkan: VulkanOptions,
    /// `d3d12.include_software`: list WARP and CPU drivers as `d3d12:N` too (Windows).
    pub d3d12_include_software: bool,
}

impl Default for DiscoverConfig {
    fn default() -> Self {
        DiscoverConfig {
            proc_root: memwarden_sys::status::PROC_ROOT.into(),
            cgroup_root: memwarden_sys::status::CGROUP_ROOT.into(),
            shared_memory_dir: None,
            shared_memory_group: None,
            cuda: true,
            vulkan: VulkanOptions { enabled: true, ..VulkanOptions::default() },
            d3d12_include_software: false,
        }
    }
}

/// One backend's state at start-up, as `/health` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendHealth {
    pub name: &'static str,
    pub available: bool,
    pub devices: Vec<String>,
    pub reason: Option<String>,
}

/// What a GPU API found.
pub struct Found {
    pub name: &'static str,
    /// Its devices, or why it has none here.
    pub devices: Result<Vec<Arc<dyn Backend>>, String>,
    /// A context the host backend registers pinned memory with (CUDA's first GPU).
    pub pinning: Option<Arc<CudaContext>>,
    /// UUIDs of GPUs this API serves that an API listed before it found too (which then
    /// leaves them out): `vulkan.nvidia = "vulkan"`.
    pub claims: Vec<String>,
}

/// One GPU API's discovery: the configuration, and what the APIs listed before it found.
pub type Discover = fn(&DiscoverConfig, &[Found]) -> Found;

/// Every GPU API, in the order their devices are listed.
#[cfg(not(windows))]
pub const GPU_APIS: &[Discover] = &[discover_cuda, discover_vulkan];
/// On Windows Direct3D 12 too (`d3d12:N`).
#[cfg(windows)]
pub const GPU_APIS: &[Discover] = &[discover_cuda, discover_vulkan, discover_d3d12];

#[cfg(windows)]
fn discover_d3d12(config: &DiscoverConfig, _earlier: &[Found]) -> Found {
    Found {
        name: "d3d12",
        devices: crate::d3d12::discover(config.d3d12_include_software),
        pinning: None,
        claims: vec![],
    }
}

/// Every backend of this machine, the health of each API, and the host's pressure signals.
pub struct Discovered {
    pub backends: Vec<Arc<dyn Backend>>,
    pub health: Vec<BackendHealth>,
    /// Shares the host backend's status reader.
    pub host_signals: Arc<dyn HostSignals>,
}

/// Builds every available backend. Never fails: an API that cannot start is listed as
/// unavailable with its reason.
pub fn discover(config: &DiscoverConfig) -> Discovered {
    let mut found: Vec<Found> = Vec::new();
    for api in GPU_APIS {
        let f = api(config, &found);
        for earlier in found.iter_mut() {
            hand_over(earlier, &f);
        }
        found.push(f);
    }
    let pinning = found.iter().find_map(|f| f.pinning.clone());
    let host = HostBackend::new(HostStatusReader::new(&config.proc_root, &config.cgroup_root))
        .with_shared_dir(config.shared_memory_dir.clone())
        .with_shared_group(config.shared_memory_group)
        .with_cuda(pinning);
    let host_signals = host.signals();
    let mut backends: Vec<Arc<dyn Backend>> = vec![Arc::new(host)];
    let mut health = vec![BackendHealth { name: "host", available: true, devices: vec!["cpu".into()], reason: None }];
    for f in found {
        match f.devices {
            Ok(devices) => {
                health.push(BackendHealth {
                    name: f.name,
                    available: true,
                    devices: devices.iter().map(|d| d.info().device_id.to_string()).collect(),
                    reason: None,
                });
                backends.extend(devices);
            }
            Err(reason) => {
                tracing::info!("{} backend unavailable: {reason}", f.name);
                health.push(BackendHealth { name: f.name, available: false, devices: vec![], reason: Some(reason) });
            }
        }
    }
    Discovered { backends, health, host_signals }
}

/// Leaves out of `earlier` the GPUs `later` claims.
fn hand_over(earlier: &mut Found, later: &Found) {
    let Ok(devices) = &mut earlier.devices else { return };
    if later.claims.is_empty() {
        return;
    }
    let claimed = |b: &Arc<dyn Backend>| b.info().gpu.as_ref().is_some_and(|g| later.claims.contains(&g.uuid));
    let taken: Vec<String> = devices.iter().filter(|b| claimed(b)).map(|b| b.info().device_id.to_string()).collect();
    devices.retain(|b| !claimed(b));
    if devices.is_empty() && !taken.is_empty() {
        earlier.devices = Err(format!(
            "{} served by {} instead ({}.nvidia = \"{}\")",
            taken.join(", "),
            later.name,
            later.name,
            later.name
        ));
    }
}

/// The UUID and id of every GPU an earlier API found.
fn found_gpus(found: &[Found]) -> Vec<(String, memwarden_core::DeviceId)> {
    found
        .iter()
        .filter_map(|f| f.devices.as_ref().ok())
        .flatten()
        .filter_map(|b| b.info().gpu.as_ref().map(|g| (g.uuid.clone(), b.info().device_id)))
        .collect()
}

fn discover_vulkan(config: &DiscoverConfig, earlier: &[Found]) -> Found {
    match vulkan::discover(&config.vulkan, &found_gpus(earlier)) {
        Ok((backends, claims)) => Found {
            name: "vulkan",
            devices: Ok(backends.into_iter().map(|b| Arc::new(b) as Arc<dyn Backend>).collect()),
            pinning: None,
            claims,
        },
        Err(reason) => Found { name: "vulkan", devices: Err(reason), pinning: None, claims: vec![] },
    }
}

fn discover_cuda(config: &DiscoverConfig, _earlier: &[Found]) -> Found {
    let system = if config.cuda {
        CudaSystem::init()
    } else {
        Err("disabled in the configuration (cuda.enabled = false)".to_string())
    };
    match system {
        Ok(system) => Found {
            name: "cuda",
            pinning: system.contexts.first().cloned(),
            devices: Ok(system.backends().into_iter().map(|b| Arc::new(b) as Arc<dyn Backend>).collect()),
            claims: vec![],
        },
        Err(reason) => Found { name: "cuda", devices: Err(reason), pinning: None, claims: vec![] },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_always_found_and_a_disabled_api_says_why() {
        let vulkan = VulkanOptions::default();
        let d = discover(&DiscoverConfig { cuda: false, vulkan, ..DiscoverConfig::default() });
        assert_eq!(d.backends.len(), 1);
        assert_eq!(d.backends[0].info().device_id, memwarden_core::DeviceId::Cpu);
        assert_eq!(
            d.health[0],
            BackendHealth { name: "host", available: true, devices: vec!["cpu".into()], reason: None }
        );
        let cuda = d.health.iter().find(|h| h.name == "cuda").expect("cuda listed");
        assert!(
            !cuda.available && cuda.reason.as_deref().is_some_and(|r| r.contains("cuda.enabled = false")),
            "{cuda:?}"
        );
        let vulkan = d.health.iter().find(|h| h.name == "vulkan").expect("vulkan listed");
        assert!(!vulkan.available && vulkan.reason.as_deref().is_some_and(|r| r.contains("vulkan.enabled")));
    }

    #[test]
    fn software_vulkan_devices_are_served_only_when_asked() {
        let vulkan = VulkanOptions { enabled: true, ..VulkanOptions::default() };
        let d = discover(&DiscoverConfig { cuda: false, vulkan: vulkan.clone(), ..DiscoverConfig::default() });
        let h = d.health.iter().find(|h| h.name == "vulkan").expect("vulkan listed");
        assert!(!h.available && h.reason.as_deref().is_some_and(|r| r.contains("include_software")), "{h:?}");
        let vulkan = VulkanOptions { include_software: true, ..vulkan };
        let d = discover(&DiscoverConfig { cuda: false, vulkan, ..DiscoverConfig::default() });
        let h = d.health.iter().find(|h| h.name == "vulkan").expect("vulkan listed");
        assert!(h.available && h.devices.first().is_some_and(|d| d == "vulkan:0"), "{h:?}");
        assert_eq!(d.backends.len(), 1 + h.devices.len());
    }
}
