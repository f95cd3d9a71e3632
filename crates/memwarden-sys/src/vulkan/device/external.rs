//! External memory: host blocks imported for copies (`VK_EXT_external_memory_host`), and
//! blocks exported and imported as opaque fds (`VK_KHR_external_memory_fd`).

use super::{DeviceMemory, VulkanDevice};
use crate::vulkan::VulkanError;
use crate::HostMapping;
use crate::SharedHandle;
use ash::vk;
use std::ptr::NonNull;
use std::sync::Arc;

/// How blocks are made exportable (`VK_KHR_external_memory_fd`, opaque fds).
pub(super) struct Export {
    pub(super) fd: ash::khr::external_memory_fd::Device,
    /// The driver wants a dedicated allocation for exportable buffers.
    pub(super) dedicated: bool,
}

/// A block exported as an opaque fd: what another process needs to import it
/// (`VkImportMemoryFdInfoKHR` with `allocationSize` and `memoryTypeIndex` as given here, on the
/// physical device with the same UUID).
#[derive(Debug)]
pub struct ExportedMemory {
    pub fd: SharedHandle,
    /// The exported allocation's size (the importer must pass exactly this).
    pub allocation_bytes: u64,
    pub memory_type_index: u32,
    /// The importer must make a dedicated allocation (`VkMemoryDedicatedAllocateInfo`), over
    /// a buffer of exactly `buffer_bytes`.
    pub dedicated: bool,
    /// The size of the exporter's buffer over the allocation.
    pub buffer_bytes: u64,
}

/// Which way a copy between a host mapping and a block goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCopy {
    ToDevice,
    ToHost,
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
        let cached = |imports: &[MappingImport]| {
            let mine = imports.iter().find(|i| Arc::ptr_eq(&i.device, self))?;
            Some((mine.buffer != vk::Buffer::null()).then_some(mine.buffer))
        };
        if let Some(found) = cached(&host.vulkan_imports.lock().unwrap_or_else(|e| e.into_inner())) {
            return found;
        }
        // Imported without the lock (pinning a large mapping takes milliseconds); a refusal is
        // kept too (null handles), so it is not tried again for every copy.
        let owned = match self.import_host(host, 0, host.len_bytes()) {
            Ok((mut import, 0)) => {
                let owned = MappingImport { device: self.clone(), buffer: import.buffer, memory: import.memory };
                // Ownership moved to `owned`: the per-copy guard must not free them too.
                (import.buffer, import.memory) = (vk::Buffer::null(), vk::DeviceMemory::null());
                owned
            }
            _ => MappingImport { device: self.clone(), buffer: vk::Buffer::null(), memory: vk::DeviceMemory::null() },
        };
        let mut imports = host.vulkan_imports.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = cached(&imports) {
            return found; // another copy imported it meanwhile: `owned` is released here
        }
        let buffer = owned.buffer;
        imports.push(owned);
        (buffer != vk::Buffer::null()).then_some(buffer)
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
            // Host-visible and coherent: host writes before the submission and the device's
            // writes after the fence are then visible without flushes or invalidations.
            type F = vk::MemoryPropertyFlags;
            let coherent = F::HOST_VISIBLE | F::HOST_COHERENT;
            let bits = req.memory_type_bits & pointer.memory_type_bits;
            let props = &self.memory_properties;
            let ty = super::pick_type(props, bits, coherent | F::HOST_CACHED, F::empty())
                .or_else(|| super::pick_type(props, bits, coherent, F::empty()));
            let Some(ty) = ty.filter(|_| req.size <= size) else {
                return Err(VulkanError::InvalidArgument("no host-coherent memory type can import these pages".into()));
            };
            let mut from =
                vk::ImportMemoryHostPointerInfoEXT::default().handle_type(handle).host_pointer(base as *mut _);
            let alloc =
                vk::MemoryAllocateInfo::default().allocation_size(size).memory_type_index(ty).push_next(&mut from);
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
        // A dedicated allocation is imported with a buffer like the exporter's.
        let buffer_bytes = if exported.dedicated { exported.buffer_bytes } else { len_bytes };
        if len_bytes == 0 || len_bytes > buffer_bytes || buffer_bytes > exported.allocation_bytes {
            return Err(VulkanError::InvalidArgument(format!(
                "a buffer of {len_bytes} bytes over an allocation of {}",
                exported.allocation_bytes
            )));
        }
        let d = &self.device;
        let handle = vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD;
        let mut external = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle);
        let info = vk::BufferCreateInfo::default().size(buffer_bytes).usage(Self::usage()).push_next(&mut external);
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
            exportable: false,
        };
        // The type and size come from another process: checked here, not left to the driver.
        // SAFETY: the buffer is live.
        let req = unsafe { d.get_buffer_memory_requirements(buffer) };
        if exported.memory_type_index >= self.memory_properties.memory_type_count
            || req.memory_type_bits & (1 << exported.memory_type_index) == 0
            || req.size > exported.allocation_bytes
        {
            return Err(VulkanError::InvalidArgument(format!(
                "memory type {} and {} bytes cannot hold a buffer of {buffer_bytes} bytes here",
                exported.memory_type_index, exported.allocation_bytes
            )));
        }
        let raw_fd = fd::raw(&exported.fd)?;
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
            fd::give_to_driver(exported.fd);
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
        // A pinned mapping (locked, or registered with CUDA) is imported whole once and kept;
        // pageable memory only for the copy, so it is not left pinned.
        let pinned = host.is_locked() || host.is_cuda_registered();
        let cached = if pinned { dev.mapping_import(host) } else { None };
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
    // A source is only read (other copies may read it at once); only a destination, which the
    // daemon gives to one copy at a time, is borrowed mutably.
    let at = unsafe { host.ptr.as_ptr().add(at) };
    match dir {
        // SAFETY: as above.
        HostCopy::ToDevice => block.write(block_offset, unsafe { std::slice::from_raw_parts(at, len as usize) })?,
        // SAFETY: as above.
        HostCopy::ToHost => block.read(block_offset, unsafe { std::slice::from_raw_parts_mut(at, len as usize) })?,
    }
    Ok(if block.ptr.is_some() { HostPath::Mapped } else { HostPath::Staged })
}

impl DeviceMemory {
    /// A new opaque fd of this block's memory (`VK_KHR_external_memory_fd`) for another
    /// process to import ([`VulkanDevice::import_fd`]); each call gives a new descriptor.
    pub fn export(&self) -> Result<ExportedMemory, VulkanError> {
        let e = self
            .device
            .export
            .as_ref()
            .ok_or_else(|| VulkanError::Unavailable(self.device.export_support().err().unwrap_or_default()))?;
        if !self.exportable {
            return Err(VulkanError::InvalidArgument("an imported block is not exported again".into()));
        }
        let info = vk::MemoryGetFdInfoKHR::default()
            .memory(self.memory)
            .handle_type(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD);
        // SAFETY: the memory is live and was allocated exportable as opaque fds (export is
        // Some only then); the fd returned is new and owned by the caller.
        let fd = unsafe { e.fd.get_memory_fd(&info) }.map_err(|r| VulkanError::from_vk("vkGetMemoryFdKHR", 0, r))?;
        Ok(ExportedMemory {
            // SAFETY: a new descriptor nobody else owns.
            fd: unsafe { fd::adopt(fd) }?,
            allocation_bytes: self.accounted,
            memory_type_index: self.device.block_type,
            dedicated: e.dedicated,
            buffer_bytes: self.len,
        })
    }
}

/// Opaque fds as [`SharedHandle`]s: Unix descriptors. Windows exports `OPAQUE_WIN32` handles
/// instead (the Windows port); there these answer "unavailable" (the extension is absent, so
/// they are not reached).
#[cfg(unix)]
mod fd {
    use crate::vulkan::VulkanError;
    use crate::SharedHandle;
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};

    pub(super) fn raw(h: &SharedHandle) -> Result<std::ffi::c_int, VulkanError> {
        Ok(h.as_raw_fd())
    }

    /// The driver owns the descriptor from now on: not closed here.
    pub(super) fn give_to_driver(h: SharedHandle) {
        let _owned_by_vulkan = h.into_raw_fd();
    }

    /// # Safety
    /// `fd` must be a new descriptor that nothing else owns.
    pub(super) unsafe fn adopt(fd: std::ffi::c_int) -> Result<SharedHandle, VulkanError> {
        // SAFETY: the caller's promise.
        Ok(unsafe { SharedHandle::from_raw_fd(fd) })
    }
}

#[cfg(windows)]
mod fd {
    use crate::vulkan::VulkanError;
    use crate::SharedHandle;

    fn unavailable() -> VulkanError {
        VulkanError::Unavailable("opaque fd export and import are not supported on this platform".into())
    }

    pub(super) fn raw(_h: &SharedHandle) -> Result<std::ffi::c_int, VulkanError> {
        Err(unavailable())
    }

    pub(super) fn give_to_driver(h: SharedHandle) {
        drop(h);
    }

    /// # Safety
    /// None: nothing is adopted.
    pub(super) unsafe fn adopt(_fd: std::ffi::c_int) -> Result<SharedHandle, VulkanError> {
        Err(unavailable())
    }
}
