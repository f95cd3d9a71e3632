//! `[vulkan]`: GPUs of any vendor through Vulkan (`vulkan:N`).

use serde::Deserialize;
use std::path::PathBuf;

/// Which backend serves an NVIDIA GPU that CUDA and Vulkan both see (same UUID).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NvidiaOwner {
    #[default]
    Cuda,
    Vulkan,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct VulkanSection {
    /// Use Vulkan devices when a loader and driver are present.
    pub enabled: bool,
    /// Serve software drivers (Mesa's lavapipe) too; off on production hosts, on in CI.
    pub include_software: bool,
    /// `"cuda"` (default) or `"vulkan"`: which backend serves an NVIDIA GPU both see.
    pub nvidia: NvidiaOwner,
    /// The Vulkan loader library (`libvulkan.so.1`) to open; empty: the system's.
    pub loader: PathBuf,
    /// Copies between host and Vulkan memory import the host block
    /// (`VK_EXT_external_memory_host`) so the GPU's copy engine reads or writes it directly;
    /// `false`, or a driver without the extension: through a staging buffer (a CPU copy more).
    pub host_import: bool,
}

impl Default for VulkanSection {
    fn default() -> Self {
        VulkanSection {
            enabled: true,
            include_software: false,
            nvidia: NvidiaOwner::Cuda,
            loader: PathBuf::new(),
            host_import: true,
        }
    }
}

impl From<&VulkanSection> for memwarden_backends::VulkanOptions {
    fn from(c: &VulkanSection) -> Self {
        memwarden_backends::VulkanOptions {
            enabled: c.enabled,
            include_software: c.include_software,
            nvidia: match c.nvidia {
                NvidiaOwner::Cuda => memwarden_backends::NvidiaOwner::Cuda,
                NvidiaOwner::Vulkan => memwarden_backends::NvidiaOwner::Vulkan,
            },
            loader: (!c.loader.as_os_str().is_empty()).then(|| c.loader.clone()),
            host_access: Default::default(),
            host_import: c.host_import,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_default() {
        let c: VulkanSection = toml::from_str("include_software = true\nnvidia = \"vulkan\"").expect("parses");
        assert!(c.enabled && c.include_software && c.nvidia == NvidiaOwner::Vulkan);
        assert_eq!(VulkanSection::default().nvidia, NvidiaOwner::Cuda);
        assert!(toml::from_str::<VulkanSection>("nvidia = \"amd\"").is_err());
        let o = memwarden_backends::VulkanOptions::from(&VulkanSection::default());
        assert!(o.enabled && !o.include_software && o.loader.is_none());
    }
}

/// `[d3d12]`: GPUs through Direct3D 12 (`d3d12:N`, Windows only; ignored elsewhere).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct D3d12Section {
    /// List WARP and other software adapters too, as `vulkan.include_software` does for
    /// Vulkan's CPU drivers.
    pub include_software: bool,
}
