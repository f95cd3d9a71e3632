//! The CUDA driver API through cudarc's raw bindings (loaded at run time): contexts, device
//! buffers, host-memory registration, copies on a stream, peer access and IPC handles — the
//! calls cudarc's safe layer does not expose. Every call first makes the right context current
//! on the calling thread, because the daemon calls from whatever thread serves the request.

use crate::HostMapping;
use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;
use std::ffi::{c_void, CStr};
use std::sync::Arc;

mod switch;
mod vmm;
pub use switch::{switch, HostPiece, SwitchFailed, SwitchLeft, SwitchTimes};
pub use vmm::{granularity_bytes, CudaStream, Staging, UploadPipeline, VmmAllocation, MAX_PIECES};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    /// No driver library, no device, or cuInit failed: the backend is unavailable.
    #[error("{0}")]
    Unavailable(String),
    #[error("CUDA out of memory: {operation} of {bytes} bytes")]
    OutOfMemory { operation: &'static str, bytes: u64 },
    #[error("{operation} failed: {error}")]
    Driver { operation: &'static str, error: String },
}

impl CudaError {
    fn from_driver(operation: &'static str, bytes: u64, e: DriverError) -> Self {
        if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
            CudaError::OutOfMemory { operation, bytes }
        } else {
            CudaError::Driver { operation, error: describe(&e) }
        }
    }
}

fn describe(e: &DriverError) -> String {
    let name = e.error_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(s) => format!("{name}: {}", s.to_string_lossy()),
        Err(_) => name,
    }
}

fn check(operation: &'static str, bytes: u64, rc: sys::CUresult) -> Result<(), CudaError> {
    rc.result().map_err(|e| CudaError::from_driver(operation, bytes, e))
}

/// Loads the driver library and initialises it. `Unavailable` (never a panic) when there is no
/// library or no device. cudarc panics when the library is missing, so presence is checked
/// first (see STYLE.md: the `dynamic-loading` trap).
pub fn init() -> Result<u32, CudaError> {
    // SAFETY: only tries to dlopen the library names; no other state.
    if !unsafe { sys::is_culib_present() } {
        let library = if cfg!(windows) { "nvcuda.dll" } else { "libcuda.so" };
        return Err(CudaError::Unavailable(format!("the CUDA driver library ({library}) was not found")));
    }
    result::init().map_err(|e| CudaError::Unavailable(format!("cuInit failed: {}", describe(&e))))?;
    let n = result::device::get_count()
        .map_err(|e| CudaError::Unavailable(format!("cuDeviceGetCount: {}", describe(&e))))?;
    Ok(n.max(0) as u32)
}

/// One GPU's primary context and a copy stream on it.
#[derive(Debug)]
pub struct CudaContext {
    ordinal: u32,
    device: sys::CUdevice,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
}

// SAFETY: a CUDA context and stream may be used from any thread once made current there;
// every method does so first (`bind`). The handles are plain driver tokens.
unsafe impl Send for CudaContext {}
// SAFETY: as above; driver calls on one stream from several threads are serialised by the
// driver, and the daemon serialises its own use per device.
unsafe impl Sync for CudaContext {}

impl CudaContext {
    /// Retains the primary context of GPU `ordinal` (after [`init`]).
    pub fn new(ordinal: u32) -> Result<Arc<Self>, CudaError> {
        let device = result::device::get(ordinal as i32).map_err(|e| CudaError::from_driver("cuDeviceGet", 0, e))?;
        // SAFETY: `device` came from cuDeviceGet; the retained context is released in Drop.
        let ctx = unsafe { result::primary_ctx::retain(device) }
            .map_err(|e| CudaError::from_driver("cuDevicePrimaryCtxRetain", 0, e))?;
        // SAFETY: ctx is the live primary context retained above.
        unsafe { result::ctx::set_current(ctx) }.map_err(|e| CudaError::from_driver("cuCtxSetCurrent", 0, e))?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| CudaError::from_driver("cuStreamCreate", 0, e))?;
        Ok(Arc::new(CudaContext { ordinal, device, ctx, stream }))
    }

    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// Makes this context current on the calling thread.
    pub fn bind(&self) -> Result<(), CudaError> {
        // SAFETY: self.ctx is retained for self's lifetime.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(|e| CudaError::from_driver("cuCtxSetCurrent", 0, e))
    }

    pub fn name(&self) -> Result<String, CudaError> {
        result::device::get_name(self.device).map_err(|e| CudaError::from_driver("cuDeviceGetName", 0, e))
    }

    /// The device UUID as nvidia-smi prints it (`GPU-xxxxxxxx-xxxx-…`).
    pub fn uuid(&self) -> Result<String, CudaError> {
        let u = result::device::get_uuid(self.device).map_err(|e| CudaError::from_driver("cuDeviceGetUuid", 0, e))?;
        let b: Vec<u8> = u.bytes.iter().map(|&c| c as u8).collect();
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        Ok(format!("GPU-{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32]))
    }

    pub fn pci_bus_id(&self) -> Result<String, CudaError> {
        let mut buf = [0 as std::ffi::c_char; 32];
        // SAFETY: the buffer holds 32 bytes and its length is passed; device is valid.
        check("cuDeviceGetPCIBusId", 0, unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), 32, self.device) })?;
        // SAFETY: the driver wrote a NUL-terminated string into buf.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
    }

    pub fn compute_capability(&self) -> Result<(i32, i32), CudaError> {
        let attr = |a| {
            // SAFETY: device is valid; the attribute is a plain integer query.
            unsafe { result::device::get_attribute(self.device, a) }
                .map_err(|e| CudaError::from_driver("cuDeviceGetAttribute", 0, e))
        };
        Ok((
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ))
    }

    /// (free, total) bytes from `cuMemGetInfo`.
    pub fn mem_info(&self) -> Result<(u64, u64), CudaError> {
        self.bind()?;
        let (free, total) = result::mem_get_info().map_err(|e| CudaError::from_driver("cuMemGetInfo", 0, e))?;
        Ok((free as u64, total as u64))
    }

    /// Allocates device memory with `cuMemAlloc`.
    pub fn alloc(self: &Arc<Self>, bytes: u64) -> Result<DeviceBuffer, CudaError> {
        self.bind()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: ptr is a valid out-pointer; the context is current.
        check("cuMemAlloc", bytes, unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes as usize) })?;
        Ok(DeviceBuffer { ctx: self.clone(), ptr, len: bytes })
    }

    /// Whether this GPU can map `peer`'s memory directly.
    pub fn can_access_peer(&self, peer: &CudaContext) -> bool {
        let mut can = 0;
        // SAFETY: both devices are valid; `can` is a valid out-pointer.
        let rc = unsafe { sys::cuDeviceCanAccessPeer(&mut can, self.device, peer.device) };
        rc.result().is_ok() && can == 1
    }

    /// Enables access from this context to `peer`'s memory (idempotent).
    pub fn enable_peer_access(&self, peer: &CudaContext) -> Result<(), CudaError> {
        self.bind()?;
        // SAFETY: peer.ctx is a live context; flags must be 0.
        let rc = unsafe { sys::cuCtxEnablePeerAccess(peer.ctx, 0) };
        match rc.result() {
            Ok(()) => Ok(()),
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(()),
            Err(e) => Err(CudaError::from_driver("cuCtxEnablePeerAccess", 0, e)),
        }
    }

    /// Waits for every copy queued on this context's stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.bind()?;
        // SAFETY: the stream is live for self's lifetime.
        check("cuStreamSynchronize", 0, unsafe { sys::cuStreamSynchronize(self.stream) })
    }

    /// The one driver copy: `len` bytes from `src` to `dst` on this context's stream, waiting
    /// for the copy unless `completion` is [`Completion::Queue`]. With `peer`, `dst` belongs to
    /// that other GPU's context and `src` to this one (`cuMemcpyPeerAsync`: direct over
    /// NVLink/PCIe where peer access is enabled, staged by the driver otherwise); without, both
    /// are unified addresses reachable from this context (`cuMemcpyAsync`).
    ///
    /// # Safety
    /// Both ranges must be live memory of `len` bytes (host memory of this process, or device
    /// memory of the stated contexts) that nothing else writes during the copy; when queued,
    /// they must stay live until the stream is synchronized.
    unsafe fn memcpy(
        &self,
        dst: u64,
        src: u64,
        len: u64,
        peer: Option<&CudaContext>,
        completion: Completion,
    ) -> Result<(), CudaError> {
        self.bind()?;
        // SAFETY: the caller guarantees both ranges are live and unshared for the copy (see
        // above); the stream is live for self's lifetime and this context is now current.
        let rc = unsafe {
            match peer {
                None => sys::cuMemcpyAsync(dst, src, len as usize, self.stream),
                Some(dst_ctx) => sys::cuMemcpyPeerAsync(dst, dst_ctx.ctx, src, self.ctx, len as usize, self.stream),
            }
        };
        check(if peer.is_some() { "cuMemcpyPeerAsync" } else { "cuMemcpyAsync" }, len, rc)?;
        match completion {
            // SAFETY: the stream is live for self's lifetime.
            Completion::Wait => check("cuStreamSynchronize", len, unsafe { sys::cuStreamSynchronize(self.stream) }),
            Completion::Queue => Ok(()),
        }
    }
}

impl Drop for CudaContext {
    fn drop(&mut self) {
        // SAFETY: stream and the primary-context reference were created in `new` and are
        // released once here; errors cannot be returned from Drop and are ignored.
        unsafe {
            let _ = result::ctx::set_current(self.ctx);
            let _ = result::stream::destroy(self.stream);
            let _ = result::primary_ctx::release(self.device);
        }
    }
}

/// Device memory from `cuMemAlloc`, freed on drop.
#[derive(Debug)]
pub struct DeviceBuffer {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    len: u64,
}

impl DeviceBuffer {
    pub fn address(&self) -> u64 {
        self.ptr
    }

    pub fn len_bytes(&self) -> u64 {
        self.len
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), CudaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(CudaError::Driver {
                operation: "bounds check",
                error: format!("range {offset}+{len} is outside a buffer of {} bytes", self.len),
            }),
        }
    }

    /// Copies host bytes into the buffer.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), CudaError> {
        self.check_range(offset, data.len() as u64)?;
        // SAFETY: the destination range was bounds-checked inside this live buffer; `data` is
        // a live host slice for the duration of the synchronous copy.
        unsafe { self.ctx.memcpy(self.ptr + offset, data.as_ptr() as u64, data.len() as u64, None, Completion::Wait) }
    }

    /// Copies buffer bytes into `out`.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), CudaError> {
        self.check_range(offset, out.len() as u64)?;
        // SAFETY: as in `write`, with `out` exclusively borrowed.
        unsafe { self.ctx.memcpy(out.as_mut_ptr() as u64, self.ptr + offset, out.len() as u64, None, Completion::Wait) }
    }

    /// A CUDA IPC handle (64 bytes) another process opens with `cuIpcOpenMemHandle` /
    /// `cudaIpcOpenMemHandle`; it maps this whole buffer.
    pub fn ipc_handle(&self) -> Result<[u8; 64], CudaError> {
        self.ctx.bind()?;
        let mut h = sys::CUipcMemHandle_st { reserved: [0; 64] };
        // SAFETY: ptr is the base of a live cuMemAlloc allocation; h is a valid out-pointer.
        check("cuIpcGetMemHandle", self.len, unsafe { sys::cuIpcGetMemHandle(&mut h, self.ptr) })?;
        Ok(h.reserved.map(|c| c as u8))
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: ptr came from cuMemAlloc in this context and is freed once here.
        unsafe {
            let _ = self.ctx.bind();
            let _ = sys::cuMemFree_v2(self.ptr);
        }
    }
}

/// Host memory page-locked and registered with CUDA (`cuMemHostRegister`, portable, not
/// write-combined), so GPU copies from and to it run at pinned speed. Unregistered on drop.
#[derive(Debug)]
pub struct HostRegistration {
    ptr: u64,
}

// SAFETY: only the address is held, to unregister it.
unsafe impl Send for HostRegistration {}
// SAFETY: as above.
unsafe impl Sync for HostRegistration {}

impl HostRegistration {
    /// Registers `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The range must be a live mapping of this process that outlives the registration.
    pub unsafe fn new(ctx: &CudaContext, ptr: u64, len: u64) -> Result<Self, CudaError> {
        ctx.bind()?;
        check(
            "cuMemHostRegister",
            len,
            sys::cuMemHostRegister_v2(ptr as *mut c_void, len as usize, sys::CU_MEMHOSTREGISTER_PORTABLE),
        )?;
        Ok(HostRegistration { ptr })
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        // SAFETY: ptr was registered in `new`; unregistering needs no context of its own.
        unsafe {
            let _ = sys::cuMemHostUnregister(self.ptr as *mut c_void);
        }
    }
}

fn bounds(e: crate::SysError) -> CudaError {
    CudaError::Driver { operation: "bounds check", error: e.to_string() }
}

/// Where one side of a [`copy`] starts: an offset into a host mapping or a device buffer. The
/// copy's length gives the range.
#[derive(Debug, Clone, Copy)]
pub enum Region<'a> {
    Host(&'a HostMapping, u64),
    Device(&'a DeviceBuffer, u64),
}

impl Region<'_> {
    /// The unified address of `len` bytes at this region, once they are checked to lie inside it.
    fn checked_address(self, len: u64) -> Result<u64, CudaError> {
        match self {
            Region::Host(m, offset) => m.check(offset, len).map(|o| m.address() + o as u64).map_err(bounds),
            Region::Device(b, offset) => b.check_range(offset, len).map(|()| b.ptr + offset),
        }
    }
}

/// Whether a [`copy`] returns once the bytes have arrived or as soon as the copy is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Return once the bytes have arrived.
    Wait,
    /// A copy between two buffers of one GPU is queued on its stream (in order with earlier
    /// queued copies) and may still run after the call; the caller synchronizes the context
    /// ([`CudaContext::synchronize`]) before anyone reads the destination, and keeps both
    /// buffers alive until then (the pool holds them). Every other copy waits as with `Wait`.
    Queue,
}

/// Copies `len` bytes from `src` to `dst`: host to device (pinned speed when the host range is
/// registered), device to host, or between device buffers of one GPU or of two (peer copy).
/// Both ranges are bounds-checked before any byte moves. Host to host needs no driver and is
/// [`HostMapping::copy`]'s (`memmove`); it is done that way here too. Overlapping ranges in one
/// device buffer are the caller's to avoid (the pool never hands out overlapping allocations).
pub fn copy(dst: Region<'_>, src: Region<'_>, len: u64, completion: Completion) -> Result<(), CudaError> {
    // The copy runs on the source GPU's context, or the destination's when the source is host
    // memory; a copy between two GPUs is a peer copy, and only one within a GPU may be queued.
    let (ctx, peer, completion) = match (src, dst) {
        (Region::Host(s, s_off), Region::Host(d, d_off)) => {
            return HostMapping::copy(s, s_off, d, d_off, len).map_err(bounds);
        }
        (Region::Device(s, _), Region::Device(d, _)) if d.ctx.ordinal != s.ctx.ordinal => {
            (&s.ctx, Some(&*d.ctx), Completion::Wait)
        }
        (Region::Device(s, _), Region::Device(..)) => (&s.ctx, None, completion),
        (Region::Device(s, _), Region::Host(..)) => (&s.ctx, None, Completion::Wait),
        (Region::Host(..), Region::Device(d, _)) => (&d.ctx, None, Completion::Wait),
    };
    // Device ranges are checked before host ranges, the destination's first.
    let (dst_addr, src_addr) = if let Region::Host(..) = dst {
        let src_addr = src.checked_address(len)?;
        (dst.checked_address(len)?, src_addr)
    } else {
        (dst.checked_address(len)?, src.checked_address(len)?)
    };
    // SAFETY: both ranges were bounds-checked inside live memory that `dst` and `src` borrow
    // for this call; the device ranges belong to `ctx` (and, for a peer copy, `peer`). Only a
    // copy between two buffers of one GPU may outlive the call (`Completion::Queue`), and its
    // caller keeps both buffers alive until it synchronizes the stream, as documented there.
    unsafe { ctx.memcpy(dst_addr, src_addr, len, peer, completion) }
}
