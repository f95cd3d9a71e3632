//! The host's dedicated memory: one file per block in a tmpfs (`host.shared_memory_dir`), mapped
//! shared so that holders map the same pages through a descriptor of the file.

use crate::dedicated::{
    serial_switch, ChunkPiece, ChunkWriter, DedicatedBlock, DedicatedError, DedicatedMemory, ExportedPiece,
    PinnedChunk, SwitchFailure, Switched,
};
use memwarden_core::{DeviceId, HandleKind};
use memwarden_sys::HostMapping;
use std::path::PathBuf;

/// Blocks in a tmpfs (`/dev/shm`), mapped shared so holders map the same pages.
pub struct HostDedicated {
    dir: PathBuf,
}

impl HostDedicated {
    pub fn new(dir: PathBuf) -> HostDedicated {
        HostDedicated { dir }
    }
}

struct HostDedicatedBlock(HostMapping);

impl DedicatedMemory for HostDedicated {
    fn device(&self) -> DeviceId {
        DeviceId::Cpu
    }

    fn handle_kind(&self) -> HandleKind {
        HandleKind::Shm
    }

    fn can_park(&self) -> bool {
        false
    }

    fn alloc(&self, bytes: u64) -> Result<Box<dyn DedicatedBlock>, DedicatedError> {
        let m = HostMapping::new_shared(bytes.max(1), memwarden_sys::page_size_bytes(), false, &self.dir)
            .map_err(|e| DedicatedError::from_sys("weights on cpu", bytes, e))?;
        Ok(Box::new(HostDedicatedBlock(m)))
    }

    /// Huge pages locked with `mlock` (no GPU driver to register them with).
    fn pinned_chunk(&self, bytes: u64) -> Result<PinnedChunk, DedicatedError> {
        HostMapping::new_huge(bytes, true)
            .map(PinnedChunk)
            .map_err(|e| DedicatedError::from_sys("park chunk", bytes, e))
    }
}

struct HostWriter<'a> {
    block: &'a HostMapping,
    buf: Vec<u8>,
}

impl ChunkWriter for HostWriter<'_> {
    fn put(
        &mut self,
        offset: u64,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<usize, DedicatedError>,
    ) -> Result<(), DedicatedError> {
        let n = fill(&mut self.buf)?;
        self.block.write(offset, &self.buf[..n]).map_err(|e| DedicatedError::Failed(e.to_string()))
    }

    fn finish(&mut self) -> Result<(), DedicatedError> {
        Ok(())
    }
}

impl DedicatedBlock for HostDedicatedBlock {
    fn size_bytes(&self) -> u64 {
        self.0.len_bytes()
    }

    fn export(&self) -> Result<Vec<ExportedPiece>, DedicatedError> {
        let handle =
            self.0.share_fd().map_err(|e| DedicatedError::Failed(format!("exporting the weights file: {e}")))?;
        Ok(vec![ExportedPiece { offset: 0, size_bytes: self.size_bytes(), handle }])
    }

    fn writer(&self, chunk_bytes: u64) -> Result<Box<dyn ChunkWriter + '_>, DedicatedError> {
        Ok(Box::new(HostWriter { block: &self.0, buf: vec![0; chunk_bytes as usize] }))
    }

    fn save(&self, pieces: &[ChunkPiece<'_>]) -> Result<(), DedicatedError> {
        for &(off, chunk, c_off, n) in pieces {
            HostMapping::copy(&self.0, off, &chunk.0, c_off, n).map_err(|e| DedicatedError::Failed(e.to_string()))?;
        }
        Ok(())
    }

    fn restore(&self, pieces: &[ChunkPiece<'_>]) -> Result<(), DedicatedError> {
        for &(off, chunk, c_off, n) in pieces {
            HostMapping::copy(&chunk.0, c_off, &self.0, off, n).map_err(|e| DedicatedError::Failed(e.to_string()))?;
        }
        Ok(())
    }

    fn switch(
        self: Box<Self>,
        memory: &dyn DedicatedMemory,
        save: &[ChunkPiece<'_>],
        in_bytes: u64,
        restore: &[ChunkPiece<'_>],
    ) -> Result<Switched, SwitchFailure> {
        serial_switch(self, memory, save, in_bytes, restore)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{HostBackend, HostStatusReader};
    use crate::Backend;

    #[test]
    fn host_dedicated_blocks_are_shared_files_that_park_and_come_back_byte_for_byte() {
        let dir = std::env::temp_dir().join(format!("memwarden-dedicated-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let none = HostBackend::new(HostStatusReader::default());
        assert!(matches!(none.dedicated(), Err(DedicatedError::Unsupported { device: DeviceId::Cpu, .. })));
        let backend = HostBackend::new(HostStatusReader::default()).with_shared_dir(Some(dir.clone()));
        let memory = backend.dedicated().expect("dedicated memory with a shared dir");
        assert_eq!((memory.device(), memory.handle_kind(), memory.can_park()), (DeviceId::Cpu, HandleKind::Shm, false));
        let block = memory.alloc(5000).expect("block");
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        {
            let mut w = block.writer(4096).expect("writer");
            for (k, piece) in data.chunks(4096).enumerate() {
                w.put(k as u64 * 4096, &mut |buf: &mut [u8]| {
                    buf[..piece.len()].copy_from_slice(piece);
                    Ok(piece.len())
                })
                .expect("put");
            }
            w.finish().expect("finish");
        }
        // A filler that stops: its error is the caller's, nothing is written.
        let mut w = block.writer(4096).expect("writer");
        assert_eq!(w.put(0, &mut |_: &mut [u8]| Err(DedicatedError::Stopped)), Err(DedicatedError::Stopped));
        drop(w);
        let exported = std::fs::File::from(block.export().expect("a descriptor").remove(0).handle);
        let mut seen = vec![0u8; data.len()];
        std::os::unix::fs::FileExt::read_exact_at(&exported, &mut seen, 0).expect("read the file");
        assert!(seen == data, "the holder's descriptor maps the bytes written");
        let chunks = [memory.pinned_chunk(4096), memory.pinned_chunk(4096)];
        let chunks: Vec<PinnedChunk> = chunks.into_iter().map(|c| c.expect("chunk")).collect();
        let pieces: Vec<ChunkPiece<'_>> = vec![(0, &chunks[0], 0, 4096), (4096, &chunks[1], 0, 5000 - 4096)];
        block.save(&pieces).expect("save");
        let again = memory.alloc(5000).expect("second block");
        again.restore(&pieces).expect("restore");
        let back = std::fs::File::from(again.export().expect("a descriptor").remove(0).handle);
        std::os::unix::fs::FileExt::read_exact_at(&back, &mut seen, 0).expect("read the file");
        assert!(seen == data, "parked bytes come back");
        drop((block, again, exported, back));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
