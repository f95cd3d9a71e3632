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
    let ctx = out.ctx.clone();
    let resident = |error: CudaError, out: VmmAllocation| SwitchFailed { error, left: SwitchLeft::Resident(out) };
    let g = match ctx.bind().and_then(|_| granularity_bytes(&ctx)) {
        Ok(g) => g,
        Err(e) => return Err(resident(e, out)),
    };
    let in_size = in_bytes.max(1).div_ceil(g) * g;
    let in_ptr = match reserve(in_size, g) {
        Ok(p) => p,
        Err(e) => return Err(resident(e, out)),
    };
    // Owns the reservation and the fresh piece; the reused pieces stay `out`'s until the end.
    let mut incoming = VmmAllocation { ctx: ctx.clone(), ptr: in_ptr, size: in_size, pieces: Vec::new() };

    // The plan: outgoing pieces, in order, at increasing offsets of the incoming range.
    let mut plan: Vec<(usize, u64)> = Vec::new();
    let mut covered = 0;
    for (i, p) in out.pieces.iter().enumerate() {
        if plan.len() < MAX_PIECES - 1 && covered + p.size <= in_size {
            plan.push((i, covered));
            covered += p.size;
        }
    }
    let fresh_bytes = in_size - covered;
    let mut mapped: Vec<(u64, u64)> = Vec::new();
    let unmap_borrowed = |mapped: &[(u64, u64)]| {
        for &(off, size) in mapped {
            // SAFETY: mapped below by `map_handle` at exactly this range.
            unsafe { sys::cuMemUnmap(in_ptr + off, size as usize) };
        }
    };
    let mut events = Vec::with_capacity(out.pieces.len());
    for &(i, off) in &plan {
        let p = &out.pieces[i];
        // SAFETY: inside the new reservation, at offsets that never overlap (plan order); the
        // handle is live (owned by `out`, which outlives this mapping: it is unmapped on every
        // failure below, or handed to `incoming`).
        if let Err(e) = unsafe { map_handle(&ctx, in_ptr + off, p.size, p.handle) } {
            unmap_borrowed(&mapped);
            return Err(resident(e, out));
        }
        mapped.push((off, p.size));
    }
    for _ in 0..out.pieces.len() {
        match event() {
            Ok(ev) => events.push(ev),
            Err(e) => {
                unmap_borrowed(&mapped);
                return Err(resident(e, out));
            }
        }
    }
    let map_ms = ms(started);

    // Copy-out: the reused pieces first (in the order they come in), then the rest.
    let mut order: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
    order.extend((0..out.pieces.len()).filter(|i| !plan.iter().any(|&(j, _)| j == *i)));
    for &i in &order {
        let p = &out.pieces[i];
        let queued = out.enqueue_copies(out_stream, &clip(save, p.offset, p.offset + p.size), true).and_then(|_| {
            // SAFETY: both handles are live; the event records this stream's work so far.
            check("cuEventRecord", 0, unsafe { sys::cuEventRecord(events[i].0, out_stream.stream) })
        });
        if let Err(e) = queued {
            // No copy-in was queued yet: `out` is intact once its stream is idle.
            let _ = out_stream.synchronize();
            unmap_borrowed(&mapped);
            return Err(resident(e, out));
        }
    }

    // From here on, copies-in overwrite outgoing pieces: a failure leaves `out` saved (when
    // every copy-out completed) or lost.
    let after_out = |error: CudaError, out: VmmAllocation, incoming: VmmAllocation| {
        let _ = in_stream.synchronize();
        let saved = out_stream.synchronize().is_ok();
        unmap_borrowed(&mapped);
        drop(incoming);
        drop(out);
        SwitchFailed { error, left: if saved { SwitchLeft::Saved } else { SwitchLeft::Lost } }
    };
    for &(i, off) in &plan {
        let size = out.pieces[i].size;
        // SAFETY: the stream and the recorded event are live.
        let waited = check("cuStreamWaitEvent", 0, unsafe { sys::cuStreamWaitEvent(in_stream.stream, events[i].0, 0) });
        if let Err(e) = waited.and_then(|_| incoming.enqueue_copies(in_stream, &clip(restore, off, off + size), false))
        {
            return Err(after_out(e, out, incoming));
        }
    }
    // The fresh piece now if the device has room, else after the copy-out frees the rest.
    let mut fresh_pending = fresh_bytes > 0;
    if fresh_pending {
        if let Ok(h) = create_handle(&ctx, fresh_bytes) {
            let queued = incoming
                .add_piece(covered, fresh_bytes, h)
                .and_then(|_| incoming.enqueue_copies(in_stream, &clip(restore, covered, in_size), false));
            if let Err(e) = queued {
                return Err(after_out(e, out, incoming));
            }
            fresh_pending = false;
        }
    }
    let mut out = out;
    if let Err(e) = out_stream.synchronize() {
        return Err(after_out(e, out, incoming));
    }
    let out_ms = ms(started);
    // Every outgoing byte is saved: the pieces the plan does not reuse go back to the driver.
    let reused: Vec<sys::CUmemGenericAllocationHandle> = plan.iter().map(|&(i, _)| out.pieces[i].handle).collect();
    let mut k = out.pieces.len();
    while k > 0 {
        k -= 1;
        if !reused.contains(&out.pieces[k].handle) {
            let p = out.take_piece(k);
            // SAFETY: unmapped by `take_piece`; the handle is released once.
            unsafe { sys::cuMemRelease(p.handle) };
        }
    }
    if fresh_pending {
        let queued = create_handle(&ctx, fresh_bytes)
            .and_then(|h| incoming.add_piece(covered, fresh_bytes, h))
            .and_then(|_| incoming.enqueue_copies(in_stream, &clip(restore, covered, in_size), false));
        if let Err(e) = queued {
            return Err(after_out(e, out, incoming));
        }
    }
    if let Err(e) = in_stream.synchronize() {
        return Err(after_out(e, out, incoming));
    }
    // The reused pieces change hands: unmapped from the outgoing range (already mapped in the
    // incoming one), owned by the incoming allocation.
    for (&handle, &(_, off)) in reused.iter().zip(plan.iter()) {
        if let Some(idx) = out.pieces.iter().position(|p| p.handle == handle) {
            let p = out.take_piece(idx);
            incoming.pieces.push(Piece { offset: off, size: p.size, handle: p.handle });
        }
    }
    incoming.pieces.sort_by_key(|p| p.offset);
    drop(out);
    let times = SwitchTimes { map_ms, out_ms, total_ms: ms(started), reused_pieces: plan.len(), fresh_bytes };
    Ok((incoming, times))
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
