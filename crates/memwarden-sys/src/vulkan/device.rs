//! One opened Vulkan device: a queue that can transfer, device-local memory blocks, and copies.
//! Every command is recorded on the device's one command buffer, submitted and waited for
//! with a fence under one lock, so nothing is in flight when a call returns (and none when a
//! block is dropped).

use super::{HeapReading, HostAccess, PhysicalDeviceInfo, VulkanError, VulkanInstance};
use crate::HostMapping;
use ash::vk;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes moved per step through the staging buffer (and through the scratch buffer of an
/// overlapping move within one block).
const STAGING_BYTES: u64 = 16 << 20;

/// Blocks are numbered in memwarden's own address space of the device, aligned to this:
/// Vulkan memory has no address without `bufferDeviceAddress`.
pub const BLOCK_ALIGNMENT_BYTES: u64 = 2 << 20;

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
    /// `VK_KHR_external_memory_fd`, when blocks are allocated exportable as opaque fds.
    export: Option<Export>,
    /// `VK_EXT_external_memory_host` and its `minImportedHostPointerAlignment`: host blocks are
    /// imported for a copy instead of staged.
    host_import: Option<(ash::ext::external_memory_host::Device, u64)>,
    /// Cleared by [`VulkanDevice::disable_host_import`] (configuration): copies stage instead.
    import_enabled: std::sync::atomic::AtomicBool,
    submitter: Mutex<Submitter>,
    next_address: AtomicU64,
    /// Bytes of blocks this process holds on the device now.
    own_bytes: AtomicU64,
}

/// How blocks are made exportable (`VK_KHR_external_memory_fd`, opaque fds).
struct Export {
    fd: ash::khr::external_memory_fd::Device,
    /// The driver wants a dedicated allocation for exportable buffers.
    dedicated: bool,
}

/// A block exported as an opaque fd: what another process needs to import it
/// (`VkImportMemoryFdInfoKHR` with `allocationSize` and `memoryTypeIndex` as given here, on the
/// physical device with the same UUID).
#[derive(Debug)]
pub struct ExportedMemory {
    pub fd: OwnedFd,
    /// The exported allocation's size (the importer must pass exactly this).
    pub allocation_bytes: u64,
    pub memory_type_index: u32,
    /// The importer must make a dedicated allocation (`VkMemoryDedicatedAllocateInfo`).
    pub dedicated: bool,
}

/// Which way a copy between a host mapping and a block goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCopy {
    ToDevice,
    ToHost,
}

impl std::fmt::Debug for VulkanDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VulkanDevice").field("info", &self.info).field("block_mapped", &self.block_mapped).finish()
    }
}

/// The memory type among `bits` whose flags `want` all and `avoid` none, in a heap that is
/// device-local exactly when `device_local` says so.
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
        let priorities = [1.0f32];
        let queues = [vk::DeviceQueueCreateInfo::default().queue_family_index(family).queue_priorities(&priorities)];
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
        let host_import = info.external_memory_host.then(|| {
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
            export,
            host_import,
            import_enabled: std::sync::atomic::AtomicBool::new(true),
            submitter: Mutex::new(Submitter {
                queue: vk::Queue::null(),
                pool: vk::CommandPool::null(),
                cmd: vk::CommandBuffer::null(),
                fence: vk::Fence::null(),
                staging: None,
            }),
            next_address: AtomicU64::new(BLOCK_ALIGNMENT_BYTES),
            own_bytes: AtomicU64::new(0),
        };
        dev.init(family, access)?;
        Ok(Arc::new(dev))
    }

    fn init(&mut self, family: u32, access: HostAccess) -> Result<(), VulkanError> {
        let d = &self.device;
        let s = self.submitter.get_mut().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the device is live; the family and queue index 0 were requested at creation.
        s.queue = unsafe { d.get_device_queue(family, 0) };
        let pool_info = vk::CommandPoolCreateInfo::default()
            .queue_family_index(family)
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        // SAFETY: plain creation calls on a live device; each object is destroyed in Drop.
        unsafe {
            s.pool = d
                .create_command_pool(&pool_info, None)
                .map_err(|e| VulkanError::from_vk("vkCreateCommandPool", 0, e))?;
            let alloc = vk::CommandBufferAllocateInfo::default()
                .command_pool(s.pool)
                .level(vk::CommandBufferLevel::PRIMARY)
                .command_buffer_count(1);
            s.cmd = d
                .allocate_command_buffers(&alloc)
                .map_err(|e| VulkanError::from_vk("vkAllocateCommandBuffers", 0, e))?[0];
            s.fence = d
                .create_fence(&vk::FenceCreateInfo::default(), None)
                .map_err(|e| VulkanError::from_vk("vkCreateFence", 0, e))?;
        }
        // The memory types a transfer buffer can live in, from a probe buffer.
        let probe_info = vk::BufferCreateInfo::default().size(1).usage(Self::usage());
        // SAFETY: the probe buffer is created and destroyed here, never bound.
        let bits = unsafe {
            let probe = d.create_buffer(&probe_info, None).map_err(|e| VulkanError::from_vk("vkCreateBuffer", 0, e))?;
            let r = d.get_buffer_memory_requirements(probe);
            d.destroy_buffer(probe, None);
            r.memory_type_bits
        };
        // SAFETY: a plain query on this instance's physical device.
        let props = unsafe { self.instance.raw().get_physical_device_memory_properties(self.physical) };
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

    /// The device-local heaps now, with `VK_EXT_memory_budget`'s budget and usage when the
    /// device supports it (`usage` counts this process only).
    pub fn heaps(&self) -> Vec<HeapReading> {
        let raw = self.instance.raw();
        let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
        let mut p2 = vk::PhysicalDeviceMemoryProperties2::default();
        if self.info.memory_budget {
            p2 = p2.push_next(&mut budget);
        }
        // SAFETY: the chain holds only the budget structure, and only when the device supports
        // the extension; both live for the call.
        unsafe { raw.get_physical_device_memory_properties2(self.physical, &mut p2) };
        let heaps: Vec<(usize, u64)> = p2
            .memory_properties
            .memory_heaps_as_slice()
            .iter()
            .enumerate()
            .filter(|(_, h)| h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL))
            .map(|(i, h)| (i, h.size))
            .collect();
        let with_budget = self.info.memory_budget;
        heaps
            .into_iter()
            .map(|(i, size)| HeapReading {
                size_bytes: size,
                budget_bytes: with_budget.then(|| budget.heap_budget[i]),
                usage_bytes: with_budget.then(|| budget.heap_usage[i]),
            })
            .collect()
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
            VulkanError::OutOfMemory { .. } | VulkanError::Driver { .. } if over => VulkanError::InvalidArgument(format!(
                "{bytes} bytes is over the largest allocation the driver promises ({} bytes), and it refused it ({e})",
                self.max_allocation_bytes
            )),
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
            let waited = d.wait_for_fences(&[s.fence], true, u64::MAX);
            let reset = d.reset_fences(&[s.fence]);
            waited.map_err(|e| VulkanError::from_vk("vkWaitForFences", 0, e))?;
            reset.map_err(|e| VulkanError::from_vk("vkResetFences", 0, e))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Submitter> {
        self.submitter.lock().unwrap_or_else(|e| e.into_inner())
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

    fn staged_write(&self, dst: vk::Buffer, offset: u64, data: &[u8]) -> Result<(), VulkanError> {
        let mut s = self.lock();
        let (sbuf, sptr) = {
            let st = self.staging(&mut s)?;
            (st.buffer, st.ptr)
        };
        for (i, chunk) in data.chunks(STAGING_BYTES as usize).enumerate() {
            // SAFETY: the staging mapping holds STAGING_BYTES ≥ chunk.len() bytes and is only
            // used under the lock held here.
            unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), sptr.as_ptr(), chunk.len()) };
            let region = [vk::BufferCopy::default()
                .src_offset(0)
                .dst_offset(offset + i as u64 * STAGING_BYTES)
                .size(chunk.len() as u64)];
            // SAFETY: both buffers are live; the caller bounds-checked the destination range.
            self.run(&mut s, |d, cmd| unsafe { d.cmd_copy_buffer(cmd, sbuf, dst, &region) })?;
        }
        Ok(())
    }

    fn staged_read(&self, src: vk::Buffer, offset: u64, out: &mut [u8]) -> Result<(), VulkanError> {
        let mut s = self.lock();
        let (sbuf, sptr) = {
            let st = self.staging(&mut s)?;
            (st.buffer, st.ptr)
        };
        for (i, chunk) in out.chunks_mut(STAGING_BYTES as usize).enumerate() {
            let region = [vk::BufferCopy::default()
                .src_offset(offset + i as u64 * STAGING_BYTES)
                .dst_offset(0)
                .size(chunk.len() as u64)];
            // SAFETY: both buffers are live; the caller bounds-checked the source range.
            self.run(&mut s, |d, cmd| unsafe { d.cmd_copy_buffer(cmd, src, sbuf, &region) })?;
            // SAFETY: as in `staged_write`; the copy has finished and is visible to the host.
            unsafe { std::ptr::copy_nonoverlapping(sptr.as_ptr(), chunk.as_mut_ptr(), chunk.len()) };
        }
        Ok(())
    }
}

/// Host pages imported for one copy (`VK_EXT_external_memory_host`), with a transfer buffer
/// over them; released on drop (after the copy was waited for).
struct HostImport<'a> {
    device: &'a ash::Device,
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
}

impl Drop for HostImport<'_> {
    fn drop(&mut self) {
        // SAFETY: nothing is in flight on the buffer (its copy was waited for); null handles
        // are ignored.
        unsafe {
            self.device.destroy_buffer(self.buffer, None);
            self.device.free_memory(self.memory, None);
        }
    }
}

/// A whole locked host mapping imported on one device, kept by the mapping (see
/// `HostMapping::vulkan_imports`) so copies to and from it pay the import (pinning and mapping
/// its pages for the GPU) once, not per copy.
pub(crate) struct MappingImport {
    device: Arc<VulkanDevice>,
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
}

impl std::fmt::Debug for MappingImport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappingImport").field("device", &self.device.info.index).finish()
    }
}

impl Drop for MappingImport {
    fn drop(&mut self) {
        // SAFETY: only dropped by the mapping that owns it, which no copy borrows then (a copy
        // borrows the mapping), so nothing is in flight on the buffer.
        unsafe {
            self.device.device.destroy_buffer(self.buffer, None);
            self.device.device.free_memory(self.memory, None);
        }
    }
}

impl VulkanDevice {
    /// The buffer over the whole of a locked mapping on this device: imported on first use and
    /// kept by the mapping. `None` when the import is refused (the caller imports per copy or
    /// stages).
    fn mapping_import(self: &Arc<Self>, host: &HostMapping) -> Option<vk::Buffer> {
        let mut imports = host.vulkan_imports.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = imports.iter().find(|i| Arc::ptr_eq(&i.device, self)) {
            return Some(i.buffer);
        }
        let (mut import, offset) = self.import_host(host, 0, host.len_bytes()).ok()?;
        if offset != 0 {
            return None;
        }
        let owned = MappingImport { device: self.clone(), buffer: import.buffer, memory: import.memory };
        // Ownership moved to `owned`: the per-copy guard must not free them too.
        (import.buffer, import.memory) = (vk::Buffer::null(), vk::DeviceMemory::null());
        let buffer = owned.buffer;
        imports.push(owned);
        Some(buffer)
    }

    /// Imports the host pages under `host`'s bytes `offset..offset + len`, widened to the
    /// driver's import alignment (and refused if that leaves the mapping): the buffer, and
    /// where `offset` lies in it.
    fn import_host(&self, host: &HostMapping, offset: u64, len: u64) -> Result<(HostImport<'_>, u64), VulkanError> {
        let (ext, align) = self.host_import.as_ref().ok_or_else(|| {
            VulkanError::Unavailable(format!("{} has no VK_EXT_external_memory_host", self.info.name))
        })?;
        let start = host.address() + offset;
        let base = start / align * align;
        let end = (start + len).div_ceil(*align) * align;
        if base < host.address() || end > host.address() + host.len_bytes() {
            return Err(VulkanError::InvalidArgument(format!(
                "the host range widened to the import alignment ({align} bytes) leaves its mapping"
            )));
        }
        let size = end - base;
        let handle = vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;
        let d = &self.device;
        let mut pointer = vk::MemoryHostPointerPropertiesEXT::default();
        // SAFETY: `base` points into a live mapping of `host` (checked above) for the call.
        let r = unsafe {
            (ext.fp().get_memory_host_pointer_properties_ext)(d.handle(), handle, base as *const _, &mut pointer)
        };
        if r != vk::Result::SUCCESS {
            return Err(VulkanError::from_vk("vkGetMemoryHostPointerPropertiesEXT", size, r));
        }
        let mut external = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle);
        let info = vk::BufferCreateInfo::default().size(size).usage(Self::usage()).push_next(&mut external);
        // SAFETY: the buffer and memory are owned by the HostImport built right after, whose
        // Drop releases them; the imported pages stay mapped by `host` for longer than the
        // import lives (the caller borrows `host` for the copy).
        unsafe {
            let buffer =
                d.create_buffer(&info, None).map_err(|e| VulkanError::from_vk("vkCreateBuffer (import)", size, e))?;
            let mut import = HostImport { device: d, buffer, memory: vk::DeviceMemory::null() };
            let req = d.get_buffer_memory_requirements(buffer);
            let bits = req.memory_type_bits & pointer.memory_type_bits;
            if bits == 0 || req.size > size {
                return Err(VulkanError::InvalidArgument("no memory type can import these host pages".into()));
            }
            let mut from =
                vk::ImportMemoryHostPointerInfoEXT::default().handle_type(handle).host_pointer(base as *mut _);
            let alloc = vk::MemoryAllocateInfo::default()
                .allocation_size(size)
                .memory_type_index(bits.trailing_zeros())
                .push_next(&mut from);
            import.memory = d
                .allocate_memory(&alloc, None)
                .map_err(|e| VulkanError::from_vk("vkAllocateMemory (host import)", size, e))?;
            d.bind_buffer_memory(buffer, import.memory, 0)
                .map_err(|e| VulkanError::from_vk("vkBindBufferMemory (import)", size, e))?;
            Ok((import, start - base))
        }
    }

    /// Imports a block exported as an opaque fd ([`DeviceMemory::export`], maybe by another
    /// process) on this device (the same physical device: same UUID), with a transfer buffer
    /// of `len_bytes` over it. Vulkan owns the descriptor once this succeeds; on an error it is
    /// closed. The imported memory is not counted in [`VulkanDevice::own_bytes`].
    pub fn import_fd(self: &Arc<Self>, exported: ExportedMemory, len_bytes: u64) -> Result<DeviceMemory, VulkanError> {
        self.export_support().map_err(VulkanError::Unavailable)?;
        if len_bytes == 0 || len_bytes > exported.allocation_bytes {
            return Err(VulkanError::InvalidArgument(format!(
                "a buffer of {len_bytes} bytes over an allocation of {}",
                exported.allocation_bytes
            )));
        }
        let d = &self.device;
        let handle = vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD;
        let mut external = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle);
        let info = vk::BufferCreateInfo::default().size(len_bytes).usage(Self::usage()).push_next(&mut external);
        // SAFETY: the buffer is owned by the DeviceMemory built right after, whose Drop
        // destroys it and frees the imported memory.
        let buffer = unsafe { d.create_buffer(&info, None) }
            .map_err(|e| VulkanError::from_vk("vkCreateBuffer (import)", len_bytes, e))?;
        let mut block = DeviceMemory {
            device: self.clone(),
            buffer,
            memory: vk::DeviceMemory::null(),
            ptr: None,
            len: len_bytes,
            accounted: 0,
            address: 0,
        };
        let raw_fd = std::os::fd::AsRawFd::as_raw_fd(&exported.fd);
        let mut from = vk::ImportMemoryFdInfoKHR::default().handle_type(handle).fd(raw_fd);
        let mut dedicated = vk::MemoryDedicatedAllocateInfo::default().buffer(buffer);
        let mut alloc = vk::MemoryAllocateInfo::default()
            .allocation_size(exported.allocation_bytes)
            .memory_type_index(exported.memory_type_index)
            .push_next(&mut from);
        if exported.dedicated {
            alloc = alloc.push_next(&mut dedicated);
        }
        // SAFETY: the fd is open for the call; on success the driver owns it (so it is not
        // closed here), on failure it is still ours and closed by `exported`'s drop.
        unsafe {
            block.memory = d
                .allocate_memory(&alloc, None)
                .map_err(|e| VulkanError::from_vk("vkAllocateMemory (fd import)", len_bytes, e))?;
            let _owned_by_vulkan = exported.fd.into_raw_fd();
            d.bind_buffer_memory(buffer, block.memory, 0)
                .map_err(|e| VulkanError::from_vk("vkBindBufferMemory (fd import)", len_bytes, e))?;
            if self.block_mapped && exported.memory_type_index == self.block_type {
                let p = d
                    .map_memory(block.memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty())
                    .map_err(|e| VulkanError::from_vk("vkMapMemory", len_bytes, e))?;
                block.ptr = NonNull::new(p.cast());
            }
        }
        Ok(block)
    }
}

/// Which way [`copy_host`] moved the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPath {
    /// `memcpy` through the block's mapping (host-visible device memory).
    Mapped,
    /// The device's copy engine on the imported host pages (`VK_EXT_external_memory_host`).
    Imported,
    /// Through the staging buffer (no import: the driver lacks it or refused these pages).
    Staged,
}

/// Copies `len` bytes between `host` at `host_offset` and `block` at `block_offset` (`dir`
/// says which way) and waits for them. Host-visible blocks take a `memcpy`; otherwise the host
/// pages are imported for the copy so the copy engine reads or writes them directly, with one
/// `vkCmdCopyBuffer` and no staging copy; where the import is refused, the staging buffer.
/// Both ranges are checked before any byte moves.
pub fn copy_host(
    block: &DeviceMemory,
    block_offset: u64,
    host: &HostMapping,
    host_offset: u64,
    len: u64,
    dir: HostCopy,
) -> Result<HostPath, VulkanError> {
    block.check(block_offset, len)?;
    let at = host.check(host_offset, len).map_err(|_| VulkanError::OutOfBounds {
        offset_bytes: host_offset,
        len_bytes: len,
        block_bytes: host.len_bytes(),
    })?;
    if len == 0 {
        return Ok(HostPath::Mapped);
    }
    let dev = &block.device;
    if block.ptr.is_none() && dev.imports_host_memory() {
        // A locked (pinned) mapping is imported whole once and kept; pageable memory only for
        // the copy, so it is not left pinned.
        let cached = if host.is_locked() { dev.mapping_import(host) } else { None };
        let per_copy = match cached {
            Some(buffer) => Some((None, buffer, host_offset)),
            None => dev.import_host(host, host_offset, len).ok().map(|(i, offset)| {
                let buffer = i.buffer;
                (Some(i), buffer, offset)
            }),
        };
        if let Some((_guard, buffer, offset)) = per_copy {
            let (src, dst, region) = match dir {
                HostCopy::ToDevice => {
                    (buffer, block.buffer, vk::BufferCopy::default().src_offset(offset).dst_offset(block_offset))
                }
                HostCopy::ToHost => {
                    (block.buffer, buffer, vk::BufferCopy::default().src_offset(block_offset).dst_offset(offset))
                }
            };
            let region = [region.size(len)];
            let mut s = dev.lock();
            // SAFETY: both buffers are live for the call and the ranges were checked; `run`
            // waits for the copy, so the import outlives it.
            dev.run(&mut s, |d, cmd| unsafe { d.cmd_copy_buffer(cmd, src, dst, &region) })?;
            return Ok(HostPath::Imported);
        }
    }
    // SAFETY: `at..at + len` was bounds-checked inside the live mapping, which `host` keeps
    // mapped for the borrow; the caller does not let the range change meanwhile (the daemon
    // marks both allocations busy for a copy).
    let bytes = unsafe { std::slice::from_raw_parts_mut(host.ptr.as_ptr().add(at), len as usize) };
    match dir {
        HostCopy::ToDevice => block.write(block_offset, bytes)?,
        HostCopy::ToHost => block.read(block_offset, bytes)?,
    }
    Ok(if block.ptr.is_some() { HostPath::Mapped } else { HostPath::Staged })
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

    /// A new opaque fd of this block's memory (`VK_KHR_external_memory_fd`) for another
    /// process to import ([`VulkanDevice::import_fd`]); each call gives a new descriptor.
    pub fn export(&self) -> Result<ExportedMemory, VulkanError> {
        let e = self
            .device
            .export
            .as_ref()
            .ok_or_else(|| VulkanError::Unavailable(self.device.export_support().err().unwrap_or_default()))?;
        let info = vk::MemoryGetFdInfoKHR::default()
            .memory(self.memory)
            .handle_type(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD);
        // SAFETY: the memory is live and was allocated exportable as opaque fds (export is
        // Some only then); the fd returned is new and owned by the caller.
        let fd = unsafe { e.fd.get_memory_fd(&info) }.map_err(|r| VulkanError::from_vk("vkGetMemoryFdKHR", 0, r))?;
        Ok(ExportedMemory {
            // SAFETY: a new descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            allocation_bytes: self.accounted,
            memory_type_index: self.device.block_type,
            dedicated: e.dedicated,
        })
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

/// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset` with
/// `vkCmdCopyBuffer`, both blocks of one device, and waits for it. Both ranges are checked
/// before anything moves. Overlapping ranges in one block (which one `vkCmdCopyBuffer` may not
/// copy) move through a scratch block, a chunk at a time in the order `memmove` would use.
pub fn copy(
    dst: &DeviceMemory,
    dst_offset: u64,
    src: &DeviceMemory,
    src_offset: u64,
    len: u64,
) -> Result<(), VulkanError> {
    if !Arc::ptr_eq(&dst.device, &src.device) {
        return Err(VulkanError::InvalidArgument("a Vulkan copy between two devices".into()));
    }
    src.check(src_offset, len)?;
    dst.check(dst_offset, len)?;
    if len == 0 {
        return Ok(());
    }
    let dev = &dst.device;
    let same = src.buffer == dst.buffer;
    let overlap = same && src_offset < dst_offset + len && dst_offset < src_offset + len;
    if !overlap {
        let region = [vk::BufferCopy::default().src_offset(src_offset).dst_offset(dst_offset).size(len)];
        let mut s = dev.lock();
        // SAFETY: both buffers are live (borrowed for the call) and the ranges were checked.
        return dev.run(&mut s, |d, cmd| unsafe { d.cmd_copy_buffer(cmd, src.buffer, dst.buffer, &region) });
    }
    if src_offset == dst_offset {
        return Ok(());
    }
    let scratch = dev.alloc(len.min(STAGING_BYTES))?;
    let step = scratch.len;
    let starts: Vec<u64> = (0..len.div_ceil(step)).map(|i| i * step).collect();
    let backwards = dst_offset > src_offset;
    let order: Box<dyn Iterator<Item = &u64>> =
        if backwards { Box::new(starts.iter().rev()) } else { Box::new(starts.iter()) };
    let barrier = [vk::MemoryBarrier::default()
        .src_access_mask(vk::AccessFlags::TRANSFER_WRITE)
        .dst_access_mask(vk::AccessFlags::TRANSFER_READ | vk::AccessFlags::TRANSFER_WRITE)];
    let mut s = dev.lock();
    for &at in order {
        let n = (len - at).min(step);
        let into = [vk::BufferCopy::default().src_offset(src_offset + at).dst_offset(0).size(n)];
        let out = [vk::BufferCopy::default().src_offset(0).dst_offset(dst_offset + at).size(n)];
        // SAFETY: the block and the scratch block are live; ranges were checked; the barrier
        // orders the second copy after the first.
        dev.run(&mut s, |d, cmd| unsafe {
            d.cmd_copy_buffer(cmd, src.buffer, scratch.buffer, &into);
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::TRANSFER,
                vk::DependencyFlags::empty(),
                &barrier,
                &[],
                &[],
            );
            d.cmd_copy_buffer(cmd, scratch.buffer, dst.buffer, &out);
        })?;
    }
    Ok(())
}
