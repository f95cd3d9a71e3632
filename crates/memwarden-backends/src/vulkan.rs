//! The Vulkan backend: one [`VulkanBackend`] per served Vulkan device (`vulkan:N`, numbered in
//! the loader's order among the devices served). Blocks are device-local `vkAllocateMemory`
//! allocations with a buffer over each, copies are `vkCmdCopyBuffer` on a transfer queue, and
//! the host reads and writes them through a mapping or a staging buffer. Status covers the
//! device-local heaps: `VK_EXT_memory_budget` where the driver has it, else heap size less
//! memwarden's own blocks.

use crate::backend::{
    Backend, BackendError, BlockExport, BlockMemory, DeviceInfo, ExportHandle, ExportedAllocation, GpuInfo,
    MemoryReading,
};
use crate::dedicated::{DedicatedError, DedicatedMemory};
use memwarden_core::{DeviceId, GpuApi, MemoryKind};
use memwarden_sys::vulkan::{
    self, DeviceMemory, DeviceType, HostAccess, PhysicalDeviceInfo, VulkanDevice, VulkanError, VulkanInstance,
};
use std::any::Any;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Which backend serves an NVIDIA GPU that both CUDA and Vulkan see (same UUID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NvidiaOwner {
    #[default]
    Cuda,
    Vulkan,
}

/// What Vulkan discovery reads from the configuration (`[vulkan]`).
#[derive(Debug, Clone, PartialEq)]
pub struct VulkanOptions {
    pub enabled: bool,
    /// Serve software drivers (lavapipe: `VK_PHYSICAL_DEVICE_TYPE_CPU`) too.
    pub include_software: bool,
    pub nvidia: NvidiaOwner,
    /// The loader library; `None`: the system's `libvulkan.so.1`.
    pub loader: Option<PathBuf>,
    /// How the host reads and writes blocks (tests force the staging path).
    pub host_access: HostAccess,
    /// Import host blocks for copies (`VK_EXT_external_memory_host`) where the driver can.
    pub host_import: bool,
}

impl Default for VulkanOptions {
    fn default() -> Self {
        VulkanOptions {
            enabled: false,
            include_software: false,
            nvidia: NvidiaOwner::Cuda,
            loader: None,
            host_access: HostAccess::Auto,
            host_import: true,
        }
    }
}

/// A physical device chosen to be served, and the CUDA device it takes over, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Chosen {
    pub info: PhysicalDeviceInfo,
    pub cuda_twin: Option<DeviceId>,
}

/// Which physical devices are served (in order), the UUIDs taken from CUDA, and a note for each
/// device left out. `cuda` lists the CUDA devices found (UUID, id).
pub fn choose(
    devices: &[PhysicalDeviceInfo],
    options: &VulkanOptions,
    cuda: &[(String, DeviceId)],
) -> (Vec<Chosen>, Vec<String>, Vec<String>) {
    let (mut chosen, mut claims, mut left_out) = (vec![], vec![], vec![]);
    for d in devices {
        let uuid = d.uuid_string();
        let twin = cuda.iter().find(|(u, _)| *u == uuid).map(|(_, id)| *id);
        if d.device_type == DeviceType::Cpu && !options.include_software {
            left_out.push(format!("{} is a software driver (vulkan.include_software = false)", d.name));
        } else if let (Some(id), NvidiaOwner::Cuda) = (twin, options.nvidia) {
            left_out.push(format!("{} is served as {id} (vulkan.nvidia = \"cuda\")", d.name));
        } else {
            if twin.is_some() {
                claims.push(uuid);
            }
            chosen.push(Chosen { info: d.clone(), cuda_twin: twin });
        }
    }
    (chosen, claims, left_out)
}

/// Opens the loader and the chosen devices: `Ok((backends, UUIDs taken from CUDA))`, or why
/// Vulkan serves nothing here.
pub fn discover(
    options: &VulkanOptions,
    cuda: &[(String, DeviceId)],
) -> Result<(Vec<VulkanBackend>, Vec<String>), String> {
    if !options.enabled {
        return Err("disabled in the configuration (vulkan.enabled = false)".into());
    }
    let instance = VulkanInstance::new(options.loader.as_deref()).map_err(|e| e.to_string())?;
    let devices = instance.physical_devices().map_err(|e| e.to_string())?;
    if devices.is_empty() {
        return Err("the Vulkan loader reports no device".into());
    }
    let (chosen, claims, left_out) = choose(&devices, options, cuda);
    if chosen.is_empty() {
        return Err(format!("every Vulkan device is left out: {}", left_out.join("; ")));
    }
    for note in &left_out {
        tracing::info!("Vulkan device left out: {note}");
    }
    let backends = chosen
        .into_iter()
        .enumerate()
        .map(|(n, c)| {
            let device = VulkanDevice::open(&instance, c.info.index, options.host_access)
                .map_err(|e| format!("vulkan:{n} ({}): {e}", c.info.name))?;
            if !options.host_import {
                device.disable_host_import();
            }
            Ok(VulkanBackend::new(n as u32, device, c.cuda_twin))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((backends, claims))
}

pub struct VulkanBackend {
    device: Arc<VulkanDevice>,
    info: DeviceInfo,
    /// The last driver error other than lack of memory: the device is then unhealthy.
    fault: Mutex<Option<String>>,
}

impl std::fmt::Debug for VulkanBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VulkanBackend").field("info", &self.info).finish()
    }
}

#[derive(Debug)]
pub(crate) struct VulkanBlock {
    pub(crate) memory: DeviceMemory,
    index: u32,
}

/// A driver error as a backend error (without recording a fault).
fn vulkan_error(e: VulkanError) -> BackendError {
    match e {
        VulkanError::OutOfBounds { .. } | VulkanError::InvalidArgument(_) => {
            BackendError::InvalidArgument(e.to_string())
        }
        VulkanError::OutOfMemory { operation, bytes } => BackendError::OutOfMemory {
            requested_bytes: bytes,
            available_bytes: 0,
            detail: format!("{operation}: out of memory"),
        },
        VulkanError::Unavailable(reason) => BackendError::Unavailable { reason },
        VulkanError::Driver { operation, result } => BackendError::Failed { operation, message: result },
    }
}

impl BlockMemory for VulkanBlock {
    fn address(&self) -> u64 {
        self.memory.address()
    }
    fn size_bytes(&self) -> u64 {
        self.memory.len_bytes()
    }
    fn kind(&self) -> MemoryKind {
        MemoryKind::Device
    }
    fn location(&self) -> DeviceId {
        DeviceId::Gpu(GpuApi::Vulkan, self.index)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        self.memory.read(offset, out).map_err(vulkan_error)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.memory.write(offset, data).map_err(vulkan_error)
    }
    /// An opaque fd of the block's allocation, where the driver exports them, with the UUID of
    /// the physical device for the importer to find it.
    fn export(&self) -> Result<BlockExport, BackendError> {
        let e = self.memory.export().map_err(vulkan_error)?;
        Ok(BlockExport {
            kind: "vulkanOpaqueFd",
            handle: ExportHandle::Fd(e.fd),
            device_uuid: Some(self.memory.device().info().uuid_string()),
            allocation: Some(ExportedAllocation {
                allocation_bytes: e.allocation_bytes,
                memory_type_index: e.memory_type_index,
                dedicated: e.dedicated,
                buffer_bytes: e.buffer_bytes,
            }),
        })
    }
}

/// The Vulkan memory of a block, for blocks of this backend.
pub(crate) fn memory(block: &dyn BlockMemory) -> Result<&DeviceMemory, BackendError> {
    block
        .as_any()
        .downcast_ref::<VulkanBlock>()
        .map(|b| &b.memory)
        .ok_or_else(|| BackendError::InvalidArgument("block does not belong to a Vulkan backend".into()))
}

/// A copy between a host block and a Vulkan block, either way ([`vulkan::copy_host`]: the host
/// pages imported for the copy engine where the driver can, else staged).
pub(crate) fn copy_with_host(
    block: &DeviceMemory,
    block_offset: u64,
    host: &memwarden_sys::HostMapping,
    host_offset: u64,
    len: u64,
    dir: vulkan::HostCopy,
) -> Result<(), BackendError> {
    vulkan::copy_host(block, block_offset, host, host_offset, len, dir).map(|_| ()).map_err(vulkan_error)
}

/// A copy between two blocks of one Vulkan device (`vkCmdCopyBuffer`).
pub(crate) fn copy_blocks(
    src: &DeviceMemory,
    src_offset: u64,
    dst: &DeviceMemory,
    dst_offset: u64,
    len: u64,
) -> Result<(), BackendError> {
    vulkan::copy(dst, dst_offset, src, src_offset, len).map_err(vulkan_error)
}

impl VulkanBackend {
    /// `vulkan:n` over an opened device; `cuda_twin`: the CUDA id of the same GPU, which this
    /// backend serves instead.
    pub fn new(n: u32, device: Arc<VulkanDevice>, cuda_twin: Option<DeviceId>) -> Self {
        let p = device.info();
        let mut extra = std::collections::BTreeMap::new();
        extra.insert("api".to_string(), "vulkan".to_string());
        extra.insert("vendor".into(), p.vendor());
        extra.insert("vendorId".into(), format!("0x{:04x}", p.vendor_id));
        extra.insert("driver".into(), p.driver_name.clone().unwrap_or_default());
        extra.insert("driverInfo".into(), p.driver_info.clone().unwrap_or_default());
        extra.insert("driverVersion".into(), p.driver_version.to_string());
        extra.insert("apiVersion".into(), p.api_version.clone());
        extra.insert("physicalDeviceType".into(), p.device_type.as_str().into());
        extra.insert("physicalDeviceIndex".into(), p.index.to_string());
        let host_access = match (device.blocks_mapped(), device.imports_host_memory()) {
            (true, _) => "mapped",
            (false, true) => "imported",
            (false, false) => "staged",
        };
        extra.insert("hostAccess".into(), host_access.into());
        let queue = if device.block_copies_on_compute_queue() { "compute" } else { "transfer" };
        extra.insert("blockCopyQueue".into(), queue.into());
        extra.insert(
            "export".into(),
            match device.export_support() {
                Ok(()) => "opaque fd over the Unix socket (VK_KHR_external_memory_fd)".into(),
                Err(why) => format!("none: {why}"),
            },
        );
        if let Some(id) = cuda_twin {
            extra.insert("sameGpuAs".into(), format!("{id} (left out: vulkan.nvidia = \"vulkan\")"));
        }
        let info = DeviceInfo {
            device_id: DeviceId::Gpu(GpuApi::Vulkan, n),
            device_type: "GPU",
            name: p.name.clone(),
            memory_type: "VRAM",
            gpu: Some(GpuInfo {
                uuid: p.uuid_string(),
                pci_bus_id: p.pci_bus_id.clone().unwrap_or_default(),
                compute_capability: String::new(),
                memory_bandwidth_bytes_per_s: None,
            }),
            extra,
        };
        VulkanBackend { device, info, fault: Mutex::new(None) }
    }

    /// (total, available, source) over the device-local heaps.
    fn totals(&self) -> (u64, u64, &'static str) {
        let heaps = self.device.heaps();
        let total: u64 = heaps.iter().map(|h| h.size_bytes).sum();
        let budgets: Option<Vec<(u64, u64, u64)>> =
            heaps.iter().map(|h| Some((h.size_bytes, h.budget_bytes?, h.usage_bytes?))).collect();
        match budgets {
            Some(b) if !b.is_empty() => {
                let available = b.iter().map(|&(size, budget, usage)| budget.saturating_sub(usage).min(size)).sum();
                (total, available, "vk-memory-budget")
            }
            _ => (total, total.saturating_sub(self.device.own_bytes()), "vk-heap-size"),
        }
    }

    fn error(&self, e: VulkanError, requested_bytes: u64) -> BackendError {
        match e {
            VulkanError::OutOfMemory { operation, bytes } => BackendError::OutOfMemory {
                requested_bytes: bytes.max(requested_bytes),
                available_bytes: self.totals().1,
                detail: format!("{operation} on {} failed: out of device memory", self.info.device_id),
            },
            VulkanError::Driver { .. } => {
                let message = e.to_string();
                *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.clone());
                vulkan_error(e)
            }
            other => vulkan_error(other),
        }
    }
}

impl Backend for VulkanBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn kinds(&self) -> &[MemoryKind] {
        &[MemoryKind::Device]
    }

    /// Total: the device-local heaps. Available: with `VK_EXT_memory_budget`, Σ (budget −
    /// usage), where usage counts this process only and the budget is the driver's estimate
    /// of what this process can get (other processes count only as far as the driver lowers
    /// it); without, heap size less memwarden's own blocks (other processes not counted).
    fn read_status(&self) -> Result<MemoryReading, BackendError> {
        let (total, available, source) = self.totals();
        Ok(MemoryReading {
            total_bytes: total,
            available_bytes: available.min(total),
            used_bytes: total - available.min(total),
            source: source.into(),
            reserved_bytes: None,
            processes: vec![],
        })
    }

    /// None yet: holders map held weights as CUDA VMM or tmpfs descriptors, and no holder
    /// imports Vulkan memory (an opaque fd would be simple to export; the holder side is not).
    fn dedicated(&self) -> Result<Arc<dyn DedicatedMemory>, DedicatedError> {
        Err(DedicatedError::Unsupported {
            device: self.info.device_id,
            reason: "no weights holder imports Vulkan memory yet".into(),
        })
    }

    /// Blocks are exported as opaque fds (`VK_KHR_external_memory_fd`).
    fn exports_need_descriptor_passing(&self) -> bool {
        true
    }

    fn max_alignment_bytes(&self) -> u64 {
        vulkan::BLOCK_ALIGNMENT_BYTES
    }

    fn create_block(&self, kind: MemoryKind, size_bytes: u64) -> Result<Box<dyn BlockMemory>, BackendError> {
        if kind != MemoryKind::Device {
            return Err(BackendError::UnsupportedKind { device: self.info.device_id, kind });
        }
        let memory = self.device.alloc(size_bytes).map_err(|e| self.error(e, size_bytes))?;
        let index = self.info.device_id.gpu().map(|(_, n)| n).unwrap_or(0);
        Ok(Box::new(VulkanBlock { memory, index }))
    }

    fn copy(
        &self,
        src: &dyn BlockMemory,
        src_offset: u64,
        dst: &dyn BlockMemory,
        dst_offset: u64,
        len_bytes: u64,
    ) -> Result<(), BackendError> {
        let (s, d) = (memory(src)?, memory(dst)?);
        vulkan::copy(d, dst_offset, s, src_offset, len_bytes).map_err(|e| self.error(e, len_bytes))
    }

    fn write(&self, block: &dyn BlockMemory, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        memory(block)?.write(offset, data).map_err(|e| self.error(e, data.len() as u64))
    }

    fn read(&self, block: &dyn BlockMemory, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        memory(block)?.read(offset, out).map_err(|e| self.error(e, out.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memwarden_core::units::GIB;

    fn device(index: u32, name: &str, device_type: DeviceType, uuid: u8) -> PhysicalDeviceInfo {
        PhysicalDeviceInfo {
            index,
            name: name.into(),
            vendor_id: 0x10de,
            device_type,
            driver_name: None,
            driver_info: None,
            driver_version: 0,
            api_version: "1.3.0".into(),
            uuid: [uuid; 16],
            memory_budget: true,
            external_memory_fd: true,
            external_memory_host: true,
            pci_bus_id: None,
            device_local_heaps: vec![GIB],
        }
    }

    #[test]
    fn software_devices_and_cuda_gpus_are_left_out_unless_configured() {
        let gpu = device(0, "H200", DeviceType::Discrete, 0xab);
        let lvp = device(1, "llvmpipe", DeviceType::Cpu, 0);
        let devices = [gpu.clone(), lvp.clone()];
        let cuda = [(gpu.uuid_string(), DeviceId::cuda(0))];
        let defaults = VulkanOptions { enabled: true, ..VulkanOptions::default() };
        let (chosen, claims, left_out) = choose(&devices, &defaults, &cuda);
        assert!(chosen.is_empty() && claims.is_empty(), "{chosen:?}");
        assert!(left_out[0].contains("served as cuda:0") && left_out[1].contains("include_software"), "{left_out:?}");
        let all = VulkanOptions { include_software: true, nvidia: NvidiaOwner::Vulkan, ..defaults.clone() };
        let (chosen, claims, left_out) = choose(&devices, &all, &cuda);
        assert_eq!(
            chosen,
            vec![
                Chosen { info: gpu.clone(), cuda_twin: Some(DeviceId::cuda(0)) },
                Chosen { info: lvp, cuda_twin: None }
            ]
        );
        assert_eq!(claims, vec![gpu.uuid_string()]);
        assert!(left_out.is_empty());
        // Without CUDA devices the NVIDIA GPU is Vulkan's whatever `nvidia` says.
        let (chosen, claims, _) = choose(&devices, &defaults, &[]);
        assert_eq!(chosen.len(), 1);
        assert!(claims.is_empty());
    }

    #[test]
    fn a_missing_loader_or_a_disabled_api_is_a_reason() {
        let options = VulkanOptions {
            enabled: true,
            loader: Some("/nonexistent/libvulkan.so.1".into()),
            ..VulkanOptions::default()
        };
        let e = discover(&options, &[]).expect_err("no loader there");
        assert!(e.contains("/nonexistent/libvulkan.so.1"), "{e}");
        let e = discover(&VulkanOptions::default(), &[]).expect_err("disabled");
        assert!(e.contains("vulkan.enabled = false"), "{e}");
    }
}
