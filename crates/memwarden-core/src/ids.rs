//! Device ids (PyTorch style, with the seed clients' aliases) and memory kinds.

use std::fmt;
use std::str::FromStr;

/// The GPU APIs a device can be reached through; each has its own id prefix. Adding one is a
/// variant and its prefix here; every other part of memwarden goes through [`DeviceId`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GpuApi {
    /// NVIDIA GPUs through the CUDA driver: `cuda:N`.
    Cuda,
    /// Any vendor's GPU through Vulkan: `vulkan:N`.
    Vulkan,
    /// Any GPU through Direct3D 12 (Windows): `d3d12:N`.
    D3d12,
}

impl GpuApi {
    pub const ALL: [GpuApi; 3] = [GpuApi::Cuda, GpuApi::Vulkan, GpuApi::D3d12];

    /// The id prefix, which is also the backend's name (`cuda`, `vulkan`).
    pub const fn prefix(self) -> &'static str {
        match self {
            GpuApi::Cuda => "cuda",
            GpuApi::Vulkan => "vulkan",
            GpuApi::D3d12 => "d3d12",
        }
    }
}

/// A device id as PyTorch spells it: `cpu`, `cuda:0`, `cuda:1`, …, and `vulkan:N` for GPUs
/// reached through another API. `Copy`, and parsed without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceId {
    Cpu,
    Gpu(GpuApi, u32),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a device id (expected cpu, cuda:N, vulkan:N or d3d12:N; aliases gpu:N, gpu-N, gpu_N, cpu:0)")]
pub struct DeviceIdError(pub String);

impl FromStr for DeviceId {
    type Err = DeviceIdError;

    /// Accepts `cpu`, `cuda:N`, `vulkan:N` and the seed's aliases `gpu:N`, `gpu-N`, `gpu_N`
    /// (CUDA), `cpu:0`, `cpu-0`, `cpu_0` (case-insensitive, surrounding whitespace ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // No allocation: this runs on every API call.
        let t = s.trim();
        let err = || DeviceIdError(s.to_string());
        if t.eq_ignore_ascii_case("cpu") {
            return Ok(DeviceId::Cpu);
        }
        let (prefix, index) = t.split_once([':', '-', '_']).ok_or_else(err)?;
        if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let n: u32 = index.parse().map_err(|_| err())?;
        if prefix.eq_ignore_ascii_case("cpu") && n == 0 {
            return Ok(DeviceId::Cpu);
        }
        if prefix.eq_ignore_ascii_case("gpu") {
            return Ok(DeviceId::cuda(n));
        }
        GpuApi::ALL
            .into_iter()
            .find(|api| prefix.eq_ignore_ascii_case(api.prefix()))
            .map(|api| DeviceId::Gpu(api, n))
            .ok_or_else(err)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceId::Cpu => f.write_str("cpu"),
            DeviceId::Gpu(api, n) => write!(f, "{}:{n}", api.prefix()),
        }
    }
}

impl DeviceId {
    /// `cuda:n`.
    pub const fn cuda(n: u32) -> DeviceId {
        DeviceId::Gpu(GpuApi::Cuda, n)
    }

    /// Parses `text` as a device of a host with `known` devices: like [`str::parse`], except
    /// that the seed's `gpu:N` alias (also `gpu-N`, `gpu_N`), which names CUDA's GPU N, names
    /// `vulkan:N` on a host where every GPU is Vulkan's.
    pub fn parse_among(text: &str, known: &[DeviceId]) -> Result<DeviceId, DeviceIdError> {
        let id: DeviceId = text.parse()?;
        let alias = text.trim().get(..3).is_some_and(|p| p.eq_ignore_ascii_case("gpu"));
        let has = |api| known.iter().any(|k| matches!(k, DeviceId::Gpu(a, _) if *a == api));
        match id {
            DeviceId::Gpu(GpuApi::Cuda, n) if alias && !has(GpuApi::Cuda) && has(GpuApi::Vulkan) => {
                Ok(DeviceId::Gpu(GpuApi::Vulkan, n))
            }
            _ => Ok(id),
        }
    }

    pub const fn is_gpu(self) -> bool {
        matches!(self, DeviceId::Gpu(..))
    }

    /// The GPU API and index, for GPUs.
    pub const fn gpu(self) -> Option<(GpuApi, u32)> {
        match self {
            DeviceId::Cpu => None,
            DeviceId::Gpu(api, n) => Some((api, n)),
        }
    }

    /// The memory kind an allocation gets when the request names none.
    pub fn default_kind(self) -> MemoryKind {
        match self {
            DeviceId::Cpu => MemoryKind::Host,
            DeviceId::Gpu(..) => MemoryKind::Device,
        }
    }
}

/// What an allocation holds. `Reservation` is budget only: an admission ticket with no memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemoryKind {
    Device,
    Pinned,
    Host,
    Reservation,
}

impl MemoryKind {
    pub const ALL: [MemoryKind; 4] =
        [MemoryKind::Device, MemoryKind::Pinned, MemoryKind::Host, MemoryKind::Reservation];

    /// The seed's clients' names for memory kinds (its `MemoryType` enum), each with the kind
    /// memwarden gives it: GPU memory is `device`, system memory is `host`.
    pub const SEED_ALIASES: [(&'static str, MemoryKind); 5] = [
        ("gpu", MemoryKind::Device),
        ("vram", MemoryKind::Device),
        ("ram", MemoryKind::Host),
        ("cpu", MemoryKind::Host),
        ("system", MemoryKind::Host),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MemoryKind::Device => "device",
            MemoryKind::Pinned => "pinned",
            MemoryKind::Host => "host",
            MemoryKind::Reservation => "reservation",
        }
    }
}

impl fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a memory kind (expected device, pinned, host or reservation; the seed's GPU, VRAM, RAM, CPU and System are taken too)")]
pub struct MemoryKindError(pub String);

impl FromStr for MemoryKind {
    type Err = MemoryKindError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        MemoryKind::ALL
            .into_iter()
            .find(|k| k.as_str() == lower)
            .or_else(|| MemoryKind::SEED_ALIASES.iter().find(|(a, _)| *a == lower).map(|(_, k)| *k))
            .ok_or_else(|| MemoryKindError(s.to_string()))
    }
}

/// How another process maps a dedicated block's descriptor (the weights protocol's
/// `handle`): which import call the holder makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HandleKind {
    /// A CUDA VMM allocation exported as a POSIX file descriptor.
    CudaVmm,
    /// A file in a tmpfs.
    Shm,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_and_aliases_parse() {
        for (text, want) in [
            ("cpu", DeviceId::Cpu),
            ("CPU", DeviceId::Cpu),
            ("cpu:0", DeviceId::Cpu),
            ("cpu-0", DeviceId::Cpu),
            ("cpu_0", DeviceId::Cpu),
            ("cuda:0", DeviceId::cuda(0)),
            ("cuda:12", DeviceId::cuda(12)),
            ("gpu:1", DeviceId::cuda(1)),
            ("gpu-2", DeviceId::cuda(2)),
            ("gpu_3", DeviceId::cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceId>(), Ok(want), "{text}");
        }
        assert_eq!("vulkan:1".parse::<DeviceId>(), Ok(DeviceId::Gpu(GpuApi::Vulkan, 1)));
        assert_eq!("Vulkan_0".parse::<DeviceId>().map(|d| d.to_string()), Ok("vulkan:0".into()));
        for bad in ["", "cpu:1", "cuda", "cuda:", "cuda:x", "tpu:0", "cuda:-1", "cuda:+1", "gpu:99999999999", "vulkan"]
        {
            assert!(bad.parse::<DeviceId>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn the_gpu_alias_names_vulkan_only_where_every_gpu_is_vulkans() {
        let vulkan = DeviceId::Gpu(GpuApi::Vulkan, 0);
        let only_vulkan = [DeviceId::Cpu, vulkan];
        let both = [DeviceId::Cpu, DeviceId::cuda(0), vulkan];
        assert_eq!(DeviceId::parse_among("gpu:0", &only_vulkan), Ok(vulkan));
        assert_eq!(DeviceId::parse_among(" GPU-1", &only_vulkan), Ok(DeviceId::Gpu(GpuApi::Vulkan, 1)));
        assert_eq!(DeviceId::parse_among("gpu:0", &both), Ok(DeviceId::cuda(0)));
        assert_eq!(DeviceId::parse_among("gpu:0", &[DeviceId::Cpu]), Ok(DeviceId::cuda(0)));
        assert_eq!(DeviceId::parse_among("cuda:0", &only_vulkan), Ok(DeviceId::cuda(0)));
        assert!(DeviceId::parse_among("gpu", &only_vulkan).is_err());
    }

    #[test]
    fn device_ids_print_canonically() {
        assert_eq!("gpu-4".parse::<DeviceId>().map(|d| d.to_string()), Ok("cuda:4".into()));
        assert_eq!(DeviceId::Cpu.to_string(), "cpu");
    }

    #[test]
    fn memory_kinds_round_trip() {
        for k in MemoryKind::ALL {
            assert_eq!(k.as_str().parse::<MemoryKind>(), Ok(k));
        }
        for (seed, kind) in [("GPU", MemoryKind::Device), ("VRAM", MemoryKind::Device), ("RAM", MemoryKind::Host)] {
            assert_eq!(seed.parse::<MemoryKind>(), Ok(kind));
        }
        for (seed, kind) in [("CPU", MemoryKind::Host), ("System", MemoryKind::Host), (" system ", MemoryKind::Host)] {
            assert_eq!(seed.parse::<MemoryKind>(), Ok(kind));
        }
        assert!("swap".parse::<MemoryKind>().is_err());
        assert_eq!(DeviceId::Cpu.default_kind(), MemoryKind::Host);
        assert_eq!(DeviceId::cuda(0).default_kind(), MemoryKind::Device);
    }
}
