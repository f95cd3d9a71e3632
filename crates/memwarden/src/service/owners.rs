//! Owners that go away, and the memory that comes back from them (`reclaimed`):
//! - owner processes (`ownerPid`): each is watched (`memwarden_sys::process::ProcessWatch`, a
//!   pidfd on Linux) from the moment it owns its
//!   first allocation, so its exit is seen even after its pid is reused. The server asks
//!   `Service::reap_dead_owners` every [`REAP_INTERVAL`];
//! - attached clients' connections (`ownerClient`): `Service::reclaim_client` when one closes.

use super::ledger::Ledger;
use super::{FreedAllocation, ServiceError};
use memwarden_sys::process::{ProcessWatch, WatchError};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// How often the server looks for owners that exited: memory comes back within this much (plus
/// the frees' own time), well inside the 1 s promised.
pub const REAP_INTERVAL: Duration = Duration::from_millis(200);

/// The owner-watch part of the service. Owns the pidfds of the processes that own allocations
/// (behind its own lock), and decides what their exit reclaims ([`OwnerWatch::reap`],
/// [`reclaim`]); the frees themselves are the service's.
#[derive(Default)]
pub struct OwnerWatch {
    pidfds: Mutex<HashMap<u32, ProcessWatch>>,
}

impl OwnerWatch {
    /// Starts watching `pid` (once per process). A process that does not exist is refused:
    /// its memory would be reclaimed at once.
    pub fn watch(&self, pid: u32) -> Result<(), ServiceError> {
        let mut fds = crate::sync::lock(&self.pidfds);
        if fds.contains_key(&pid) {
            return Ok(());
        }
        let no_such =
            || ServiceError::invalid("ownerPid", format!("no process {pid} (it must be alive to own memory)"));
        let fd = ProcessWatch::open(pid).map_err(|e| match e {
            WatchError::NoSuchProcess => no_such(),
            WatchError::Failed(e) => ServiceError::invalid("ownerPid", format!("process {pid} cannot be watched: {e}")),
        })?;
        // A process that already exited (a zombie) has a readable pidfd: it owns nothing.
        if fd.exited() {
            return Err(no_such());
        }
        fds.insert(pid, fd);
        Ok(())
    }

    /// The watched processes that exited since the last call (they are no longer watched).
    pub fn take_exited(&self) -> Vec<u32> {
        let mut gone = Vec::new();
        let mut fds = crate::sync::lock(&self.pidfds);
        let exited_now: Vec<u32> = fds.iter().filter(|(_, fd)| fd.exited()).map(|(pid, _)| *pid).collect();
        for pid in exited_now {
            fds.remove(&pid);
            gone.push(pid);
        }
        gone.sort_unstable();
        gone.dedup();
        gone
    }

    /// Processes being watched.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        crate::sync::lock(&self.pidfds).len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl OwnerWatch {
    /// Frees what owner processes that exited held (`ownerPid`) through `free` (the service's
    /// free, as `reclaimed`): per process, its pid, the allocations freed and their bytes.
    pub(super) fn reap(
        &self,
        ledger: &Ledger,
        free: impl Fn(&str) -> Result<FreedAllocation, ServiceError>,
    ) -> Vec<(u32, usize, u64)> {
        let mut out = Vec::new();
        for pid in self.take_exited() {
            let ids = ledger.owned_by_pid(pid);
            // What a copy is using is freed when the copy releases it.
            let (count, bytes, _) = reclaim(&ids, &free);
            if count > 0 {
                tracing::info!(pid, count, bytes, "reclaimed the memory of an owner process that exited");
            }
            out.push((pid, count, bytes));
        }
        out
    }
}

/// Frees these allocations through `free` (the service's free, as `reclaimed`: their owner is
/// gone): the count and bytes freed, and the ids still in use by a copy, which the ledger frees
/// (also as `reclaimed`) when the last copy releases them. Ids already gone are skipped.
pub(super) fn reclaim(
    ids: &[String],
    free: impl Fn(&str) -> Result<FreedAllocation, ServiceError>,
) -> (usize, u64, Vec<String>) {
    let (mut count, mut bytes, mut busy) = (0, 0, Vec::new());
    for id in ids {
        match free(id) {
            Ok(f) => {
                count += 1;
                bytes += f.allocated_bytes;
            }
            Err(ServiceError::InvalidOperation(_)) => busy.push(id.clone()),
            Err(ServiceError::AllocationNotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(allocation = %id, error = %e, "an allocation of a gone owner was not reclaimed")
            }
        }
    }
    (count, bytes, busy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_is_seen_to_exit_and_a_missing_one_is_refused() {
        let w = OwnerWatch::default();
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("spawn");
        w.watch(child.id()).expect("alive");
        w.watch(child.id()).expect("twice is once");
        assert_eq!(w.len(), 1);
        assert!(w.take_exited().is_empty());
        child.kill().expect("kill");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let gone = loop {
            let gone = w.take_exited();
            if !gone.is_empty() || std::time::Instant::now() > deadline {
                break gone;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(gone, vec![child.id()], "seen before it was reaped");
        child.wait().expect("reap");
        assert!(w.is_empty());
        assert!(matches!(w.watch(4_194_999), Err(ServiceError::InvalidArgument { field: "ownerPid", .. })));
        assert!(matches!(w.watch(child.id()), Err(ServiceError::InvalidArgument { .. })), "reaped: gone");
    }
}
