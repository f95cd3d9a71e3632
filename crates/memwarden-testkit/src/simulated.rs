//! [`SimulatedBackend`]: one device that tests and examples build to taste instead of writing a
//! backend of their own. It can
//!
//! - hold its bytes itself ([`SimulatedBackend::new`]: a GPU of an API with no copy fast path,
//!   so copies to and from it are staged through host memory with its blocks' own `read` and
//!   `write`, [`STAGING_CHUNK_BYTES`](memwarden_backends::copy::STAGING_CHUNK_BYTES) at a time)
//!   or keep them in real host memory under another device id
//!   ([`SimulatedBackend::host_memory`]: copies are real `memcpy`s, so moves take real time);
//! - have a capacity: a fixed total, memory other processes use, and the blocks alive now, as the
//!   driver would report them; a block that does not fit is refused with `OutOfMemory`;
//! - fail on demand (block creation, every operation with a given error, writes after a number
//!   of bytes, the next copy with an error or a panic): a driver error (`Failed`) is kept as the
//!   device's fault, as the CUDA backend keeps its own;
//! - copy slowly: copies can be held at a gate until a test opens it, or take a fixed delay.
//!
//! Everything a test switches or reads at run time is on its [`Controls`], shared with the backend
//! and its blocks ([`SimulatedBackend::controls`]).

use memwarden_backends::{
    copy_between, Backend, BackendError, BlockExport, BlockMemory, DeviceInfo, HostBackend, HostStatusReader,
    MemoryReading,
};
use memwarden_core::units::{GIB, MIB};
use memwarden_core::{DeviceId, MemoryKind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The operation named in an injected driver error (a staged write, a block creation).
pub const INJECTED_WRITE_OPERATION: &str = "vkCmdCopyBuffer";
/// The operation named when block creation is failed on demand.
pub const INJECTED_CREATE_OPERATION: &str = "vkAllocateMemory";
/// The message of every injected driver error.
pub const INJECTED: &str = "VK_ERROR_DEVICE_LOST (injected)";

/// How the next copy fails ([`Controls::fail_next_copy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFault {
    /// `InvalidArgument("bounds check (injected)")`.
    Error,
    /// The copy panics (a bug in a backend, as the caller sees it).
    Panic,
}

const NO_COPY_FAULT: u8 = 0;
const COPY_FAULT_ERROR: u8 = 1;
const COPY_FAULT_PANIC: u8 = 2;

/// Switches and counters shared by a [`SimulatedBackend`] and its blocks.
#[derive(Debug)]
pub struct Controls {
    fail_create: AtomicBool,
    fail_all: Mutex<Option<BackendError>>,
    fail_write_after_bytes: AtomicU64,
    fail_next_copy: AtomicU8,
    gate_shut: Mutex<bool>,
    gate_opened: Condvar,
    copy_delay_us: AtomicU64,
    written_bytes: AtomicU64,
    live_bytes: AtomicU64,
    live_blocks: AtomicU64,
    copies_started: AtomicU64,
    fault: Mutex<Option<String>>,
}

impl Default for Controls {
    fn default() -> Self {
        Controls {
            fail_create: AtomicBool::new(false),
            fail_all: Mutex::new(None),
            fail_write_after_bytes: AtomicU64::new(u64::MAX),
            fail_next_copy: AtomicU8::new(NO_COPY_FAULT),
            gate_shut: Mutex::new(false),
            gate_opened: Condvar::new(),
            copy_delay_us: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            live_bytes: AtomicU64::new(0),
            live_blocks: AtomicU64::new(0),
            copies_started: AtomicU64::new(0),
            fault: Mutex::new(None),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Controls {
    /// Block creation fails with a driver error (`vkAllocateMemory`, [`INJECTED`]) while `on`.
    pub fn fail_create(&self, on: bool) {
        self.fail_create.store(on, Ordering::SeqCst);
    }

    /// Every operation (create, copy, read, write) fails with `error` until `None` is set.
    pub fn fail_everything_with(&self, error: Option<BackendError>) {
        *lock(&self.fail_all) = error;
    }

    /// Writes into the device's blocks fail (`vkCmdCopyBuffer`, [`INJECTED`]) once this many
    /// bytes have been written in total; `u64::MAX` (the default) never.
    pub fn fail_writes_after(&self, bytes: u64) {
        self.fail_write_after_bytes.store(bytes, Ordering::SeqCst);
    }

    /// The next copy through the backend fails this way; the one after it runs again.
    pub fn fail_next_copy(&self, fault: CopyFault) {
        let code = match fault {
            CopyFault::Error => COPY_FAULT_ERROR,
            CopyFault::Panic => COPY_FAULT_PANIC,
        };
        self.fail_next_copy.store(code, Ordering::SeqCst);
    }

    /// Shuts the gate (`true`): copies through the backend wait at it until it opens again.
    pub fn hold_copies(&self, shut: bool) {
        *lock(&self.gate_shut) = shut;
        self.gate_opened.notify_all();
    }

    /// Every copy through the backend takes at least this long.
    pub fn set_copy_delay(&self, delay: Duration) {
        self.copy_delay_us.store(delay.as_micros().min(u64::MAX as u128) as u64, Ordering::SeqCst);
    }

    /// Copies through the backend that reached the gate (failed ones do not count).
    pub fn copies_started(&self) -> u64 {
        self.copies_started.load(Ordering::SeqCst)
    }

    /// Bytes written into the device's blocks so far, refused ones included.
    pub fn written_bytes(&self) -> u64 {
        self.written_bytes.load(Ordering::SeqCst)
    }

    /// Bytes of the blocks alive now: what the "driver" says is in use by this process.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes.load(Ordering::SeqCst)
    }

    /// Blocks alive now.
    pub fn live_blocks(&self) -> u64 {
        self.live_blocks.load(Ordering::SeqCst)
    }

    /// The last driver error injected, as the device's fault.
    pub fn fault(&self) -> Option<String> {
        lock(&self.fault).clone()
    }

    /// The error every operation fails with now, if any (a driver error becomes the fault).
    fn failing(&self) -> Result<(), BackendError> {
        match lock(&self.fail_all).clone() {
            Some(e) => Err(self.record(e)),
            None => Ok(()),
        }
    }

    fn record(&self, e: BackendError) -> BackendError {
        if let BackendError::Failed { message, .. } = &e {
            *lock(&self.fault) = Some(message.clone());
        }
        e
    }

    fn injected(&self, operation: &'static str) -> BackendError {
        self.record(BackendError::Failed { operation, message: INJECTED.into() })
    }

    /// Counts `len` bytes written; refuses them past the limit.
    fn count_write(&self, len: u64) -> Result<(), BackendError> {
        let before = self.written_bytes.fetch_add(len, Ordering::SeqCst);
        if before.saturating_add(len) > self.fail_write_after_bytes.load(Ordering::SeqCst) {
            return Err(self.injected(INJECTED_WRITE_OPERATION));
        }
        Ok(())
    }

    /// What a copy does before it moves a byte: an injected failure, the gate, the delay.
    fn before_copy(&self) -> Result<(), BackendError> {
        match self.fail_next_copy.swap(NO_COPY_FAULT, Ordering::SeqCst) {
            COPY_FAULT_ERROR => return Err(BackendError::InvalidArgument("bounds check (injected)".into())),
            COPY_FAULT_PANIC => panic!("a copy panicked (injected)"),
            _ => {}
        }
        self.copies_started.fetch_add(1, Ordering::SeqCst);
        let mut shut = lock(&self.gate_shut);
        while *shut {
            shut = self.gate_opened.wait(shut).unwrap_or_else(|e| e.into_inner());
        }
        drop(shut);
        let delay = self.copy_delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_micros(delay));
        }
        Ok(())
    }
}

/// Where a simulated device keeps its bytes.
enum Memory {
    /// In blocks of its own (plain vectors): no fast path to or from any other device.
    Own,
    /// In real host memory (the host backend's blocks): copies are `memcpy`s.
    Host(Box<HostBackend>),
}

/// A device for tests: see the [module documentation](self).
pub struct SimulatedBackend {
    info: DeviceInfo,
    memory: Memory,
    kinds: Vec<MemoryKind>,
    /// Total memory; `None` reads the machine's (host memory only).
    capacity_bytes: Option<u64>,
    used_elsewhere_bytes: u64,
    alignment_bytes: u64,
    controls: Arc<Controls>,
}

impl SimulatedBackend {
    /// A GPU named `simulated` at `device_id` holding its bytes itself: 4 GiB, nothing used by
    /// other processes, 2 MiB alignment, `Device` memory.
    pub fn new(device_id: DeviceId) -> Self {
        SimulatedBackend {
            info: DeviceInfo {
                device_id,
                device_type: "GPU",
                name: "simulated".into(),
                memory_type: "VRAM",
                gpu: None,
                extra: Default::default(),
            },
            memory: Memory::Own,
            kinds: vec![MemoryKind::Device],
            capacity_bytes: Some(4 * GIB),
            used_elsewhere_bytes: 0,
            alignment_bytes: 2 * MIB,
            controls: Arc::default(),
        }
    }

    /// A GPU at `device_id` whose bytes are real host memory (the host backend's blocks, status
    /// and alignment): its copies are real `memcpy`s.
    pub fn host_memory(device_id: DeviceId) -> Self {
        let host = HostBackend::new(HostStatusReader::default());
        SimulatedBackend {
            alignment_bytes: host.max_alignment_bytes(),
            capacity_bytes: None,
            memory: Memory::Host(Box::new(host)),
            ..SimulatedBackend::new(device_id)
        }
    }

    /// The device's name in its status.
    pub fn named(mut self, name: &str) -> Self {
        self.info.name = name.into();
        self
    }

    /// Total memory, as the driver would report it (host memory too: then the machine's total is
    /// no longer read).
    pub fn with_capacity(mut self, total_bytes: u64) -> Self {
        self.capacity_bytes = Some(total_bytes);
        self
    }

    /// Memory other processes hold on the device: counted as used, never available.
    pub fn with_used_elsewhere(mut self, bytes: u64) -> Self {
        self.used_elsewhere_bytes = bytes;
        self
    }

    /// The switches and counters, shared with the backend once it is built.
    pub fn controls(&self) -> Arc<Controls> {
        self.controls.clone()
    }

    fn capacity_left(&self) -> Option<u64> {
        let total = self.capacity_bytes?;
        Some(total.saturating_sub(self.used_elsewhere_bytes).saturating_sub(self.controls.live_bytes()))
    }
}

impl Backend for SimulatedBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn fault(&self) -> Option<String> {
        self.controls.fault()
    }

    fn kinds(&self) -> &[MemoryKind] {
        &self.kinds
    }

    fn read_status(&self) -> Result<MemoryReading, BackendError> {
        match (self.capacity_bytes, &self.memory) {
            (None, Memory::Host(host)) => host.read_status(),
            (capacity, _) => {
                let total = capacity.unwrap_or(4 * GIB);
                let used = (self.used_elsewhere_bytes + self.controls.live_bytes()).min(total);
                Ok(MemoryReading {
                    total_bytes: total,
                    available_bytes: total - used,
                    used_bytes: used,
                    source: "simulated".into(),
                    reserved_bytes: None,
                    processes: vec![],
                })
            }
        }
    }

    fn max_alignment_bytes(&self) -> u64 {
        self.alignment_bytes
    }

    fn create_block(&self, kind: MemoryKind, size_bytes: u64) -> Result<Box<dyn BlockMemory>, BackendError> {
        self.controls.failing()?;
        if !self.kinds.contains(&kind) {
            return Err(BackendError::UnsupportedKind { device: self.info.device_id, kind });
        }
        if self.controls.fail_create.load(Ordering::SeqCst) {
            return Err(self.controls.injected(INJECTED_CREATE_OPERATION));
        }
        if let Some(left) = self.capacity_left() {
            if size_bytes > left {
                return Err(BackendError::OutOfMemory {
                    requested_bytes: size_bytes,
                    available_bytes: left,
                    detail: format!("{} is full (simulated)", self.info.device_id),
                });
            }
        }
        let inner = match &self.memory {
            Memory::Own => Inner::Own { bytes: Mutex::new(vec![0; size_bytes as usize]), address: next_address() },
            Memory::Host(host) => Inner::Host(host.create_block(MemoryKind::Host, size_bytes)?),
        };
        let block = SimulatedBlock { inner, kind, location: self.info.device_id, controls: self.controls.clone() };
        self.controls.live_bytes.fetch_add(block.size_bytes(), Ordering::SeqCst);
        self.controls.live_blocks.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(block))
    }

    fn copy(
        &self,
        src: &dyn BlockMemory,
        src_offset: u64,
        dst: &dyn BlockMemory,
        dst_offset: u64,
        len_bytes: u64,
    ) -> Result<(), BackendError> {
        self.controls.failing()?;
        self.controls.before_copy()?;
        match &self.memory {
            Memory::Host(host) => host.copy(src, src_offset, dst, dst_offset, len_bytes),
            Memory::Own => copy_between(src, src_offset, dst, dst_offset, len_bytes),
        }
    }

    fn write(&self, block: &dyn BlockMemory, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.controls.failing()?;
        block.write(offset, data)
    }

    fn read(&self, block: &dyn BlockMemory, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        self.controls.failing()?;
        block.read(offset, out)
    }
}

/// Distinct, aligned (4 GiB) and never-zero addresses for blocks held in vectors.
fn next_address() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed) << 32
}

#[derive(Debug)]
enum Inner {
    Own {
        bytes: Mutex<Vec<u8>>,
        address: u64,
    },
    /// A host backend's block: its `as_any` is the host block's, so host copies find it.
    Host(Box<dyn BlockMemory>),
}

/// A block of a [`SimulatedBackend`]: counted alive until dropped.
#[derive(Debug)]
struct SimulatedBlock {
    inner: Inner,
    kind: MemoryKind,
    location: DeviceId,
    controls: Arc<Controls>,
}

fn out_of_bounds(offset: u64, len: usize, size: u64) -> BackendError {
    BackendError::InvalidArgument(format!("range {offset}+{len} is outside the block of {size} bytes"))
}

impl BlockMemory for SimulatedBlock {
    fn address(&self) -> u64 {
        match &self.inner {
            Inner::Own { address, .. } => *address,
            Inner::Host(b) => b.address(),
        }
    }

    fn size_bytes(&self) -> u64 {
        match &self.inner {
            Inner::Own { bytes, .. } => lock(bytes).len() as u64,
            Inner::Host(b) => b.size_bytes(),
        }
    }

    fn kind(&self) -> MemoryKind {
        self.kind
    }

    fn location(&self) -> DeviceId {
        match &self.inner {
            Inner::Own { .. } => self.location,
            Inner::Host(b) => b.location(),
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        match &self.inner {
            Inner::Own { .. } => self,
            Inner::Host(b) => b.as_any(),
        }
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        match &self.inner {
            Inner::Own { bytes, .. } => {
                let b = lock(bytes);
                let range = range(offset, out.len(), b.len())
                    .ok_or_else(|| out_of_bounds(offset, out.len(), b.len() as u64))?;
                out.copy_from_slice(&b[range]);
                Ok(())
            }
            Inner::Host(b) => b.read(offset, out),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.controls.count_write(data.len() as u64)?;
        match &self.inner {
            Inner::Own { bytes, .. } => {
                let mut b = lock(bytes);
                let len = b.len();
                let range =
                    range(offset, data.len(), len).ok_or_else(|| out_of_bounds(offset, data.len(), len as u64))?;
                b[range].copy_from_slice(data);
                Ok(())
            }
            Inner::Host(b) => b.write(offset, data),
        }
    }

    fn export(&self) -> Result<BlockExport, BackendError> {
        match &self.inner {
            Inner::Own { .. } => {
                Err(BackendError::InvalidArgument(format!("{} blocks of this backend cannot be shared", self.kind)))
            }
            Inner::Host(b) => b.export(),
        }
    }
}

/// `offset..offset + len` when it lies within `size`.
fn range(offset: u64, len: usize, size: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(len)?;
    (end <= size).then_some(start..end)
}

impl Drop for SimulatedBlock {
    fn drop(&mut self) {
        self.controls.live_bytes.fetch_sub(self.size_bytes(), Ordering::SeqCst);
        self.controls.live_blocks.fetch_sub(1, Ordering::SeqCst);
    }
}
