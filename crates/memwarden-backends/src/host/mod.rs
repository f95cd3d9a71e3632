//! The host backend: `cpu`. Blocks are anonymous mappings with committed pages (`host`), also
//! locked in RAM for `pinned`. On a machine with CUDA, pinned memory will come from the CUDA
//! backend (`cuMemHostAlloc`) so copies run at pinned speed; this is the driver-less path.

mod dedicated;
mod status;

pub use dedicated::HostDedicated;

pub use status::{parse_meminfo, parse_proc_cgroup, CgroupEvents, CgroupMemory, CgroupPath, HostStatusReader, Meminfo};

use crate::backend::{Backend, BackendError, BlockExport, BlockMemory, DeviceInfo, ExportHandle, MemoryReading};
use crate::dedicated::{DedicatedError, DedicatedMemory};
use crate::signals::HostSignals;
use memwarden_core::units::MIB;
use memwarden_core::{DeviceId, MemoryKind};
use memwarden_sys::cuda::{CudaContext, CudaError};
use memwarden_sys::{HostMapping, SysError};
use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;

/// Host block bases are aligned to 2 MiB: the largest alignment a host allocation may ask for,
/// and the size of a transparent huge page.
pub const HOST_BLOCK_ALIGNMENT_BYTES: u64 = 2 * MIB;

#[derive(Debug)]
pub struct HostBackend {
    info: DeviceInfo,
    reader: HostStatusReader,
    shared_dir: Option<PathBuf>,
    /// Group given the shared files (mode 0660 then, else 0600).
    shared_group: Option<u32>,
    cuda: Option<Arc<CudaContext>>,
}

#[derive(Debug)]
pub(crate) struct HostBlock {
    pub(crate) mapping: HostMapping,
    kind: MemoryKind,
}

impl BlockMemory for HostBlock {
    fn address(&self) -> u64 {
        self.mapping.address()
    }
    fn size_bytes(&self) -> u64 {
        self.mapping.len_bytes()
    }
    fn kind(&self) -> MemoryKind {
        self.kind
    }
    fn location(&self) -> DeviceId {
        DeviceId::Cpu
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        self.mapping.read(offset, out).map_err(|e| BackendError::InvalidArgument(e.to_string()))
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.mapping.write(offset, data).map_err(|e| BackendError::InvalidArgument(e.to_string()))
    }
    fn export(&self) -> Result<BlockExport, BackendError> {
        match self.mapping.shared_path() {
            Some(p) => Ok(BlockExport {
                kind: "shm",
                handle: ExportHandle::Path(p.to_path_buf()),
                device_uuid: None,
                allocation: None,
            }),
            None => Err(BackendError::InvalidArgument(
                "this host block is anonymous memory (host.shared_memory_dir is unset or was unusable), so it cannot be shared"
                    .into(),
            )),
        }
    }
}

pub(crate) fn mapping(block: &dyn BlockMemory) -> Result<&HostMapping, BackendError> {
    block
        .as_any()
        .downcast_ref::<HostBlock>()
        .map(|b| &b.mapping)
        .ok_or_else(|| BackendError::InvalidArgument("block does not belong to the host backend".into()))
}

fn sys_error(e: SysError, backend: &HostBackend, kind: MemoryKind) -> BackendError {
    let available = || backend.read_status().map(|r| r.available_bytes).unwrap_or(0);
    match e {
        SysError::Map { len_bytes, .. } | SysError::Commit { len_bytes, .. } if e.is_out_of_memory() => {
            BackendError::OutOfMemory {
                requested_bytes: len_bytes,
                available_bytes: available(),
                // The OS's words name the file when a tmpfs (host.shared_memory_dir) is full.
                detail: format!("the OS could not commit {kind} memory: {e}"),
            }
        }
        SysError::Lock { len_bytes, limit_bytes, .. } => {
            let detail = e.to_string();
            BackendError::OutOfMemory {
                requested_bytes: len_bytes,
                available_bytes: limit_bytes.unwrap_or_else(available),
                detail,
            }
        }
        SysError::OutOfBounds { .. } | SysError::InvalidArgument(_) => BackendError::InvalidArgument(e.to_string()),
        SysError::Map { .. } | SysError::Commit { .. } => {
            BackendError::Failed { operation: "host mapping", message: e.to_string() }
        }
        SysError::Psi { .. } => BackendError::Failed { operation: "PSI trigger", message: e.to_string() },
        SysError::Unsupported(operation) => BackendError::Failed { operation, message: e.to_string() },
    }
}

/// Removes `memwarden-<pid>-<n>` files whose daemon is gone (killed without cleanup): their
/// tmpfs pages would otherwise stay allocated until reboot. Returns how many were removed.
pub fn remove_stale_shared_files(dir: &std::path::Path) -> usize {
    remove_shared_files_where(dir, |pid| !process_alive(pid))
}

/// Removes the `memwarden-<pid>-<n>` files of daemon `pid` (this one, as it exits).
pub fn remove_shared_files_of(dir: &std::path::Path, pid: u32) -> usize {
    remove_shared_files_where(dir, |p| p == pid)
}

fn remove_shared_files_where(dir: &std::path::Path, remove: impl Fn(u32) -> bool) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("memwarden-")) else { continue };
        let Some(pid) = rest.split_once('-').and_then(|(p, _)| p.parse::<u32>().ok()) else { continue };
        if remove(pid) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A process that exists and has not exited: a zombie (exited, not yet reaped by its parent)
/// holds no mappings, so its files are stale too.
pub fn process_alive(pid: u32) -> bool {
    memwarden_sys::process::alive(pid)
}

impl HostBackend {
    /// Anonymous blocks, pinned with `mlock`.
    pub fn new(reader: HostStatusReader) -> Self {
        let name = memwarden_sys::status::cpu_model().unwrap_or_else(|| "host memory".into());
        HostBackend {
            info: DeviceInfo {
                device_id: DeviceId::Cpu,
                device_type: "CPU",
                name,
                memory_type: "RAM",
                gpu: None,
                extra: Default::default(),
            },
            reader,
            shared_dir: None,
            shared_group: None,
            cuda: None,
        }
    }

    /// Blocks backed by files in `dir` (a tmpfs such as /dev/shm), so allocations can be
    /// exported to other processes by path. A block whose file cannot be made falls back to
    /// anonymous memory (and cannot be exported).
    /// Exported host memory readable and writable by `gid` too: each shared file gets that group
    /// and mode 0660 (the daemon's user only, 0600, without one).
    pub fn with_shared_group(mut self, gid: Option<u32>) -> Self {
        self.shared_group = gid;
        self
    }

    pub fn with_shared_dir(mut self, dir: Option<PathBuf>) -> Self {
        if let Some(d) = &dir {
            let removed = remove_stale_shared_files(d);
            if removed > 0 {
                tracing::warn!(dir = %d.display(), files = removed, "removed shared blocks left by daemons that died");
            }
        }
        self.shared_dir = dir;
        self
    }

    /// The host's pressure signals, sharing this backend's status reader (whether a cgroup limit
    /// applies is what its last reading found).
    pub fn signals(&self) -> Arc<dyn HostSignals> {
        Arc::new(self.reader.clone())
    }

    /// Pinned blocks are registered with CUDA (`cuMemHostRegister`, portable) instead of
    /// `mlock`ed, so GPU copies from and to them run at pinned speed.
    pub fn with_cuda(mut self, ctx: Option<Arc<CudaContext>>) -> Self {
        self.cuda = ctx;
        self
    }

    fn map(&self, size_bytes: u64, lock: bool) -> Result<HostMapping, SysError> {
        if let Some(dir) = &self.shared_dir {
            match HostMapping::new_shared(size_bytes, HOST_BLOCK_ALIGNMENT_BYTES, lock, dir) {
                Ok(m) => return Ok(m),
                Err(e) if e.is_out_of_memory() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, dir = %dir.display(), "shared host block unavailable; using anonymous memory")
                }
            }
        }
        HostMapping::new(size_bytes, HOST_BLOCK_ALIGNMENT_BYTES, lock)
    }
}

impl Backend for HostBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn kinds(&self) -> &[MemoryKind] {
        &[MemoryKind::Host, MemoryKind::Pinned]
    }

    fn read_status(&self) -> Result<MemoryReading, BackendError> {
        self.reader
            .read()
            .map_err(|e| BackendError::Failed { operation: "reading host memory status", message: e.to_string() })
    }

    fn refresh(&self) {
        self.reader.forget_per_cpu_free();
    }

    /// Files in `host.shared_memory_dir` (a tmpfs), when it is set.
    fn dedicated(&self) -> Result<Arc<dyn DedicatedMemory>, DedicatedError> {
        match &self.shared_dir {
            Some(dir) => Ok(Arc::new(HostDedicated::new(dir.clone()))),
            None => Err(DedicatedError::Unsupported {
                device: DeviceId::Cpu,
                reason: "host.shared_memory_dir is unset".into(),
            }),
        }
    }

    fn max_alignment_bytes(&self) -> u64 {
        HOST_BLOCK_ALIGNMENT_BYTES
    }

    fn kind_limit_bytes(&self, kind: MemoryKind) -> Option<u64> {
        match kind {
            MemoryKind::Pinned if !memwarden_sys::status::has_cap_ipc_lock() => memwarden_sys::memlock_limit_bytes(),
            _ => None,
        }
    }

    fn kind_limit_name(&self, _: MemoryKind) -> &'static str {
        "RLIMIT_MEMLOCK"
    }

    fn create_block(&self, kind: MemoryKind, size_bytes: u64) -> Result<Box<dyn BlockMemory>, BackendError> {
        let (lock, register) = match kind {
            MemoryKind::Host => (false, None),
            MemoryKind::Pinned => (self.cuda.is_none(), self.cuda.as_ref()),
            _ => return Err(BackendError::UnsupportedKind { device: DeviceId::Cpu, kind }),
        };
        let mut mapping = self.map(size_bytes, lock).map_err(|e| sys_error(e, self, kind))?;
        if let (Some(gid), Some(path)) = (self.shared_group, mapping.shared_path()) {
            memwarden_sys::fs::set_group(path, gid).and_then(|()| memwarden_sys::fs::set_mode(path, 0o660)).map_err(
                |e| BackendError::Failed {
                    operation: "giving a shared block its group",
                    message: format!("{} to gid {gid}: {e}", path.display()),
                },
            )?;
        }
        if let Some(ctx) = register {
            mapping.register_cuda(ctx).map_err(|e| match e {
                CudaError::OutOfMemory { bytes, .. } => BackendError::OutOfMemory {
                    requested_bytes: bytes,
                    available_bytes: self.read_status().map(|r| r.available_bytes).unwrap_or(0),
                    detail: "cuMemHostRegister could not pin the memory".into(),
                },
                other => BackendError::Failed { operation: "cuMemHostRegister", message: other.to_string() },
            })?;
        }
        Ok(Box::new(HostBlock { mapping, kind }))
    }

    fn copy(
        &self,
        src: &dyn BlockMemory,
        src_offset: u64,
        dst: &dyn BlockMemory,
        dst_offset: u64,
        len_bytes: u64,
    ) -> Result<(), BackendError> {
        HostMapping::copy(mapping(src)?, src_offset, mapping(dst)?, dst_offset, len_bytes)
            .map_err(|e| BackendError::InvalidArgument(e.to_string()))
    }

    fn write(&self, block: &dyn BlockMemory, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        mapping(block)?;
        block.write(offset, data)
    }

    fn read(&self, block: &dyn BlockMemory, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        mapping(block)?;
        block.read(offset, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_events_count_only_under_a_limit() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/host");
        let limited = HostBackend::new(HostStatusReader::with_root(root.join("cgroup-v1-oom")));
        limited.read_status().expect("status");
        assert_eq!(limited.signals().limit_events(), Some(66 + 1), "failcnt + oom_kill");
        let free = HostBackend::new(HostStatusReader::with_root(root.join("cgroup-v1-unlimited")));
        free.read_status().expect("status");
        assert_eq!(free.signals().limit_events(), None, "no limit: nothing to count");
    }

    #[test]
    fn shared_files_are_the_daemons_alone_unless_a_group_is_configured() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("memwarden-perm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let gid = std::fs::metadata(&dir).expect("dir").gid(); // ours: chown to it needs no privilege
        let file_of = |group: Option<u32>| {
            let b = HostBackend::new(HostStatusReader::default())
                .with_shared_dir(Some(dir.clone()))
                .with_shared_group(group);
            let block = b.create_block(MemoryKind::Host, 2 * MIB).expect("block");
            let entry = std::fs::read_dir(&dir).expect("read").flatten().next().expect("a shared file");
            let meta = entry.metadata().expect("meta");
            drop(block);
            (meta.permissions().mode() & 0o777, meta.gid())
        };
        assert_eq!(file_of(None).0, 0o600);
        assert_eq!(file_of(Some(gid)), (0o660, gid));
        assert_eq!(std::fs::read_dir(&dir).expect("read").count(), 0, "files go with their blocks");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn stale_shared_files_of_dead_daemons_are_removed() {
        let dir = std::env::temp_dir().join(format!("memwarden-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let dead = dir.join("memwarden-4194999-0"); // above PID_MAX_LIMIT (2^22): never alive
        let mine = dir.join(format!("memwarden-{}-7", std::process::id()));
        let other = dir.join("not-ours");
        for f in [&dead, &mine, &other] {
            std::fs::write(f, b"x").expect("write");
        }
        assert_eq!(remove_stale_shared_files(&dir), 1);
        assert!(!dead.exists() && mine.exists() && other.exists());
        // A daemon that exited but was not reaped yet (a zombie) holds nothing either.
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let zombie = dir.join(format!("memwarden-{}-0", child.id()));
        std::fs::write(&zombie, b"x").expect("write");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while process_alive(child.id()) {
            assert!(std::time::Instant::now() < deadline, "the child never exited");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(remove_stale_shared_files(&dir), 1, "the zombie's file");
        assert!(!zombie.exists());
        child.wait().expect("reap");
        // An exiting daemon removes its own files, and only those.
        assert_eq!(remove_shared_files_of(&dir, std::process::id()), 1);
        assert!(!mine.exists() && other.exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn lock_errors_become_insufficient_memory_with_the_limit() {
        let b = HostBackend::new(HostStatusReader::default());
        let e = sys_error(
            SysError::Lock {
                len_bytes: 4096,
                errno: 1,
                message: "Operation not permitted".into(),
                limit_bytes: Some(65536),
            },
            &b,
            MemoryKind::Pinned,
        );
        match e {
            BackendError::OutOfMemory { requested_bytes, available_bytes, detail } => {
                assert_eq!((requested_bytes, available_bytes), (4096, 65536));
                assert!(detail.contains("RLIMIT_MEMLOCK"), "{detail}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
