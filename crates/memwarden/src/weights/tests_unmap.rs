//! A park copies the bytes out while its holders unmap (`confirmEarly`): it waits for their
//! quiet (no `use()` open, none can start) before copying, and for their unmaps only before
//! the device memory goes; a holder that fails to unmap after the copy leaves the model
//! resident, its bytes in place, and the others get the memory back.

use super::holder::Unmapping;
use super::tests::{mapped_bytes, model_file, req, store, GPU};
use super::*;
use crate::config::WeightsSection;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A holder that is quiet at once and whose unmap takes `unmap_ms` from the ask (as a
/// process's `cuMemUnmap` runs on its own), then fails when `fails`.
struct SlowUnmap {
    id: String,
    unmap_ms: u64,
    fails: bool,
    unmapped: AtomicBool,
    remaps: AtomicUsize,
}

fn slow(id: &str, unmap_ms: u64, fails: bool) -> Arc<SlowUnmap> {
    Arc::new(SlowUnmap {
        id: id.into(),
        unmap_ms,
        fails,
        unmapped: AtomicBool::new(false),
        remaps: AtomicUsize::new(0),
    })
}

impl WeightHolder for Arc<SlowUnmap> {
    fn holder_id(&self) -> String {
        self.id.clone()
    }

    fn unmap(&self, req: UnmapWeights) -> BoxFuture<'static, Result<(), HolderError>> {
        self.unmap_early(req).done
    }

    fn unmap_early(&self, _req: UnmapWeights) -> Unmapping {
        let (me, until) = (self.clone(), tokio::time::Instant::now() + Duration::from_millis(self.unmap_ms));
        let done = async move {
            tokio::time::sleep_until(until).await;
            if me.fails {
                return Err(HolderError::Failed("cuMemUnmap: CUDA_ERROR_UNKNOWN".into()));
            }
            me.unmapped.store(true, Ordering::SeqCst);
            Ok(())
        };
        Unmapping { quiesced: async { Ok(()) }.boxed(), done: done.boxed() }
    }

    fn remap(&self, _grant: WeightsGrant, _fds: Vec<SharedHandle>) -> BoxFuture<'static, Result<(), HolderError>> {
        self.remaps.fetch_add(1, Ordering::SeqCst);
        self.unmapped.store(false, Ordering::SeqCst);
        async { Ok(()) }.boxed()
    }
}

fn phase(o: &ActionOutcome, name: &str) -> f64 {
    o.phases.iter().find(|(p, _)| *p == name).map(|(_, ms)| *ms).unwrap_or_else(|| panic!("no phase {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_park_copies_while_its_holders_unmap_and_frees_only_after_every_unmap() {
    let s = store(WeightsSection::default());
    let (path, data) = model_file("early", 7);
    let (a, b) = (slow("a", 300, false), slow("b", 300, false));
    let id = s.load(req(&path, GPU), Some(Arc::new(a.clone()))).await.expect("load").model.id.clone();
    s.load(req(&path, GPU), Some(Arc::new(b.clone()))).await.expect("second holder");
    let started = Instant::now();
    let parked = s.park(&id).await.expect("park");
    assert!(phase(&parked, "unmapHolders") < 150.0, "the copy did not wait for the unmaps: {:?}", parked.phases);
    assert!(phase(&parked, "awaitUnmaps") > 100.0, "the memory waited for the unmaps: {:?}", parked.phases);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(a.unmapped.load(Ordering::SeqCst) && b.unmapped.load(Ordering::SeqCst));
    let m = s.get(&id).expect("held");
    assert_eq!(m.state(), WeightState::Parked);
    assert!(parked.freed_bytes >= data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_fails_to_unmap_after_the_copy_leaves_the_model_resident_and_whole() {
    let s = store(WeightsSection::default());
    let (path, data) = model_file("early-fail", 9);
    let (ok, bad) = (slow("ok", 50, false), slow("bad", 100, true));
    let id = s.load(req(&path, GPU), Some(Arc::new(ok.clone()))).await.expect("load").model.id.clone();
    s.load(req(&path, GPU), Some(Arc::new(bad.clone()))).await.expect("second holder");
    let pool_free = s.park_pool_stats().free_bytes;
    match s.park(&id).await {
        Err(WeightsError::Internal(m)) => assert!(m.contains("bad") || m.contains("CUDA_ERROR_UNKNOWN"), "{m}"),
        other => panic!("a failed unmap must fail the park: {:?}", other.map(|o| o.action)),
    }
    let m = s.get(&id).expect("held");
    assert_eq!(m.state(), WeightState::Resident, "the model stays where it was");
    let pieces = m.with_held(|h| h.block.as_ref().expect("resident memory").export().expect("export"));
    let fds = pieces.into_iter().map(|p| p.handle).collect();
    assert_eq!(mapped_bytes(fds, data.len()), data, "its bytes are in place");
    assert_eq!(ok.remaps.load(Ordering::SeqCst), 1, "the holder that had unmapped got the memory back");
    assert_eq!(bad.remaps.load(Ordering::SeqCst), 0, "the one that failed still maps it");
    assert!(s.park_pool_stats().free_bytes >= pool_free, "the copy went back to the pool");
}

/// A park abandoned while its holders still unmap (its caller went away): the memory goes back
/// into the model, which stays resident with its bytes, not freed under a resident state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_park_dropped_after_the_copy_leaves_the_model_resident_with_its_memory() {
    let s = store(WeightsSection::default());
    let (path, data) = model_file("early-drop", 5);
    let h = slow("h", 400, false);
    let id = s.load(req(&path, GPU), Some(Arc::new(h.clone()))).await.expect("load").model.id.clone();
    let park = s.park(&id);
    assert!(tokio::time::timeout(Duration::from_millis(150), park).await.is_err(), "still waiting for the unmap");
    let m = s.get(&id).expect("held");
    assert_eq!(m.state(), WeightState::Resident);
    let pieces = m.with_held(|h| h.block.as_ref().expect("the memory is back").export().expect("export"));
    let fds = pieces.into_iter().map(|p| p.handle).collect();
    assert_eq!(mapped_bytes(fds, data.len()), data);
    // The next park runs whole.
    assert_eq!(s.park(&id).await.expect("park").action, "park");
}
