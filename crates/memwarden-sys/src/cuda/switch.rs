//! A switch: one model's bytes go out to host memory while another's come in, on a GPU too
//! full to hold both, with the two copies overlapped (PCIe is full duplex).
//!
//! The outgoing allocation's pieces are copied out on one stream, an event after each. The
//! incoming model gets a new address range, and each outgoing piece that fits is mapped into
//! it at once (mapping touches no data); its copy-in, on a second stream, waits for that
//! piece's event, so a piece is overwritten only after its old bytes are in host memory. While
//! piece k+1 goes out, piece k comes in. What the outgoing pieces cannot cover is one fresh
//! piece, made at once when the device has room, else once the outgoing copy is done and its
//! unused pieces are released. The pieces then belong to the incoming allocation; the outgoing
//! one is only a host copy.
//!
//! Nothing is half done: on a failure the outgoing model is either still resident and intact
//! ([`SwitchLeft::Resident`]: no incoming copy had been queued), or fully saved
//! ([`SwitchLeft::Saved`]), and the incoming model's host copy is never touched.

use super::vmm::{create_handle, granularity_bytes, map_handle, reserve, EventHandle, Piece, MAX_PIECES};
use super::{check, CudaError, CudaStream, VmmAllocation};
use crate::HostMapping;
use cudarc::driver::sys;
use std::time::Instant;

/// `(device offset, host mapping, host offset, len)`: one run of a model's bytes in host memory.
pub type HostPiece<'a> = (u64, &'a HostMapping, u64, u64);

/// Where the outgoing model is after a failed switch.
#[derive(Debug)]
pub enum SwitchLeft {
    /// Untouched: still resident, every byte in place.
    Resident(VmmAllocation),
    /// Every byte of it reached host memory; its device memory is gone.
    Saved,
    /// Neither: a copy-out failed after copies-in had overwritten some of its pieces (a broken
    /// context). Only its file can bring it back.
    Lost,
}

/// A failed switch: the error and where the outgoing model is.
#[derive(Debug)]
pub struct SwitchFailed {
    pub error: CudaError,
    pub left: SwitchLeft,
}

/// How long a switch took (milliseconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SwitchTimes {
    /// Until the incoming range was planned and mapped.
    pub map_ms: f64,
    /// Until the last outgoing byte was in host memory.
    pub out_ms: f64,
    /// Until the last incoming byte was in place.
    pub total_ms: f64,
    /// Outgoing pieces reused by the incoming model (each copied in as soon as it was out).
    pub reused_pieces: usize,
    /// Bytes of the fresh piece made for what the reused pieces did not cover.
    pub fresh_bytes: u64,
}

/// The parts of `pieces` inside `[start, end)` of the model.
fn clip<'a>(pieces: &[HostPiece<'a>], start: u64, end: u64) -> Vec<HostPiece<'a>> {
    pieces
        .iter()
        .filter_map(|&(off, host, host_off, len)| {
            let s = off.max(start);
            let e = (off + len).min(end);
            (s < e).then(|| (s, host, host_off + (s - off), e - s))
        })
        .collect()
}

fn event() -> Result<EventHandle, CudaError> {
    let mut ev: sys::CUevent = std::ptr::null_mut();
    // SAFETY: valid out-pointer; the caller made the context current.
    check("cuEventCreate", 0, unsafe {
        sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
    })?;
    Ok(EventHandle(ev))
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// One outgoing piece the incoming model reuses: its index in `out`, its handle and size, and
/// where it lies in the incoming range.
#[derive(Debug, Clone, Copy)]
struct Reused {
    index: usize,
    handle: sys::CUmemGenericAllocationHandle,
    size: u64,
    offset: u64,
}

/// The incoming range with the reused pieces mapped into it, and an event per outgoing piece.
struct Prepared {
    incoming: VmmAllocation,
    plan: Vec<Reused>,
    /// Bytes of the incoming range the reused pieces cover (the fresh piece starts here).
    covered: u64,
    events: Vec<EventHandle>,
}

impl Prepared {
    /// Unmaps the reused pieces from the incoming range (they stay `out`'s).
    fn unmap_reused(&self) {
        for r in &self.plan {
            // SAFETY: mapped by `prepare` at exactly this range.
            unsafe { sys::cuMemUnmap(self.incoming.ptr + r.offset, r.size as usize) };
        }
    }
}

/// Reserves the incoming range, plans which outgoing pieces it reuses (in order, at increasing
/// offsets, leaving room for one fresh piece within [`MAX_PIECES`]) and maps them there; makes
/// an event per outgoing piece. Touches no data: on an error `out` is intact.
fn prepare(out: &VmmAllocation, in_bytes: u64) -> Result<Prepared, CudaError> {
    let ctx = out.ctx.clone();
    ctx.bind()?;
    let g = granularity_bytes(&ctx)?;
    let in_size = in_bytes.max(1).div_ceil(g) * g;
    let ptr = reserve(in_size, g)?;
    // Owns the reservation (and later the fresh piece); the reused pieces stay `out`'s.
    let incoming = VmmAllocation { ctx: ctx.clone(), ptr, size: in_size, pieces: Vec::new() };
    let mut p = Prepared { incoming, plan: Vec::new(), covered: 0, events: Vec::new() };
    for (index, piece) in out.pieces.iter().enumerate() {
        if p.plan.len() < MAX_PIECES - 1 && p.covered + piece.size <= in_size {
            let r = Reused { index, handle: piece.handle, size: piece.size, offset: p.covered };
            // SAFETY: inside the new reservation, at offsets that never overlap (plan order);
            // the handle is live (owned by `out`, which outlives this mapping: it is unmapped on
            // every failure, or handed to the incoming allocation).
            if let Err(e) = unsafe { map_handle(&ctx, ptr + r.offset, r.size, r.handle) } {
                p.unmap_reused();
                return Err(e);
            }
            p.plan.push(r);
            p.covered += piece.size;
        }
    }
    for _ in 0..out.pieces.len() {
        match event() {
            Ok(ev) => p.events.push(ev),
            Err(e) => {
                p.unmap_reused();
                return Err(e);
            }
        }
    }
    Ok(p)
}

/// Queues the copy-out of every outgoing piece, the reused ones first, each followed by its
/// event. No copy-in is queued yet: on an error `out` is intact once its stream is idle.
fn queue_out(out: &VmmAllocation, stream: &CudaStream, save: &[HostPiece<'_>], p: &Prepared) -> Result<(), CudaError> {
    let mut order: Vec<usize> = p.plan.iter().map(|r| r.index).collect();
    order.extend((0..out.pieces.len()).filter(|i| !p.plan.iter().any(|r| r.index == *i)));
    for i in order {
        let piece = &out.pieces[i];
        out.enqueue_copies(stream, &clip(save, piece.offset, piece.offset + piece.size), true)?;
        // SAFETY: both handles are live; the event records this stream's work so far.
        check("cuEventRecord", 0, unsafe { sys::cuEventRecord(p.events[i].0, stream.stream) })?;
    }
    Ok(())
}

/// Queues the copy-in of `[start, end)` of the incoming model.
fn queue_in(
    p: &Prepared,
    stream: &CudaStream,
    restore: &[HostPiece<'_>],
    start: u64,
    end: u64,
) -> Result<(), CudaError> {
    p.incoming.enqueue_copies(stream, &clip(restore, start, end), false)
}

/// Makes, maps and fills the fresh piece that covers what the reused pieces do not.
fn fresh_piece(p: &mut Prepared, stream: &CudaStream, restore: &[HostPiece<'_>]) -> Result<(), CudaError> {
    let (start, end) = (p.covered, p.incoming.size);
    let handle = create_handle(&p.incoming.ctx, end - start)?;
    p.incoming.add_piece(start, end - start, handle)?;
    queue_in(p, stream, restore, start, end)
}

/// Runs the copies once `queue_out` queued the copy-out: each reused piece's copy-in waits for
/// its event; the fresh piece is made at once when the device has room, else after the
/// copy-out ends and the unused outgoing pieces are released. Returns when the copy-out ended
/// (ms after `started`).
fn run_copies(
    out: &mut VmmAllocation,
    p: &mut Prepared,
    (out_stream, in_stream): (&CudaStream, &CudaStream),
    restore: &[HostPiece<'_>],
    started: Instant,
) -> Result<f64, CudaError> {
    for r in p.plan.clone() {
        // SAFETY: the stream and the recorded event are live.
        check("cuStreamWaitEvent", 0, unsafe { sys::cuStreamWaitEvent(in_stream.stream, p.events[r.index].0, 0) })?;
        queue_in(p, in_stream, restore, r.offset, r.offset + r.size)?;
    }
    let mut fresh_pending = p.covered < p.incoming.size;
    if fresh_pending && fresh_piece(p, in_stream, restore).is_ok() {
        fresh_pending = false;
    }
    out_stream.synchronize()?;
    let out_ms = ms(started);
    // Every outgoing byte is saved: the pieces the plan does not reuse go back to the driver.
    let mut k = out.pieces.len();
    while k > 0 {
        k -= 1;
        if !p.plan.iter().any(|r| r.handle == out.pieces[k].handle) {
            let piece = out.take_piece(k);
            // SAFETY: unmapped by `take_piece`; the handle is released once.
            unsafe { sys::cuMemRelease(piece.handle) };
        }
    }
    if fresh_pending {
        fresh_piece(p, in_stream, restore)?;
    }
    in_stream.synchronize()?;
    Ok(out_ms)
}

/// Saves `out` into `save` (its bytes, as host pieces) while filling a new allocation of
/// `in_bytes` from `restore`, reusing `out`'s device memory piece by piece (module doc).
/// `out_stream` and `in_stream` are two streams of `out`'s GPU.
pub fn switch(
    out: VmmAllocation,
    out_stream: &CudaStream,
    in_stream: &CudaStream,
    save: &[HostPiece<'_>],
    in_bytes: u64,
    restore: &[HostPiece<'_>],
) -> Result<(VmmAllocation, SwitchTimes), SwitchFailed> {
    let started = Instant::now();
    let mut p = match prepare(&out, in_bytes) {
        Ok(p) => p,
        Err(error) => return Err(SwitchFailed { error, left: SwitchLeft::Resident(out) }),
    };
    let map_ms = ms(started);
    if let Err(error) = queue_out(&out, out_stream, save, &p) {
        let _ = out_stream.synchronize();
        p.unmap_reused();
        return Err(SwitchFailed { error, left: SwitchLeft::Resident(out) });
    }
    let mut out = out;
    let out_ms = match run_copies(&mut out, &mut p, (out_stream, in_stream), restore, started) {
        Ok(t) => t,
        Err(error) => {
            // Copies-in may have overwritten outgoing pieces: `out` is saved when every
            // copy-out completed, else lost.
            let _ = in_stream.synchronize();
            let saved = out_stream.synchronize().is_ok();
            p.unmap_reused();
            drop(p);
            drop(out);
            return Err(SwitchFailed { error, left: if saved { SwitchLeft::Saved } else { SwitchLeft::Lost } });
        }
    };
    // The reused pieces change hands: unmapped from the outgoing range (already mapped in the
    // incoming one), owned by the incoming allocation.
    for r in &p.plan {
        if let Some(idx) = out.pieces.iter().position(|piece| piece.handle == r.handle) {
            let piece = out.take_piece(idx);
            p.incoming.pieces.push(Piece { offset: r.offset, size: piece.size, handle: piece.handle });
        }
    }
    p.incoming.pieces.sort_by_key(|piece| piece.offset);
    drop(out);
    let fresh_bytes = p.incoming.size - p.covered;
    let times = SwitchTimes { map_ms, out_ms, total_ms: ms(started), reused_pieces: p.plan.len(), fresh_bytes };
    Ok((p.incoming, times))
}

#[cfg(test)]
mod tests {
    use super::clip;
    use crate::HostMapping;

    #[test]
    fn clip_keeps_only_the_bytes_inside_the_range() {
        let h = HostMapping::new(4096, 4096, false).expect("mapping");
        let pieces = [(0u64, &h, 0u64, 1000u64), (1000, &h, 1000, 1000), (2000, &h, 2000, 500)];
        let got: Vec<(u64, u64, u64)> = clip(&pieces, 500, 2100).iter().map(|&(o, _, ho, n)| (o, ho, n)).collect();
        assert_eq!(got, vec![(500, 500, 500), (1000, 1000, 1000), (2000, 2000, 100)]);
        assert!(clip(&pieces, 2500, 3000).is_empty(), "past the model's bytes: nothing");
    }
}
