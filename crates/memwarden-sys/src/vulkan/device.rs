//! One opened Vulkan device: a queue that can transfer, device-local memory blocks, and copies.
//! Every command is recorded on the device's one command buffer, submitted and waited for
//! with a fence under one lock, so nothing is in flight when a call returns (and none when a
//! block is dropped).

use super::{HostAccess, PhysicalDeviceInfo, VulkanError, VulkanInstance};
use ash::vk;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes moved per step through the staging buffer (and through the scratch buffer of an
/// overlapping move within one block).
const STAGING_BYTES: u64 = 16 << 20;

/// Blocks are numbered in memwarden's own address space of the device, aligned to this:
/// Vulkan memory has no address without `bufferDeviceAddress`.
pub const BLOCK_ALIGNMENT_BYTES: u64 = 2 << 20;

/// How long a submission's fence is polled before the thread sleeps in `vkWaitForFences`.
const FENCE_SPIN: std::time::Duration = std::time::Duration::from_micros(100);

/// The queue, its command buffer and fence, and the staging buffer: used under one lock.
struct Submitter {
    queue: vk::Queue,
    pool: vk::CommandPool,
    cmd: vk::CommandBuffer,
    fence: vk::Fence,
    staging: Option<Staging>,
}

/// A host-visible, host-coherent buffer mapped for the device's lifetime.
struct Staging {
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    ptr: NonNull<u8>,
}

// SAFETY: the staging mapping is only touched under the device's submitter lock; the Vulkan
// handles are plain tokens usable from any thread when externally synchronised (the lock).
unsafe impl Send for Submitter {}

pub struct VulkanDevice {
    instance: Arc<VulkanInstance>,
    physical: vk::PhysicalDevice,
    info: PhysicalDeviceInfo,
    device: ash::Device,
    /// The memory type of blocks, and whether it is host-visible and coherent (mapped).
    block_type: u32,
    block_mapped: bool,
    /// A host-visible, coherent type for the staging buffer (when blocks are not mapped).
    staging_type: Option<u32>,
    /// `VkPhysicalDeviceMaintenance3Properties::maxMemoryAllocationSize`.
    max_allocation_bytes: u64,
    memory_properties: vk::PhysicalDeviceMemoryProperties,
    /// `VK_KHR_external_memory_fd`, when blocks are allocated exportable as opaque fds.
    export: Option<Export>,
    /// `VK_EXT_external_memory_host` and its `minImportedHostPointerAlignment`: host blocks are
    /// imported for a copy instead of staged.
    host_import: Option<(ash::ext::external_memory_host::Device, u64)>,
    /// Cleared by [`VulkanDevice::disable_host_import`] (configuration): copies stage instead.
    import_enabled: std::sync::atomic::AtomicBool,
    submitter: Mutex<Submitter>,
    /// Copies between blocks, on a queue of a family that can compute (where the driver copies
    /// with the GPU's cores, not only its copy engines), when that is not the transfer queue.
    block_copies: Option<Mutex<Submitter>>,
    next_address: AtomicU64,
    /// Bytes of blocks this process holds on the device now.
    own_bytes: AtomicU64,
}

mod external;
mod heaps;
mod transfer;
use external::Export;
pub(crate) use external::MappingImport;
pub use external::{copy_host, ExportedMemory, HostCopy, HostPath};
pub use transfer::copy;

impl std::fmt::Debug for VulkanDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VulkanDevice").field("info", &self.info).field("block_mapped", &self.block_mapped).finish()
    }
}

/// The memory type among `bits` whose flags `want` all and `avoid` none.
fn pick_type(
    props: &vk::PhysicalDeviceMemoryProperties,
    bits: u32,
    want: vk::MemoryPropertyFlags,
    avoid: vk::MemoryPropertyFlags,
) -> Option<u32> {
    props.memory_types_as_slice().iter().enumerate().find_map(|(i, t)| {
        let ok = bits & (1 << i) != 0 && t.property_flags.contains(want) && !t.property_flags.intersects(avoid);
        ok.then_some(i as u32)
    })
}

impl VulkanDevice {
    /// Opens physical device `index` with one queue that can transfer (a transfer-only family,
    /// the copy engines, where the device has one).
    pub fn open(instance: &Arc<VulkanInstance>, index: u32, access: HostAccess) -> Result<Arc<Self>, VulkanError> {
        let raw = instance.raw();
        let pd = instance.handle(index)?;
        let info = instance.describe(index, pd)?;
        // SAFETY: pd came from this instance.
        let families = unsafe { raw.get_physical_device_queue_family_properties(pd) };
        let any = vk::QueueFlags::TRANSFER | vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE;
        let dedicated = families.iter().position(|f| {
            f.queue_count > 0
                && f.queue_flags.contains(vk::QueueFlags::TRANSFER)
                && !f.queue_flags.intersects(vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE)
        });
        let family = dedicated
            .or_else(|| families.iter().position(|f| f.queue_count > 0 && f.queue_flags.intersects(any)))
            .ok_or_else(|| VulkanError::Unavailable(format!("{}: no queue can transfer", info.name)))?
            as u32;
        let compute = families
            .iter()
            .position(|f| f.queue_count > 0 && f.queue_flags.contains(vk::QueueFlags::COMPUTE))
            .map(|c| c as u32)
            .filter(|&c| c != family);
        let priorities = [1.0f32];
        let queues: Vec<_> = [Some(family), compute]
            .into_iter()
            .flatten()
            .map(|f| vk::DeviceQueueCreateInfo::default().queue_family_index(f).queue_priorities(&priorities))
            .collect();
        let mut extensions = vec![];
        for (on, name) in [
            (info.memory_budget, vk::EXT_MEMORY_BUDGET_NAME),
            (info.external_memory_fd, vk::KHR_EXTERNAL_MEMORY_FD_NAME),
            (info.external_memory_host, vk::EXT_EXTERNAL_MEMORY_HOST_NAME),
        ] {
            if on {
                extensions.push(name.as_ptr());
            }
        }
        let create = vk::DeviceCreateInfo::default().queue_create_infos(&queues).enabled_extension_names(&extensions);
        // SAFETY: the create info and its arrays live for the call; the extension was listed as
        // supported; the device is destroyed in Drop.
        let device = unsafe { raw.create_device(pd, &create, None) }
            .map_err(|e| VulkanError::from_vk("vkCreateDevice", 0, e))?;
        let mut maintenance3 = vk::PhysicalDeviceMaintenance3Properties::default();
        let mut host_props = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
        let mut p2 = vk::PhysicalDeviceProperties2::default().push_next(&mut maintenance3);
        if info.external_memory_host {
            p2 = p2.push_next(&mut host_props);
        }
        // SAFETY: Maintenance3 properties are core in 1.1, which every listed device has here;
        // the host-memory properties only when the device has that extension.
        unsafe { raw.get_physical_device_properties2(pd, &mut p2) };
        let host_import = (info.external_memory_host && Self::host_importable(raw, pd)).then(|| {
            (
                ash::ext::external_memory_host::Device::new(raw, &device),
                host_props.min_imported_host_pointer_alignment.max(1),
            )
        });
        let export = Self::exportable(raw, pd, &info)
            .map(|dedicated| Export { fd: ash::khr::external_memory_fd::Device::new(raw, &device), dedicated });
        // From here on Drop cleans up whatever was created (null handles are ignored by Vulkan).
        let mut dev = VulkanDevice {
            instance: instance.clone(),
            physical: pd,
            info,
            device,
            block_type: 0,
            block_mapped: false,
            staging_type: None,
            max_allocation_bytes: maintenance3.max_memory_allocation_size,
            // SAFETY: a plain query on this instance's physical device.
            memory_properties: unsafe { raw.get_physical_device_memory_properties(pd) },
            export,
            host_import,
            import_enabled: std::sync::atomic::AtomicBool::new(true),
            submitter: Mutex::new(Submitter::empty()),
            block_copies: compute.map(|_| Mutex::new(Submitter::empty())),
            next_address: AtomicU64::new(BLOCK_ALIGNMENT_BYTES),
            own_bytes: AtomicU64::new(0),
        };
        dev.init(family, compute, access)?;
        Ok(Arc::new(dev))
    }

    fn init(&mut self, family: u32, compute: Option<u32>, access: HostAccess) -> Result<(), VulkanError> {
        let d = &self.device;
        Submitter::create(d, family, self.submitter.get_mut().unwrap_or_else(|e| e.into_inner()))?;
        if let (Some(c), Some(s)) = (compute, self.block_copies.as_mut()) {
            Submitter::create(d, c, s.get_mut().unwrap_or_else(|e| e.into_inner()))?;
        }
        // The memory types a transfer buffer can live in, from a probe buffer.
        // Exportable blocks' buffers carry the external-memory info, which can narrow the types.
        let mut external =
            vk::ExternalMemoryBufferCreateInfo::default().handle_types(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD);
        let mut probe_info = vk::BufferCreateInfo::default().size(1).usage(Self::usage());
        if self.export.is_some() {
            probe_info = probe_info.push_next(&mut external);
        }
        // SAFETY: the probe buffer is created and destroyed here, never bound.
        let bits = unsafe {
            let probe = d.create_buffer(&probe_info, None).map_err(|e| VulkanError::from_vk("vkCreateBuffer", 0, e))?;
            let r = d.get_buffer_memory_requirements(probe);
            d.destroy_buffer(probe, None);
            r.memory_type_bits
        };
        let props = self.memory_properties;
        type F = vk::MemoryPropertyFlags;
        let never = F::LAZILY_ALLOCATED | F::PROTECTED | F::DEVICE_COHERENT_AMD;
        let coherent = F::HOST_VISIBLE | F::HOST_COHERENT;
        // Device memory the host cannot see first (NVIDIA's VRAM, not its BAR window); else
        // device-local memory the host can map (lavapipe, integrated GPUs).
        let (block_type, mapped) = match pick_type(&props, bits, F::DEVICE_LOCAL, never | F::HOST_VISIBLE) {
            Some(t) => (t, false),
            None => match pick_type(&props, bits, F::DEVICE_LOCAL | coherent, never) {
                Some(t) => (t, true),
                None => pick_type(&props, bits, F::DEVICE_LOCAL, never).map(|t| (t, false)).ok_or_else(|| {
                    VulkanError::Unavailable(format!("{}: no device-local memory type", self.info.name))
                })?,
            },
        };
        self.block_type = block_type;
        self.block_mapped = mapped && access == HostAccess::Auto;
        self.staging_type = pick_type(&props, bits, coherent | F::HOST_CACHED, never | F::DEVICE_LOCAL)
            .or_else(|| pick_type(&props, bits, coherent, never | F::DEVICE_LOCAL))
            .or_else(|| pick_type(&props, bits, coherent, never));
        if !self.block_mapped && self.staging_type.is_none() {
            return Err(VulkanError::Unavailable(format!("{}: no host-visible memory for staging", self.info.name)));
        }
        Ok(())
    }

    /// Whether transfer buffers can be exported as opaque fds here: `Some(dedicated)` (the
    /// driver wants a dedicated allocation), `None` (no `VK_KHR_external_memory_fd`, or the
    /// driver cannot export such buffers).
    fn exportable(raw: &ash::Instance, pd: vk::PhysicalDevice, info: &PhysicalDeviceInfo) -> Option<bool> {
        if !info.external_memory_fd {
            return None;
        }
        let query = vk::PhysicalDeviceExternalBufferInfo::default()
            .usage(Self::usage())
            .handle_type(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD);
        let mut out = vk::ExternalBufferProperties::default();
        // SAFETY: a plain query (core in 1.1) with structures living for the call.
        unsafe { raw.get_physical_device_external_buffer_properties(pd, &query, &mut out) };
        let features = out.external_memory_properties.external_memory_features;
        features
            .contains(vk::ExternalMemoryFeatureFlags::EXPORTABLE | vk::ExternalMemoryFeatureFlags::IMPORTABLE)
            .then(|| features.contains(vk::ExternalMemoryFeatureFlags::DEDICATED_ONLY))
    }

    /// Whether transfer buffers can be bound to imported host allocations here.
    fn host_importable(raw: &ash::Instance, pd: vk::PhysicalDevice) -> bool {
        let query = vk::PhysicalDeviceExternalBufferInfo::default()
            .usage(Self::usage())
            .handle_type(vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT);
        let mut out = vk::ExternalBufferProperties::default();
        // SAFETY: a plain query (core in 1.1) with structures living for the call.
        unsafe { raw.get_physical_device_external_buffer_properties(pd, &query, &mut out) };
        out.external_memory_properties.external_memory_features.contains(vk::ExternalMemoryFeatureFlags::IMPORTABLE)
    }

    /// Whether blocks are exported as opaque fds (`VK_KHR_external_memory_fd`), and if not why.
    pub fn export_support(&self) -> Result<(), String> {
        match (&self.export, self.info.external_memory_fd) {
            (Some(_), _) => Ok(()),
            (None, false) => Err(format!("{} has no VK_KHR_external_memory_fd", self.info.name)),
            (None, true) => Err(format!("{}'s driver cannot export transfer buffers as opaque fds", self.info.name)),
        }
    }

    /// Whether copies to and from host blocks import the host memory
    /// (`VK_EXT_external_memory_host`) instead of staging it.
    pub fn imports_host_memory(&self) -> bool {
        self.host_import.is_some() && self.import_enabled.load(Ordering::Relaxed)
    }

    /// Copies to and from host blocks go through the staging buffer from now on.
    pub fn disable_host_import(&self) {
        self.import_enabled.store(false, Ordering::Relaxed);
    }

    fn usage() -> vk::BufferUsageFlags {
        vk::BufferUsageFlags::TRANSFER_SRC | vk::BufferUsageFlags::TRANSFER_DST
    }

    pub fn info(&self) -> &PhysicalDeviceInfo {
        &self.info
    }

    /// Whether blocks are host-visible memory written and read through a mapping (else through
    /// a staging buffer and the queue).
    pub fn blocks_mapped(&self) -> bool {
        self.block_mapped
    }

    /// Bytes of this process's blocks on the device now.
    pub fn own_bytes(&self) -> u64 {
        self.own_bytes.load(Ordering::Relaxed)
    }

    /// The largest single allocation the driver allows.
    pub fn max_allocation_bytes(&self) -> u64 {
        self.max_allocation_bytes
    }

    /// Allocates `bytes` of device-local memory with a transfer buffer bound over all of it.
    pub fn alloc(self: &Arc<Self>, bytes: u64) -> Result<DeviceMemory, VulkanError> {
        if bytes == 0 {
            return Err(VulkanError::InvalidArgument("a block of 0 bytes".into()));
        }
        // `maxMemoryAllocationSize` is what the driver promises, not a hard limit (NVIDIA's is
        // 4 GiB less 2 MiB, and larger allocations succeed): larger ones are tried, and their
        // failure is reported against the promise.
        let over = bytes > self.max_allocation_bytes;
        let over_limit = |e: VulkanError| match e {
            VulkanError::OutOfMemory { .. } | VulkanError::Driver { .. } if over => {
                VulkanError::InvalidArgument(format!(
                "{bytes} bytes is over the largest allocation the driver promises ({} bytes), and it refused it ({e})",
                self.max_allocation_bytes
            ))
            }
            other => other,
        };
        self.alloc_block(bytes).map_err(over_limit)
    }

    fn alloc_block(self: &Arc<Self>, bytes: u64) -> Result<DeviceMemory, VulkanError> {
        let d = &self.device;
        let handle_types = vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD;
        let mut external = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle_types);
        let mut info = vk::BufferCreateInfo::default().size(bytes).usage(Self::usage());
        if self.export.is_some() {
            info = info.push_next(&mut external);
        }
        // SAFETY: the buffer is owned by the DeviceMemory built right after, whose Drop destroys it.
        let buffer =
            unsafe { d.create_buffer(&info, None) }.map_err(|e| VulkanError::from_vk("vkCreateBuffer", bytes, e))?;
        let mut block = DeviceMemory {
            device: self.clone(),
            buffer,
            memory: vk::DeviceMemory::null(),
            ptr: None,
            len: bytes,
            accounted: 0,
            address: 0,
            exportable: self.export.is_some(),
        };
        // SAFETY: the buffer is live; the allocation is freed by the block's Drop.
        unsafe {
            let req = d.get_buffer_memory_requirements(buffer);
            if req.memory_type_bits & (1 << self.block_type) == 0 {
                return Err(VulkanError::Driver {
                    operation: "vkGetBufferMemoryRequirements",
                    result: "the block memory type cannot hold this buffer".into(),
                });
            }
            let mut export = vk::ExportMemoryAllocateInfo::default().handle_types(handle_types);
            let mut dedicated = vk::MemoryDedicatedAllocateInfo::default().buffer(buffer);
            let mut alloc =
                vk::MemoryAllocateInfo::default().allocation_size(req.size).memory_type_index(self.block_type);
            if let Some(e) = &self.export {
                alloc = alloc.push_next(&mut export);
                if e.dedicated {
                    alloc = alloc.push_next(&mut dedicated);
                }
            }
            block.memory =
                d.allocate_memory(&alloc, None).map_err(|e| VulkanError::from_vk("vkAllocateMemory", bytes, e))?;
            block.accounted = req.size;
            self.own_bytes.fetch_add(req.size, Ordering::Relaxed);
            d.bind_buffer_memory(buffer, block.memory, 0)
                .map_err(|e| VulkanError::from_vk("vkBindBufferMemory", bytes, e))?;
            if self.block_mapped {
                let p = d
                    .map_memory(block.memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty())
                    .map_err(|e| VulkanError::from_vk("vkMapMemory", bytes, e))?;
                block.ptr = NonNull::new(p.cast());
            }
        }
        block.address = self
            .next_address
            .fetch_add(bytes.div_ceil(BLOCK_ALIGNMENT_BYTES) * BLOCK_ALIGNMENT_BYTES, Ordering::Relaxed);
        Ok(block)
    }

    /// Records commands with `record`, submits them and waits for them, under the lock. A
    /// barrier at the end makes transfer writes visible to the host.
    fn run(&self, s: &mut Submitter, record: impl FnOnce(&ash::Device, vk::CommandBuffer)) -> Result<(), VulkanError> {
        let d = &self.device;
        let host_barrier = [vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::TRANSFER_WRITE)
            .dst_access_mask(vk::AccessFlags::HOST_READ)];
        // SAFETY: the command buffer, fence and queue are this device's and used only under the
        // submitter lock the caller holds; the buffers `record` names are live for the call, and
        // the call returns only after the fence signalled (nothing is left in flight).
        unsafe {
            d.reset_command_buffer(s.cmd, vk::CommandBufferResetFlags::empty())
                .map_err(|e| VulkanError::from_vk("vkResetCommandBuffer", 0, e))?;
            let begin = vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
            d.begin_command_buffer(s.cmd, &begin).map_err(|e| VulkanError::from_vk("vkBeginCommandBuffer", 0, e))?;
            record(d, s.cmd);
            d.cmd_pipeline_barrier(
                s.cmd,
                vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::HOST,
                vk::DependencyFlags::empty(),
                &host_barrier,
                &[],
                &[],
            );
            d.end_command_buffer(s.cmd).map_err(|e| VulkanError::from_vk("vkEndCommandBuffer", 0, e))?;
            let cmds = [s.cmd];
            let submit = [vk::SubmitInfo::default().command_buffers(&cmds)];
            d.queue_submit(s.queue, &submit, s.fence).map_err(|e| VulkanError::from_vk("vkQueueSubmit", 0, e))?;
            // A short copy is done within microseconds: poll for it before sleeping in the
            // driver's wait, whose wake-up alone costs tens of microseconds.
            let spin_until = std::time::Instant::now() + FENCE_SPIN;
            while d.get_fence_status(s.fence) == Ok(false) && std::time::Instant::now() < spin_until {
                std::hint::spin_loop();
            }
            let waited = d.wait_for_fences(&[s.fence], true, u64::MAX);
            let reset = d.reset_fences(&[s.fence]);
            waited.map_err(|e| VulkanError::from_vk("vkWaitForFences", 0, e))?;
            reset.map_err(|e| VulkanError::from_vk("vkResetFences", 0, e))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Submitter> {
        self.submitter.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether copies between blocks run on a compute-capable queue (else the transfer queue).
    pub fn block_copies_on_compute_queue(&self) -> bool {
        self.block_copies.is_some()
    }

    /// The queue for copies between blocks: the compute-capable one where there is one.
    fn lock_block_copies(&self) -> std::sync::MutexGuard<'_, Submitter> {
        match &self.block_copies {
            Some(m) => m.lock().unwrap_or_else(|e| e.into_inner()),
            None => self.lock(),
        }
    }

    /// The staging buffer, created on first use.
    fn staging<'a>(&self, s: &'a mut Submitter) -> Result<&'a Staging, VulkanError> {
        if s.staging.is_none() {
            let ty = self.staging_type.ok_or_else(|| VulkanError::Unavailable("no host-visible memory type".into()))?;
            let d = &self.device;
            let info = vk::BufferCreateInfo::default().size(STAGING_BYTES).usage(Self::usage());
            // SAFETY: created, bound and mapped here; destroyed in the device's Drop (or right
            // here when a later step fails).
            unsafe {
                let buffer = d
                    .create_buffer(&info, None)
                    .map_err(|e| VulkanError::from_vk("vkCreateBuffer", STAGING_BYTES, e))?;
                let req = d.get_buffer_memory_requirements(buffer);
                let alloc = vk::MemoryAllocateInfo::default().allocation_size(req.size).memory_type_index(ty);
                let memory = match d.allocate_memory(&alloc, None) {
                    Ok(m) => m,
                    Err(e) => {
                        d.destroy_buffer(buffer, None);
                        return Err(VulkanError::from_vk("vkAllocateMemory (staging)", STAGING_BYTES, e));
                    }
                };
                let mapped = d
                    .bind_buffer_memory(buffer, memory, 0)
                    .and_then(|()| d.map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()));
                match mapped.map(|p| NonNull::new(p.cast::<u8>())) {
                    Ok(Some(ptr)) => s.staging = Some(Staging { buffer, memory, ptr }),
                    other => {
                        d.destroy_buffer(buffer, None);
                        d.free_memory(memory, None);
                        let r = other.err().unwrap_or(vk::Result::ERROR_MEMORY_MAP_FAILED);
                        return Err(VulkanError::from_vk("vkMapMemory (staging)", STAGING_BYTES, r));
                    }
                }
            }
        }
        s.staging.as_ref().ok_or_else(|| VulkanError::Unavailable("no staging buffer".into()))
    }
}

impl Drop for VulkanDevice {
    fn drop(&mut self) {
        let s = self.submitter.get_mut().unwrap_or_else(|e| e.into_inner());
        // SAFETY: every block holds an Arc to this device, so none is left; nothing is in flight
        // (every submission is waited for). Each object is destroyed once; null handles are
        // ignored by Vulkan.
        unsafe {
            let _ = self.device.device_wait_idle();
            if let Some(st) = s.staging.take() {
                self.device.destroy_buffer(st.buffer, None);
                self.device.free_memory(st.memory, None);
            }
            self.device.destroy_fence(s.fence, None);
            self.device.destroy_command_pool(s.pool, None);
            if let Some(c) = self.block_copies.as_mut() {
                let c = c.get_mut().unwrap_or_else(|e| e.into_inner());
                self.device.destroy_fence(c.fence, None);
                self.device.destroy_command_pool(c.pool, None);
            }
            self.device.destroy_device(None);
        }
    }
}

/// A device-local block with a transfer buffer over all of it; freed on drop.
pub struct DeviceMemory {
    device: Arc<VulkanDevice>,
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    /// The host mapping of the whole block, when its memory is host-visible.
    ptr: Option<NonNull<u8>>,
    len: u64,
    /// Bytes counted in the device's `own_bytes` (the allocation's real size).
    accounted: u64,
    address: u64,
    /// Allocated exportable here (not imported from another process).
    exportable: bool,
}

// SAFETY: the handles are plain tokens; the mapping is plain memory owned by this block, read
// and written through bounds-checked methods like a `HostMapping`.
unsafe impl Send for DeviceMemory {}
// SAFETY: as above; driver access is serialised by the device's submitter lock.
unsafe impl Sync for DeviceMemory {}

impl std::fmt::Debug for DeviceMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMemory")
            .field("device", &self.device.info.index)
            .field("len", &self.len)
            .field("mapped", &self.ptr.is_some())
            .finish()
    }
}

impl DeviceMemory {
    pub fn len_bytes(&self) -> u64 {
        self.len
    }

    /// The block's place in memwarden's numbering of the device's memory (aligned to
    /// [`BLOCK_ALIGNMENT_BYTES`]).
    pub fn address(&self) -> u64 {
        self.address
    }

    pub fn device(&self) -> &Arc<VulkanDevice> {
        &self.device
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), VulkanError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(VulkanError::OutOfBounds { offset_bytes: offset, len_bytes: len, block_bytes: self.len }),
        }
    }

    /// Copies host bytes into the block: through its mapping, or a staging buffer.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), VulkanError> {
        self.check(offset, data.len() as u64)?;
        match self.ptr {
            // SAFETY: the range was bounds-checked inside the live mapping of this block.
            Some(p) => unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), p.as_ptr().add(offset as usize), data.len());
                Ok(())
            },
            None if data.is_empty() => Ok(()),
            None => self.device.staged_write(self.buffer, offset, data),
        }
    }

    /// Copies block bytes into `out`.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), VulkanError> {
        self.check(offset, out.len() as u64)?;
        match self.ptr {
            // SAFETY: as in `write`, with `out` exclusively borrowed.
            Some(p) => unsafe {
                std::ptr::copy_nonoverlapping(p.as_ptr().add(offset as usize), out.as_mut_ptr(), out.len());
                Ok(())
            },
            None if out.is_empty() => Ok(()),
            None => self.device.staged_read(self.buffer, offset, out),
        }
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        // SAFETY: nothing is in flight on this block (every submission is waited for); buffer
        // and memory are destroyed once (null handles are ignored); freeing unmaps.
        unsafe {
            self.device.device.destroy_buffer(self.buffer, None);
            self.device.device.free_memory(self.memory, None);
        }
        self.device.own_bytes.fetch_sub(self.accounted, Ordering::Relaxed);
    }
}
