//! The CUDA backend: one [`CudaBackend`] per GPU (`cuda:N`). Blocks are `cuMemAlloc`
//! allocations (not the virtual-memory route: cuMemAlloc blocks can be shared with
//! `cuIpcGetMemHandle`, which torch and cupy open directly, while cuMemCreate memory needs a
//! POSIX fd exchanged over a Unix socket). Status comes from `cuMemGetInfo` and NVML.

mod dedicated;

pub use dedicated::CudaDedicated;

use crate::backend::{
    Backend, BackendError, BlockExport, BlockMemory, DeviceInfo, ExportHandle, GpuInfo, MemoryReading, ProcessMemory,
};
use crate::dedicated::{DedicatedError, DedicatedMemory};
use memwarden_core::units::MIB;
use memwarden_core::{DeviceId, MemoryKind};
use memwarden_sys::cuda::{self, Completion, CudaContext, CudaError, DeviceBuffer, Region};
use nvml_wrapper::enum_wrappers::device::Clock;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;
use std::any::Any;
use std::sync::{Arc, Mutex};

/// Device blocks are aligned to 2 MiB (cuMemAlloc aligns large allocations so).
pub const CUDA_BLOCK_ALIGNMENT_BYTES: u64 = 2 * MIB;

/// The driver, its GPUs and NVML, found at start-up.
pub struct CudaSystem {
    pub contexts: Vec<Arc<CudaContext>>,
    nvml: Option<Arc<Nvml>>,
    /// `peer[i][j]`: GPU i can read and write GPU j's memory directly (access enabled).
    pub peer: Vec<Vec<bool>>,
}

impl std::fmt::Debug for CudaSystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaSystem").field("gpus", &self.contexts.len()).field("peer", &self.peer).finish()
    }
}

impl CudaSystem {
    /// Initialises the driver and every GPU; `Err(reason)` when CUDA is unavailable here (no
    /// library, no driver, no GPU). Never panics.
    pub fn init() -> Result<CudaSystem, String> {
        let count = cuda::init().map_err(|e| e.to_string())?;
        if count == 0 {
            return Err("the CUDA driver reports no GPU".into());
        }
        let contexts = (0..count)
            .map(|i| CudaContext::new(i).map_err(|e| format!("cuda:{i}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let nvml = match Nvml::init() {
            Ok(n) => Some(Arc::new(n)),
            Err(e) => {
                tracing::warn!(error = %e, "NVML unavailable: GPU status without per-process memory and bandwidth");
                None
            }
        };
        let n = contexts.len();
        let mut peer = vec![vec![false; n]; n];
        for i in 0..n {
            for j in 0..n {
                if i != j && contexts[i].can_access_peer(&contexts[j]) {
                    match contexts[i].enable_peer_access(&contexts[j]) {
                        Ok(()) => peer[i][j] = true,
                        Err(e) => {
                            tracing::warn!(from = i, to = j, error = %e, "peer access not enabled; copies are staged")
                        }
                    }
                }
            }
        }
        Ok(CudaSystem { contexts, nvml, peer })
    }

    /// One backend per GPU. Each lists, as its status field `peerAccess`, the GPUs it reads
    /// and writes directly.
    pub fn backends(&self) -> Vec<CudaBackend> {
        self.contexts
            .iter()
            .enumerate()
            .map(|(i, ctx)| {
                let mut b = CudaBackend::new(ctx.clone(), self.nvml.clone());
                let peers: Vec<String> = (0..self.contexts.len())
                    .filter(|j| self.peer[i][*j])
                    .map(|j| DeviceId::cuda(j as u32).to_string())
                    .collect();
                b.info.extra.insert("peerAccess".into(), peers.join(","));
                b
            })
            .collect()
    }
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
    nvml: Option<Arc<Nvml>>,
    nvml_index: Option<u32>,
    /// The last driver error other than lack of memory: the device is then unhealthy.
    fault: Mutex<Option<String>>,
    /// VMM allocations for held weights, with the staging rings and park stream they reuse.
    dedicated: Arc<CudaDedicated>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("info", &self.info).finish()
    }
}

#[derive(Debug)]
pub(crate) struct CudaBlock {
    pub(crate) buffer: DeviceBuffer,
}

impl BlockMemory for CudaBlock {
    fn address(&self) -> u64 {
        self.buffer.address()
    }
    fn size_bytes(&self) -> u64 {
        self.buffer.len_bytes()
    }
    fn kind(&self) -> MemoryKind {
        MemoryKind::Device
    }
    fn location(&self) -> DeviceId {
        DeviceId::cuda(self.buffer.context().ordinal())
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        self.buffer.read(offset, out).map_err(cuda_error)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.buffer.write(offset, data).map_err(cuda_error)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn export(&self) -> Result<BlockExport, BackendError> {
        let handle = self
            .buffer
            .ipc_handle()
            .map_err(|e| BackendError::Failed { operation: "cuIpcGetMemHandle", message: e.to_string() })?;
        Ok(BlockExport {
            kind: "cudaIpc",
            handle: ExportHandle::Bytes(handle.to_vec()),
            device_uuid: None,
            allocation: None,
        })
    }
}

/// A driver error as a backend error (copies and block reads/writes; the backend itself also
/// records faults, see `CudaBackend::error`).
pub(crate) fn cuda_error(e: CudaError) -> BackendError {
    match e {
        CudaError::Driver { operation: "bounds check", error } => BackendError::InvalidArgument(error),
        CudaError::OutOfMemory { bytes, operation } => BackendError::OutOfMemory {
            requested_bytes: bytes,
            available_bytes: 0,
            detail: format!("{operation}: out of memory during a copy"),
        },
        CudaError::Unavailable(reason) => BackendError::Unavailable { reason },
        CudaError::Driver { operation, error } => BackendError::Failed { operation, message: error },
    }
}

pub(crate) fn buffer(block: &dyn BlockMemory) -> Result<&DeviceBuffer, BackendError> {
    block
        .as_any()
        .downcast_ref::<CudaBlock>()
        .map(|b| &b.buffer)
        .ok_or_else(|| BackendError::InvalidArgument("block does not belong to a CUDA backend".into()))
}

impl CudaBackend {
    fn new(ctx: Arc<CudaContext>, nvml: Option<Arc<Nvml>>) -> Self {
        let ordinal = ctx.ordinal();
        let uuid = ctx.uuid().unwrap_or_default();
        let nvml_index = nvml.as_ref().and_then(|n| n.device_by_uuid(uuid.as_str()).ok()).and_then(|d| d.index().ok());
        let bandwidth = nvml.as_ref().zip(nvml_index).and_then(|(n, i)| {
            let d = n.device_by_index(i).ok()?;
            let bus_bits = d.memory_bus_width().ok()? as u64;
            let clock_mhz = d.max_clock_info(Clock::Memory).ok()? as u64;
            Some(bus_bits / 8 * clock_mhz * 1_000_000 * 2)
        });
        let cc = ctx.compute_capability().map(|(a, b)| format!("{a}.{b}")).unwrap_or_default();
        let info = DeviceInfo {
            device_id: DeviceId::cuda(ordinal),
            device_type: "GPU",
            name: ctx.name().unwrap_or_else(|_| format!("CUDA device {ordinal}")),
            memory_type: "VRAM",
            gpu: Some(GpuInfo {
                uuid,
                pci_bus_id: ctx.pci_bus_id().unwrap_or_default(),
                compute_capability: cc,
                memory_bandwidth_bytes_per_s: bandwidth,
            }),
            extra: Default::default(),
        };
        let dedicated = Arc::new(CudaDedicated::new(info.device_id, ctx.clone()));
        CudaBackend { ctx, info, nvml, nvml_index, fault: Mutex::new(None), dedicated }
    }

    fn error(&self, e: CudaError, requested_bytes: u64) -> BackendError {
        match e {
            CudaError::OutOfMemory { operation, bytes } => BackendError::OutOfMemory {
                requested_bytes: bytes.max(requested_bytes),
                available_bytes: self.ctx.mem_info().map(|(free, _)| free).unwrap_or(0),
                detail: format!("{operation} on {} failed: out of device memory", self.info.device_id),
            },
            CudaError::Unavailable(reason) => BackendError::Unavailable { reason },
            CudaError::Driver { operation: "bounds check", error } => BackendError::InvalidArgument(error),
            other => {
                let message = other.to_string();
                *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.clone());
                BackendError::Failed { operation: "CUDA driver", message }
            }
        }
    }

    fn processes(&self) -> Vec<ProcessMemory> {
        let Some((nvml, index)) = self.nvml.as_ref().zip(self.nvml_index) else { return vec![] };
        let Ok(device) = nvml.device_by_index(index) else { return vec![] };
        let mut list: Vec<ProcessMemory> = device
            .running_compute_processes()
            .unwrap_or_default()
            .into_iter()
            .chain(device.running_graphics_processes().unwrap_or_default())
            .map(|p| ProcessMemory {
                pid: p.pid,
                name: std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default(),
                used_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b),
                    UsedGpuMemory::Unavailable => None,
                },
            })
            .collect();
        list.sort_by_key(|p| p.pid);
        list.dedup_by_key(|p| p.pid);
        list
    }
}

impl Backend for CudaBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn kinds(&self) -> &[MemoryKind] {
        &[MemoryKind::Device]
    }

    fn fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Total from NVML when present (what nvidia-smi shows), else from cuMemGetInfo; available
    /// is cuMemGetInfo's free (what an allocation can get); used = total − available.
    fn read_status(&self) -> Result<MemoryReading, BackendError> {
        let (free, cuda_total) = self.ctx.mem_info().map_err(|e| self.error(e, 0))?;
        let nvml_mem = self
            .nvml
            .as_ref()
            .zip(self.nvml_index)
            .and_then(|(n, i)| n.device_by_index(i).ok())
            .and_then(|d| d.memory_info().ok());
        let (total, reserved, source) = match &nvml_mem {
            Some(m) => (m.total, Some(m.reserved), "cuMemGetInfo+nvml"),
            None => (cuda_total, None, "cuMemGetInfo"),
        };
        let available = free.min(total);
        Ok(MemoryReading {
            total_bytes: total,
            available_bytes: available,
            used_bytes: total - available,
            source: source.into(),
            reserved_bytes: reserved,
            processes: self.processes(),
        })
    }

    /// `cuMemGetInfo` alone (≈ 5 µs): total and free as the driver sees them.
    fn sample(&self) -> Result<(u64, u64), BackendError> {
        let (free, total) = self.ctx.mem_info().map_err(|e| self.error(e, 0))?;
        Ok((total, free))
    }

    /// CUDA VMM allocations (`cuMemCreate`), exported as POSIX fds.
    fn dedicated(&self) -> Result<Arc<dyn DedicatedMemory>, DedicatedError> {
        Ok(self.dedicated.clone())
    }

    fn max_alignment_bytes(&self) -> u64 {
        CUDA_BLOCK_ALIGNMENT_BYTES
    }

    fn create_block(&self, kind: MemoryKind, size_bytes: u64) -> Result<Box<dyn BlockMemory>, BackendError> {
        if kind != MemoryKind::Device {
            return Err(BackendError::UnsupportedKind { device: self.info.device_id, kind });
        }
        let buffer = self.ctx.alloc(size_bytes).map_err(|e| self.error(e, size_bytes))?;
        Ok(Box::new(CudaBlock { buffer }))
    }

    fn copy(
        &self,
        src: &dyn BlockMemory,
        src_offset: u64,
        dst: &dyn BlockMemory,
        dst_offset: u64,
        len_bytes: u64,
    ) -> Result<(), BackendError> {
        let (dst, src) = (Region::Device(buffer(dst)?, dst_offset), Region::Device(buffer(src)?, src_offset));
        cuda::copy(dst, src, len_bytes, Completion::Wait).map_err(|e| self.error(e, len_bytes))
    }

    fn copy_queued(
        &self,
        src: &dyn BlockMemory,
        src_offset: u64,
        dst: &dyn BlockMemory,
        dst_offset: u64,
        len_bytes: u64,
    ) -> Result<(), BackendError> {
        let (dst, src) = (Region::Device(buffer(dst)?, dst_offset), Region::Device(buffer(src)?, src_offset));
        cuda::copy(dst, src, len_bytes, Completion::Queue).map_err(|e| self.error(e, len_bytes))
    }

    fn synchronize(&self) -> Result<(), BackendError> {
        self.ctx.synchronize().map_err(|e| self.error(e, 0))
    }

    fn write(&self, block: &dyn BlockMemory, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        buffer(block)?.write(offset, data).map_err(|e| self.error(e, data.len() as u64))
    }

    fn read(&self, block: &dyn BlockMemory, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        buffer(block)?.read(offset, out).map_err(|e| self.error(e, out.len() as u64))
    }
}

#[cfg(all(test, feature = "hw-tests"))]
mod hw_tests {
    //! Run on a machine with an NVIDIA GPU; they fail (not skip) without one.
    use super::*;

    /// The weights store's device path on a real GPU: a VMM block filled through the staging
    /// pipeline, exported as a POSIX fd, parked into pinned chunks and restored into a new block.
    #[test]
    fn cuda_dedicated_blocks_load_export_park_and_restore() {
        use crate::dedicated::{ChunkPiece, PinnedChunk};
        let system = CudaSystem::init().expect("a CUDA GPU is required for hw-tests");
        let b = system.backends().into_iter().next().expect("cuda:0");
        let memory = b.dedicated().expect("CUDA offers dedicated memory");
        assert_eq!(
            (memory.device(), memory.handle_kind(), memory.can_park()),
            (DeviceId::cuda(0), memwarden_core::HandleKind::CudaVmm, true)
        );
        let len = 8 * MIB + 12345;
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add((i >> 20) as u8)).collect();
        let block = memory.alloc(len).expect("a VMM allocation");
        assert!(block.size_bytes() >= len, "rounded up to the granularity");
        {
            let mut w = block.writer(4 * MIB).expect("writer");
            for (k, piece) in data.chunks((4 * MIB) as usize).enumerate() {
                w.put(k as u64 * 4 * MIB, &mut |buf: &mut [u8]| {
                    buf[..piece.len()].copy_from_slice(piece);
                    Ok(piece.len())
                })
                .expect("put");
            }
            w.finish().expect("finish");
        }
        assert!(!block.export().expect("a POSIX fd per piece for a holder").is_empty());
        let chunk = || memory.pinned_chunk(8 * MIB).expect("a registered park chunk");
        let parked: Vec<PinnedChunk> = vec![chunk(), chunk()];
        fn to_pieces(c: &[PinnedChunk], len: u64) -> Vec<ChunkPiece<'_>> {
            vec![(0, &c[0], 0, 8 * MIB), (8 * MIB, &c[1], 0, len - 8 * MIB)]
        }
        fn view(c: &[PinnedChunk], len: u64) -> Vec<u8> {
            let mut out = vec![0u8; len as usize];
            let (a, b) = out.split_at_mut((8 * MIB) as usize);
            c[0].0.read(0, a).expect("read a chunk");
            c[1].0.read(0, b).expect("read a chunk");
            out
        }
        block.save(&to_pieces(&parked, len)).expect("park");
        assert!(view(&parked, len) == data, "the parked bytes are the loaded ones");
        drop(block);
        let again = memory.alloc(len).expect("a second VMM allocation");
        again.restore(&to_pieces(&parked, len)).expect("resume");
        let check: Vec<PinnedChunk> = vec![chunk(), chunk()];
        again.save(&to_pieces(&check, len)).expect("park again");
        assert!(view(&check, len) == data, "the restored bytes are the loaded ones");
    }

    /// A switch on a real GPU: model A (resident) goes out to pinned chunks while model B
    /// (parked) comes in, both copies overlapped, B built from A's pieces. Every byte of both
    /// lands where it belongs; the times are printed beside each direction alone (the figures
    /// docs/PERFORMANCE.md records). `MEMWARDEN_SWITCH_BYTES` sets the model size (default
    /// 8 GiB).
    #[test]
    fn cuda_switch_overlaps_both_directions_and_keeps_every_byte() {
        use crate::dedicated::{ChunkPiece, PinnedChunk};
        use std::time::Instant;
        let system = CudaSystem::init().expect("a CUDA GPU is required for hw-tests");
        let b = system.backends().into_iter().next().expect("cuda:0");
        let memory = b.dedicated().expect("CUDA offers dedicated memory");
        let len: u64 = std::env::var("MEMWARDEN_SWITCH_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(8 << 30);
        let chunk_bytes = 256 * MIB;
        let chunks = |n: u64| -> Vec<PinnedChunk> {
            (0..n.div_ceil(chunk_bytes)).map(|_| memory.pinned_chunk(chunk_bytes).expect("a park chunk")).collect()
        };
        fn pieces(c: &[PinnedChunk], len: u64, chunk_bytes: u64) -> Vec<ChunkPiece<'_>> {
            c.iter()
                .enumerate()
                .map(|(i, ch)| (i as u64 * chunk_bytes, ch, 0, chunk_bytes.min(len - i as u64 * chunk_bytes)))
                .collect()
        }
        // A pattern per model: word i of model `seed` is i * 2654435761 + seed.
        let word = |seed: u64, i: u64| i.wrapping_mul(2_654_435_761).wrapping_add(seed);
        let fill = |c: &[PinnedChunk], seed: u64| {
            for (k, ch) in c.iter().enumerate() {
                let base = k as u64 * chunk_bytes / 8;
                let bytes: Vec<u8> = (0..chunk_bytes / 8).flat_map(|i| word(seed, base + i).to_le_bytes()).collect();
                ch.0.write(0, &bytes).expect("fill a chunk");
            }
        };
        let check = |c: &[PinnedChunk], seed: u64, what: &str| {
            let mut buf = vec![0u8; chunk_bytes as usize];
            for (k, ch) in c.iter().enumerate() {
                let n = chunk_bytes.min(len - k as u64 * chunk_bytes) as usize;
                ch.0.read(0, &mut buf[..n]).expect("read a chunk");
                let base = k as u64 * chunk_bytes / 8;
                let bad = buf[..n].chunks_exact(8).enumerate().find(|(i, w)| {
                    u64::from_le_bytes((*w).try_into().expect("8 bytes")) != word(seed, base + *i as u64)
                });
                assert!(bad.is_none(), "{what}: word {:?} of chunk {k} differs", bad.map(|(i, _)| i));
            }
        };
        let (a_src, b_src, a_out, b_back) = (chunks(len), chunks(len), chunks(len), chunks(len));
        fill(&a_src, 1);
        fill(&b_src, 2);
        // A resident; each direction timed alone on it.
        let a = memory.alloc(len).expect("model A");
        let t = Instant::now();
        a.restore(&pieces(&a_src, len, chunk_bytes)).expect("A in");
        let h2d_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        a.save(&pieces(&a_out, len, chunk_bytes)).expect("A out");
        let d2h_ms = t.elapsed().as_secs_f64() * 1e3;
        check(&a_out, 1, "A through one direction each");
        // The switch: A out to a_out (overwritten), B in from b_src.
        fill(&a_out, 99);
        let t = Instant::now();
        let sw = a
            .switch(&*memory, &pieces(&a_out, len, chunk_bytes), len, &pieces(&b_src, len, chunk_bytes))
            .expect("switch");
        let switch_ms = t.elapsed().as_secs_f64() * 1e3;
        assert!(sw.overlapped, "on a GPU the switch reuses the outgoing pieces");
        check(&a_out, 1, "A saved by the switch");
        sw.block.save(&pieces(&b_back, len, chunk_bytes)).expect("B out again");
        check(&b_back, 2, "B resumed by the switch");
        let one_way = h2d_ms.max(d2h_ms);
        println!(
            "SWITCH bytes={len} switch_ms={switch_ms:.1} h2d_ms={h2d_ms:.1} d2h_ms={d2h_ms:.1} \
             h2d_gbps={:.1} d2h_gbps={:.1} ratio_to_one_way={:.2} serial_ratio=2.00 phases={:?}",
            len as f64 / h2d_ms / 1e6,
            len as f64 / d2h_ms / 1e6,
            switch_ms / one_way,
            sw.phases
        );
    }
}
