//! Copies on the device's queue: between blocks (`vkCmdCopyBuffer`, overlapping moves through
//! a scratch block) and through the staging buffer.

use super::{DeviceMemory, Submitter, VulkanDevice, STAGING_BYTES};
use crate::vulkan::VulkanError;
use ash::vk;
use std::sync::Arc;

impl Submitter {
    pub(super) fn empty() -> Self {
        Submitter {
            queue: vk::Queue::null(),
            pool: vk::CommandPool::null(),
            cmd: vk::CommandBuffer::null(),
            fence: vk::Fence::null(),
            staging: None,
        }
    }

    /// Queue 0 of `family` (requested at device creation), a command pool and buffer, a fence.
    pub(super) fn create(d: &ash::Device, family: u32, s: &mut Submitter) -> Result<(), VulkanError> {
        // SAFETY: the device is live; the family and queue index 0 were requested at creation.
        s.queue = unsafe { d.get_device_queue(family, 0) };
        let pool_info = vk::CommandPoolCreateInfo::default()
            .queue_family_index(family)
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        // SAFETY: plain creation calls on a live device; each object is destroyed in the
        // device's Drop (null handles of a failed step are ignored there).
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
        Ok(())
    }
}

impl VulkanDevice {
    pub(super) fn staged_write(&self, dst: vk::Buffer, offset: u64, data: &[u8]) -> Result<(), VulkanError> {
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

    pub(super) fn staged_read(&self, src: vk::Buffer, offset: u64, out: &mut [u8]) -> Result<(), VulkanError> {
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
        let mut s = dev.lock_block_copies();
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
    let mut s = dev.lock_block_copies();
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
