//! Copies between any two blocks, whatever backends they came from. Blocks in memory the CUDA
//! driver can address (host and CUDA) take the sys crate's one copy: host↔host with `memmove`,
//! anything involving a CUDA GPU through the driver on unified addresses (peer copies between
//! GPUs); two blocks of one Vulkan device take `vkCmdCopyBuffer`, and a host block and a
//! Vulkan block one `vkCmdCopyBuffer` on the imported host pages (or the device's staging
//! buffer). Any other pair is staged through host memory, each side reading or writing its own
//! bytes, so a new backend works with every other one at once and adds a fast path here only
//! where it has one. Bounds are checked before any byte moves.

use crate::backend::{BackendError, BlockMemory};
use crate::cuda::cuda_error;
use crate::{cuda, host, vulkan};
use memwarden_core::units::MIB;
use memwarden_core::{DeviceId, GpuApi};
use memwarden_sys::cuda::{self as sys_cuda, Completion, Region};
use memwarden_sys::vulkan::HostCopy;
use std::sync::Arc;

/// Bytes staged through host memory per step of a copy with no fast path.
pub const STAGING_CHUNK_BYTES: u64 = 8 * MIB;

/// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset` and waits until the
/// bytes have arrived.
pub fn copy_between(
    src: &dyn BlockMemory,
    src_offset: u64,
    dst: &dyn BlockMemory,
    dst_offset: u64,
    len: u64,
) -> Result<(), BackendError> {
    match (region(src, src_offset), region(dst, dst_offset)) {
        (Some(s), Some(d)) => sys_cuda::copy(d?, s?, len, Completion::Wait).map_err(cuda_error),
        _ => match (vulkan::memory(src), vulkan::memory(dst)) {
            (Ok(s), Ok(d)) if Arc::ptr_eq(s.device(), d.device()) => {
                vulkan::copy_blocks(s, src_offset, d, dst_offset, len)
            }
            (Ok(s), Err(_)) if dst.location() == DeviceId::Cpu => {
                let d = host::mapping(dst)?;
                vulkan::copy_with_host(s, src_offset, d, dst_offset, len, HostCopy::ToHost)
            }
            (Err(_), Ok(d)) if src.location() == DeviceId::Cpu => {
                let s = host::mapping(src)?;
                vulkan::copy_with_host(d, dst_offset, s, src_offset, len, HostCopy::ToDevice)
            }
            _ => staged(src, src_offset, dst, dst_offset, len),
        },
    }
}

/// The sys crate's view of a block at an offset, for blocks on its fast path.
fn region(block: &dyn BlockMemory, offset: u64) -> Option<Result<Region<'_>, BackendError>> {
    match block.location() {
        DeviceId::Cpu => Some(host::mapping(block).map(|m| Region::Host(m, offset))),
        DeviceId::Gpu(GpuApi::Cuda, _) => Some(cuda::buffer(block).map(|b| Region::Device(b, offset))),
        DeviceId::Gpu(..) => None,
    }
}

/// Source → host buffer → destination, [`STAGING_CHUNK_BYTES`] at a time. Within one block, a
/// move to a higher offset runs back to front so overlapping ranges copy like `memmove`.
fn staged(
    src: &dyn BlockMemory,
    src_offset: u64,
    dst: &dyn BlockMemory,
    dst_offset: u64,
    len: u64,
) -> Result<(), BackendError> {
    for (block, offset, side) in [(src, src_offset, "source"), (dst, dst_offset, "destination")] {
        if offset.checked_add(len).is_none_or(|end| end > block.size_bytes()) {
            return Err(BackendError::InvalidArgument(format!(
                "{side} range {offset}+{len} is outside its block of {} bytes",
                block.size_bytes()
            )));
        }
    }
    let mut buf = vec![0u8; len.min(STAGING_CHUNK_BYTES) as usize];
    let chunks: Vec<u64> = (0..len.div_ceil(STAGING_CHUNK_BYTES)).map(|i| i * STAGING_CHUNK_BYTES).collect();
    let same_block = std::ptr::addr_eq(src as *const dyn BlockMemory, dst as *const dyn BlockMemory);
    let backwards = same_block && dst_offset > src_offset;
    let order: Box<dyn Iterator<Item = &u64>> =
        if backwards { Box::new(chunks.iter().rev()) } else { Box::new(chunks.iter()) };
    for &at in order {
        let n = (len - at).min(STAGING_CHUNK_BYTES) as usize;
        src.read(src_offset + at, &mut buf[..n])?;
        dst.write(dst_offset + at, &buf[..n])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{HostBackend, HostStatusReader};
    use crate::Backend;
    use memwarden_core::MemoryKind;
    use std::any::Any;
    use std::sync::Mutex;

    /// Memory of a GPU API with no fast path to anything: only its own read and write.
    #[derive(Debug)]
    struct OtherGpuBlock(Mutex<Vec<u8>>);

    impl BlockMemory for OtherGpuBlock {
        fn address(&self) -> u64 {
            0
        }
        fn size_bytes(&self) -> u64 {
            self.0.lock().map(|v| v.len() as u64).unwrap_or(0)
        }
        fn kind(&self) -> MemoryKind {
            MemoryKind::Device
        }
        fn location(&self) -> DeviceId {
            DeviceId::Gpu(GpuApi::Vulkan, 0)
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
            let v = self.0.lock().map_err(|_| BackendError::InvalidArgument("poisoned".into()))?;
            out.copy_from_slice(&v[offset as usize..offset as usize + out.len()]);
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
            let mut v = self.0.lock().map_err(|_| BackendError::InvalidArgument("poisoned".into()))?;
            v[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn copies_with_no_fast_path_are_staged_through_host_memory_byte_for_byte() {
        let host = HostBackend::new(HostStatusReader::default());
        let size = 2 * STAGING_CHUNK_BYTES + 12345;
        let a = host.create_block(MemoryKind::Host, size).expect("host block");
        let b = host.create_block(MemoryKind::Host, size).expect("host block");
        let gpu = OtherGpuBlock(Mutex::new(vec![0; size as usize]));
        let data = pattern(size as usize - 100, 7);
        host.write(a.as_ref(), 100, &data).expect("write");
        // host → other GPU → host, over several staging chunks.
        copy_between(a.as_ref(), 100, &gpu, 50, data.len() as u64).expect("host to other");
        copy_between(&gpu, 50, b.as_ref(), 0, data.len() as u64).expect("other to host");
        let mut back = vec![0u8; data.len()];
        host.read(b.as_ref(), 0, &mut back).expect("read");
        assert!(back == data, "bytes differ after the staged round trip");
        // Out of bounds: refused before any byte moves.
        let before = gpu.0.lock().expect("lock").clone();
        let e = copy_between(a.as_ref(), 0, &gpu, size - 10, 11).expect_err("past the end");
        assert!(matches!(e, BackendError::InvalidArgument(ref m) if m.contains("destination")), "{e:?}");
        assert!(*gpu.0.lock().expect("lock") == before, "nothing moved");
    }

    #[test]
    fn an_overlapping_staged_move_within_one_block_copies_like_memmove() {
        let len = 2 * STAGING_CHUNK_BYTES + 7;
        let total = len + STAGING_CHUNK_BYTES / 2;
        let original = pattern(total as usize, 3);
        for (from, to) in [(0, STAGING_CHUNK_BYTES / 2), (STAGING_CHUNK_BYTES / 2, 0)] {
            let gpu = OtherGpuBlock(Mutex::new(original.clone()));
            copy_between(&gpu, from, &gpu, to, len).expect("move");
            let got = gpu.0.lock().expect("lock").clone();
            let want = &original[from as usize..(from + len) as usize];
            assert!(&got[to as usize..(to + len) as usize] == want, "{from} -> {to}: bytes differ");
        }
    }
}
