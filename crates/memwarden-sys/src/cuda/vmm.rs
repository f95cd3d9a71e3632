//! CUDA virtual memory management (VMM) for model weights: a model's memory is one reserved
//! address range backed by a few physical allocations (pieces, `cuMemCreate`), mapped back to
//! back. Other processes import each piece through a POSIX file descriptor
//! (`cuMemExportToShareableHandle`) and map them at addresses they reserve themselves, so a
//! holder can unmap the model while it is parked and map the next pieces at the same address.
//! Pieces are what lets a switch overlap its two copies ([`super::switch`]): each piece the
//! outgoing model's copy-out frees is mapped into the incoming model's range and filled at once.
//! The daemon maps each allocation in its own address space too, to copy into and out of it.

use super::{check, CudaContext, CudaError};
use crate::HostMapping;
use crate::SharedHandle;
use cudarc::driver::sys;
use std::ffi::c_void;
use std::sync::Arc;

pub(super) fn prop(ordinal: u32) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        location: sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: ordinal as i32 },
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

/// The size VMM allocations on this GPU are rounded up to (the driver's recommended
/// granularity, 2 MiB on current GPUs).
pub fn granularity_bytes(ctx: &CudaContext) -> Result<u64, CudaError> {
    ctx.bind()?;
    let p = prop(ctx.ordinal);
    let mut g: usize = 0;
    // SAFETY: `p` is a fully initialised property struct and `g` a valid out-pointer.
    check("cuMemGetAllocationGranularity", 0, unsafe {
        sys::cuMemGetAllocationGranularity(
            &mut g,
            &p,
            sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
        )
    })?;
    Ok(g.max(1) as u64)
}

/// At most this many pieces back one allocation: each is one descriptor in a grant, and a
/// protocol line carries at most 16 (`MAX_FDS_PER_LINE`).
pub const MAX_PIECES: usize = 16;

/// Pieces a fresh allocation is cut into (a switch may add one: see [`super::switch`]).
const FRESH_PIECES: u64 = 12;

/// Below this, an allocation is one piece: smaller pieces would only add mapping calls.
const MIN_PIECE_BYTES: u64 = 64 << 20;

/// The sizes of a fresh allocation's pieces for `size` bytes (a multiple of `g`): equal
/// pieces of at least [`MIN_PIECE_BYTES`], the last one shorter.
pub(super) fn piece_sizes(size: u64, g: u64) -> Vec<u64> {
    let each = size.div_ceil(FRESH_PIECES).div_ceil(g).max(1) * g;
    let each = each.max(MIN_PIECE_BYTES.div_ceil(g) * g);
    let mut out = Vec::new();
    let mut left = size;
    while left > 0 {
        let n = each.min(left);
        out.push(n);
        left -= n;
    }
    out
}

/// One physical allocation mapped at `offset` of its allocation's range.
#[derive(Debug)]
pub(super) struct Piece {
    pub(super) offset: u64,
    pub(super) size: u64,
    pub(super) handle: sys::CUmemGenericAllocationHandle,
}

/// One exportable device allocation, mapped read-write in this process. Unmapped, its address
/// range freed and its handles released on drop; the memory goes back to the driver once no
/// other process maps it either.
#[derive(Debug)]
pub struct VmmAllocation {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) ptr: sys::CUdeviceptr,
    pub(super) size: u64,
    /// In address order, covering `[0, size)` once built.
    pub(super) pieces: Vec<Piece>,
}

// SAFETY: the handles and address are plain driver tokens; every call binds the context first.
unsafe impl Send for VmmAllocation {}
// SAFETY: as above; copies into disjoint ranges from several threads are the caller's to keep
// disjoint (the weights loader hands each thread its own ranges).
unsafe impl Sync for VmmAllocation {}

/// Creates one physical allocation of `size` bytes on `ctx`'s GPU.
pub(super) fn create_handle(ctx: &CudaContext, size: u64) -> Result<sys::CUmemGenericAllocationHandle, CudaError> {
    let p = prop(ctx.ordinal);
    let mut handle: sys::CUmemGenericAllocationHandle = 0;
    // SAFETY: valid out-pointer and property struct; the caller made the context current.
    check("cuMemCreate", size, unsafe { sys::cuMemCreate(&mut handle, size as usize, &p, 0) })?;
    Ok(handle)
}

/// Maps `handle` (`size` bytes) read-write at `ptr` for `ctx`'s GPU.
///
/// # Safety
/// `[ptr, ptr+size)` lies inside a reservation of the caller's, with nothing mapped there, and
/// `handle` is a live allocation of `size` bytes.
pub(super) unsafe fn map_handle(
    ctx: &CudaContext,
    ptr: sys::CUdeviceptr,
    size: u64,
    handle: sys::CUmemGenericAllocationHandle,
) -> Result<(), CudaError> {
    // SAFETY: the caller's contract.
    check("cuMemMap", size, unsafe { sys::cuMemMap(ptr, size as usize, 0, handle, 0) })?;
    let access = sys::CUmemAccessDesc {
        location: prop(ctx.ordinal).location,
        flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    // SAFETY: the range was just mapped; one access descriptor is passed.
    let rc = unsafe { sys::cuMemSetAccess(ptr, size as usize, &access, 1) };
    if let Err(e) = check("cuMemSetAccess", size, rc) {
        // SAFETY: mapped just above, by this call.
        unsafe { sys::cuMemUnmap(ptr, size as usize) };
        return Err(e);
    }
    Ok(())
}

/// Reserves `size` bytes of device addresses, aligned to `g`.
pub(super) fn reserve(size: u64, g: u64) -> Result<sys::CUdeviceptr, CudaError> {
    let mut ptr: sys::CUdeviceptr = 0;
    // SAFETY: valid out-pointer; a fresh reservation anywhere, aligned to the granularity.
    check("cuMemAddressReserve", size, unsafe { sys::cuMemAddressReserve(&mut ptr, size as usize, g as usize, 0, 0) })?;
    Ok(ptr)
}

impl VmmAllocation {
    /// Creates at least `bytes` (rounded up to the granularity) on `ctx`'s GPU, in a few pieces,
    /// and maps them.
    pub fn new(ctx: &Arc<CudaContext>, bytes: u64) -> Result<Self, CudaError> {
        let g = granularity_bytes(ctx)?;
        let size = bytes.max(1).div_ceil(g) * g;
        let ptr = reserve(size, g)?;
        // From here on, Drop undoes what was built: the pieces mapped so far and the range.
        let mut alloc = VmmAllocation { ctx: ctx.clone(), ptr, size, pieces: Vec::new() };
        let mut offset = 0;
        for n in piece_sizes(size, g) {
            alloc.add_piece(offset, n, create_handle(ctx, n)?)?;
            offset += n;
        }
        Ok(alloc)
    }

    /// Maps `handle` at `offset` and owns it from now on (released here if the map fails).
    pub(super) fn add_piece(
        &mut self,
        offset: u64,
        size: u64,
        handle: sys::CUmemGenericAllocationHandle,
    ) -> Result<(), CudaError> {
        let fits = offset.checked_add(size).is_some_and(|end| end <= self.size);
        // SAFETY: in bounds (checked) and nothing is mapped there: pieces are added in address
        // order and never overlap (the callers advance `offset` by each piece's size).
        let mapped = if fits {
            unsafe { map_handle(&self.ctx, self.ptr + offset, size, handle) }
        } else {
            Err(CudaError::Driver {
                operation: "cuMemMap",
                error: format!("piece {offset}+{size} outside {}", self.size),
            })
        };
        if let Err(e) = mapped {
            // SAFETY: the handle is ours and was not mapped.
            unsafe { sys::cuMemRelease(handle) };
            return Err(e);
        }
        self.pieces.push(Piece { offset, size, handle });
        Ok(())
    }

    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The address in this process (for copies; other processes map their own).
    pub fn address(&self) -> u64 {
        self.ptr
    }

    /// `(offset, size)` of each physical piece, in address order.
    pub fn pieces(&self) -> Vec<(u64, u64)> {
        self.pieces.iter().map(|p| (p.offset, p.size)).collect()
    }

    /// A new file descriptor per piece (in address order), which another process imports with
    /// `cuMemImportFromShareableHandle` and maps at its own reservation plus the piece's offset.
    #[cfg(unix)]
    pub fn export_fds(&self) -> Result<Vec<SharedHandle>, CudaError> {
        use std::os::fd::FromRawFd;
        self.ctx.bind()?;
        let mut out = Vec::with_capacity(self.pieces.len());
        for p in &self.pieces {
            let mut fd: std::ffi::c_int = -1;
            // SAFETY: for POSIX file descriptors the out-parameter is an int; the handle is live.
            check("cuMemExportToShareableHandle", p.size, unsafe {
                sys::cuMemExportToShareableHandle(
                    &mut fd as *mut std::ffi::c_int as *mut c_void,
                    p.handle,
                    sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                    0,
                )
            })?;
            // SAFETY: the driver returned a new descriptor that nothing else owns.
            out.push(unsafe { SharedHandle::from_raw_fd(fd) });
        }
        Ok(out)
    }

    /// Windows exports Win32 handles (`CU_MEM_HANDLE_TYPE_WIN32`), which the allocations made
    /// here do not request yet: unsupported until the Windows port.
    #[cfg(windows)]
    pub fn export_fds(&self) -> Result<Vec<SharedHandle>, CudaError> {
        Err(CudaError::Unavailable("exporting CUDA memory is not supported on this platform yet".into()))
    }

    pub(super) fn check_range(&self, offset: u64, len: u64) -> Result<u64, CudaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(self.ptr + offset),
            _ => Err(CudaError::Driver {
                operation: "bounds check",
                error: format!("range {offset}+{len} is outside an allocation of {} bytes", self.size),
            }),
        }
    }

    /// Copies every piece (`(device offset, host mapping, host offset, len)`) device → host on
    /// `stream`, all queued, and returns once they have arrived.
    pub fn copy_to_host(&self, stream: &CudaStream, pieces: &[(u64, &HostMapping, u64, u64)]) -> Result<(), CudaError> {
        self.enqueue_copies(stream, pieces, true)?;
        stream.synchronize()
    }

    /// Copies every piece host → device, like [`VmmAllocation::copy_to_host`].
    pub fn copy_from_host(
        &self,
        stream: &CudaStream,
        pieces: &[(u64, &HostMapping, u64, u64)],
    ) -> Result<(), CudaError> {
        self.enqueue_copies(stream, pieces, false)?;
        stream.synchronize()
    }

    /// Queues the copies of `pieces` on `stream` without waiting. The caller synchronizes the
    /// stream before the host mappings or this allocation can go (on an error too: what was
    /// queued before it still runs).
    pub(super) fn enqueue_copies(
        &self,
        stream: &CudaStream,
        pieces: &[(u64, &HostMapping, u64, u64)],
        to_host: bool,
    ) -> Result<(), CudaError> {
        let mut checked = Vec::with_capacity(pieces.len());
        for &(dev_off, host, host_off, len) in pieces {
            let dev = self.check_range(dev_off, len)?;
            let h = host.check(host_off, len).map_err(super::bounds)? as u64 + host.address();
            checked.push((dev, h, len));
        }
        self.ctx.bind()?;
        for (dev, host, len) in checked {
            // SAFETY: both ranges were bounds-checked inside live memory, which the caller keeps
            // alive until it synchronizes the stream.
            let rc = unsafe {
                if to_host {
                    sys::cuMemcpyDtoHAsync_v2(host as *mut c_void, dev, len as usize, stream.stream)
                } else {
                    sys::cuMemcpyHtoDAsync_v2(dev, host as *const c_void, len as usize, stream.stream)
                }
            };
            if let Err(e) = check(if to_host { "cuMemcpyDtoHAsync" } else { "cuMemcpyHtoDAsync" }, len, rc) {
                let _ = stream.synchronize();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Unmaps piece `i` from this range and hands its handle to the caller (who releases it or
    /// maps it elsewhere). The range stays reserved.
    pub(super) fn take_piece(&mut self, i: usize) -> Piece {
        let p = self.pieces.remove(i);
        // SAFETY: the piece was mapped at exactly this range by `add_piece`.
        unsafe { sys::cuMemUnmap(self.ptr + p.offset, p.size as usize) };
        p
    }
}

impl Drop for VmmAllocation {
    fn drop(&mut self) {
        // SAFETY: each piece was mapped by `add_piece` and is unmapped and released once; then
        // the reservation is freed. Errors cannot be returned from Drop.
        unsafe {
            let _ = self.ctx.bind();
            for p in self.pieces.drain(..) {
                let _ = sys::cuMemUnmap(self.ptr + p.offset, p.size as usize);
                let _ = sys::cuMemRelease(p.handle);
            }
            let _ = sys::cuMemAddressFree(self.ptr, self.size as usize);
        }
    }
}

/// A non-blocking stream of its own, so several threads copy without queueing behind each other.
#[derive(Debug)]
pub struct CudaStream {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: sys::CUstream,
}

// SAFETY: a stream handle may be used from any thread with its context current (bound first).
unsafe impl Send for CudaStream {}
// SAFETY: as above.
unsafe impl Sync for CudaStream {}

impl CudaStream {
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self, CudaError> {
        ctx.bind()?;
        let mut stream: sys::CUstream = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the context is current.
        check("cuStreamCreate", 0, unsafe {
            sys::cuStreamCreate(&mut stream, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        Ok(CudaStream { ctx: ctx.clone(), stream })
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.ctx.bind()?;
        // SAFETY: the stream is live for self's lifetime.
        check("cuStreamSynchronize", 0, unsafe { sys::cuStreamSynchronize(self.stream) })
    }
}

impl Drop for CudaStream {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once; pending work completes first (the driver
        // defers the destruction until the stream is idle).
        unsafe {
            let _ = self.ctx.bind();
            let _ = sys::cuStreamDestroy_v2(self.stream);
        }
    }
}

/// A ring of pinned staging buffers with a stream of their own, kept between loads (registering
/// host memory costs about a millisecond per 8 MiB, too much to pay on every load).
#[derive(Debug)]
pub struct Staging {
    stream: CudaStream,
    slots: Vec<(HostMapping, EventHandle)>,
    next: usize,
}

#[derive(Debug)]
pub(super) struct EventHandle(pub(super) sys::CUevent);

// SAFETY: an event handle is a plain driver token, used with its context bound.
unsafe impl Send for EventHandle {}
// SAFETY: as above.
unsafe impl Sync for EventHandle {}

impl Drop for EventHandle {
    fn drop(&mut self) {
        // SAFETY: created in `Staging::new` and destroyed once; Staging's owner synchronized the
        // stream (UploadPipeline's Drop) before the staging buffers can go.
        unsafe {
            let _ = sys::cuEventDestroy_v2(self.0);
        }
    }
}

impl Staging {
    /// `depth` staging buffers of `chunk_bytes` each on `ctx`'s GPU, registered with CUDA.
    pub fn new(ctx: &Arc<CudaContext>, chunk_bytes: u64, depth: usize) -> Result<Self, CudaError> {
        let stream = CudaStream::new(ctx)?;
        let mut slots = Vec::with_capacity(depth.max(1));
        for _ in 0..depth.max(1) {
            let mut m = HostMapping::new_huge(chunk_bytes, false)
                .map_err(|e| CudaError::Driver { operation: "staging buffer", error: e.to_string() })?;
            m.register_cuda(ctx)?;
            let mut ev: sys::CUevent = std::ptr::null_mut();
            // SAFETY: valid out-pointer; the context is current (bound by register_cuda).
            check("cuEventCreate", 0, unsafe {
                sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
            })?;
            slots.push((m, EventHandle(ev)));
        }
        Ok(Staging { stream, slots, next: 0 })
    }

    pub fn chunk_bytes(&self) -> u64 {
        self.slots[0].0.len_bytes()
    }

    pub fn ordinal(&self) -> u32 {
        self.stream.ctx.ordinal
    }
}

/// Fills a VMM allocation from host bytes through a [`Staging`] ring: while the copy engine
/// moves one buffer, the caller fills the next. Waits for every copy before it gives the
/// staging back (or on drop), so neither the allocation nor the staging buffers can go while a
/// copy is in flight.
pub struct UploadPipeline<'a> {
    dst: &'a VmmAllocation,
    staging: Option<Staging>,
}

impl<'a> UploadPipeline<'a> {
    pub fn new(dst: &'a VmmAllocation, staging: Staging) -> Result<Self, (CudaError, Staging)> {
        if staging.stream.ctx.ordinal != dst.ctx.ordinal {
            let e = CudaError::Driver {
                operation: "upload",
                error: format!("staging of GPU {} cannot fill GPU {}", staging.stream.ctx.ordinal, dst.ctx.ordinal),
            };
            return Err((e, staging));
        }
        Ok(UploadPipeline { dst, staging: Some(staging) })
    }

    /// Waits until the next staging buffer is free, lets `fill` write up to a chunk into it
    /// (it returns how many bytes it wrote), and queues their copy to `dst_offset`.
    pub fn push<E: From<CudaError>>(
        &mut self,
        dst_offset: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<(), E> {
        let Some(st) = self.staging.as_mut() else { return Ok(()) };
        let i = st.next;
        st.next = (st.next + 1) % st.slots.len();
        let (mapping, ev) = &mut st.slots[i];
        // SAFETY: the event is live; it was recorded after this slot's previous copy (or never,
        // which counts as complete).
        check("cuEventSynchronize", 0, unsafe { sys::cuEventSynchronize(ev.0) })?;
        let n = fill(mapping.as_mut_slice())? as u64;
        if n == 0 {
            return Ok(());
        }
        if n > mapping.len_bytes() {
            return Err(CudaError::Driver {
                operation: "upload",
                error: format!("{n} bytes claimed from a staging buffer of {}", mapping.len_bytes()),
            }
            .into());
        }
        let dev = self.dst.check_range(dst_offset, n)?;
        self.dst.ctx.bind()?;
        // SAFETY: the device range was bounds-checked; the staging buffer is not written again
        // before its event (recorded next) completes, and the stream is synchronized before the
        // staging is given back or dropped and before the borrow of the allocation ends.
        unsafe {
            check(
                "cuMemcpyHtoDAsync",
                n,
                sys::cuMemcpyHtoDAsync_v2(dev, mapping.address() as *const c_void, n as usize, st.stream.stream),
            )?;
            check("cuEventRecord", 0, sys::cuEventRecord(ev.0, st.stream.stream))?;
        }
        Ok(())
    }

    /// Waits for every queued copy and gives the staging back for the next load.
    pub fn finish(mut self) -> Result<Staging, CudaError> {
        let Some(st) = self.staging.take() else {
            return Err(CudaError::Driver { operation: "upload", error: "no staging".into() });
        };
        st.stream.synchronize()?;
        Ok(st)
    }
}

impl Drop for UploadPipeline<'_> {
    fn drop(&mut self) {
        if let Some(st) = &self.staging {
            let _ = st.stream.synchronize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{piece_sizes, MAX_PIECES, MIN_PIECE_BYTES};

    #[test]
    fn pieces_tile_the_allocation_in_few_granular_parts_leaving_room_for_a_switch() {
        let g = 2 << 20;
        for size in [g, 10 * g, MIN_PIECE_BYTES, 3 << 30, (8 << 30) + 2 * g, 80 << 30] {
            let p = piece_sizes(size, g);
            assert_eq!(p.iter().sum::<u64>(), size, "{size}: the pieces tile the allocation");
            assert!(p.iter().all(|n| n % g == 0 && *n > 0), "{size}: every piece is granular");
            assert!(p.len() < MAX_PIECES, "{size}: a switch may add one piece and stay within the limit");
            assert!(size < MIN_PIECE_BYTES || p[0] >= MIN_PIECE_BYTES, "{size}: no tiny pieces");
        }
        assert_eq!(piece_sizes(10 * g, g), vec![10 * g], "small allocations are one piece");
    }
}
