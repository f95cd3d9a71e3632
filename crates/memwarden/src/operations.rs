//! Long operations run in the background (a model load or a defragmentation asked for with
//! `"async": true`): each is registered here with its progress, which the thread or task that
//! runs it updates, and which `GET /api/memory/operations/{id}` reads. Finished operations are
//! kept for [`KEEP_FOR`], at most [`FINISHED_KEPT`] of them; running ones always.

use crate::sync::lock;
use memwarden_protocol::api::{rfc3339, OperationDto, OperationKind, OperationResult, OperationStatus};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// Finished operations kept at most.
pub const FINISHED_KEPT: usize = 256;
/// How long a finished operation is kept.
pub const KEEP_FOR: Duration = Duration::from_secs(600);

/// Bytes an operation has handled and the bytes it is to handle, updated by whoever does the
/// work (any thread).
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// Sets the bytes to handle, as known now.
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    /// Adds bytes handled.
    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Sets both: bytes handled (never less than before) and the bytes to handle.
    pub fn set(&self, done: u64, total: u64) {
        self.done.fetch_max(done, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// How an operation ended.
#[derive(Debug, Clone)]
struct End {
    status: OperationStatus,
    at: OffsetDateTime,
    duration: Duration,
    result: Option<OperationResult>,
    error: Option<(String, String)>,
}

/// One operation: what it is, its progress, and how it ended.
#[derive(Debug)]
pub struct Operation {
    pub id: String,
    pub kind: OperationKind,
    /// The device it works on; `None` for every device.
    pub device: Option<String>,
    started: Instant,
    started_at: OffsetDateTime,
    progress: Arc<Progress>,
    end: Mutex<Option<End>>,
}

impl Operation {
    /// Its progress, for the work to update.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    pub fn status(&self) -> OperationStatus {
        lock(&self.end).as_ref().map_or(OperationStatus::Running, |e| e.status)
    }

    /// Where the API serves it.
    pub fn location(&self) -> String {
        format!("/api/memory/operations/{}", self.id)
    }

    /// It ended with `result`, the synchronous request's answer. The first end counts.
    pub fn complete(&self, result: OperationResult) {
        self.finish(OperationStatus::Completed, Some(result), None);
    }

    /// It failed with the error the synchronous request would have answered (`code`, `message`).
    pub fn fail(&self, code: &str, message: impl Into<String>) {
        self.finish(OperationStatus::Failed, None, Some((code.to_string(), message.into())));
    }

    fn finish(&self, status: OperationStatus, result: Option<OperationResult>, error: Option<(String, String)>) {
        let mut end = lock(&self.end);
        if end.is_none() {
            let duration = self.started.elapsed();
            *end = Some(End { status, at: OffsetDateTime::now_utc(), duration, result, error });
        }
    }

    /// When it finished, if it did.
    fn finished(&self) -> Option<Instant> {
        lock(&self.end).as_ref().map(|e| self.started + e.duration)
    }

    pub fn dto(&self) -> OperationDto {
        let end = lock(&self.end).clone();
        let (done, total) = (self.progress.done(), self.progress.total());
        let status = end.as_ref().map_or(OperationStatus::Running, |e| e.status);
        let duration = end.as_ref().map_or_else(|| self.started.elapsed(), |e| e.duration);
        let secs = duration.as_secs_f64();
        let progress = match total {
            0 if status == OperationStatus::Completed => 1.0,
            0 => 0.0,
            t => (done as f64 / t as f64).min(1.0),
        };
        let (error_code, error) = match end.as_ref().and_then(|e| e.error.clone()) {
            Some((code, message)) => (Some(code), Some(message)),
            None => (None, None),
        };
        OperationDto {
            operation_id: self.id.clone(),
            kind: self.kind,
            status,
            device_id: self.device.clone(),
            bytes_done: done,
            bytes_total: total,
            progress,
            bytes_per_second: if secs > 0.0 { done as f64 / secs } else { 0.0 },
            duration_ms: secs * 1e3,
            started_at: rfc3339(self.started_at),
            completed_at: end.as_ref().map(|e| rfc3339(e.at)),
            error,
            error_code,
            location: self.location(),
            result: end.and_then(|e| e.result),
        }
    }
}

/// Every operation running, and the recently finished ones.
#[derive(Debug, Default)]
pub struct Operations {
    all: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    by_id: HashMap<String, Arc<Operation>>,
    /// Ids in the order they started (oldest first).
    order: VecDeque<String>,
}

impl Operations {
    pub fn new() -> Arc<Operations> {
        Arc::new(Operations::default())
    }

    /// Registers a new running operation.
    pub fn start(&self, kind: OperationKind, device: Option<String>) -> Arc<Operation> {
        let op = Arc::new(Operation {
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            device,
            started: Instant::now(),
            started_at: OffsetDateTime::now_utc(),
            progress: Arc::new(Progress::default()),
            end: Mutex::new(None),
        });
        let mut all = lock(&self.all);
        all.prune(Instant::now());
        all.by_id.insert(op.id.clone(), op.clone());
        all.order.push_back(op.id.clone());
        op
    }

    pub fn get(&self, id: &str) -> Option<Arc<Operation>> {
        let mut all = lock(&self.all);
        all.prune(Instant::now());
        all.by_id.get(id).cloned()
    }

    /// The operations kept, oldest first.
    pub fn list(&self) -> Vec<Arc<Operation>> {
        let mut all = lock(&self.all);
        all.prune(Instant::now());
        all.order.iter().filter_map(|id| all.by_id.get(id).cloned()).collect()
    }
}

impl Registry {
    /// Forgets finished operations older than [`KEEP_FOR`], and the oldest finished ones beyond
    /// [`FINISHED_KEPT`].
    fn prune(&mut self, now: Instant) {
        let finished: Vec<(String, Instant)> = self
            .order
            .iter()
            .filter_map(|id| self.by_id.get(id).and_then(|op| op.finished().map(|at| (id.clone(), at))))
            .collect();
        let excess = finished.len().saturating_sub(FINISHED_KEPT);
        let mut by_end = finished;
        by_end.sort_by_key(|(_, at)| *at);
        let forget: Vec<String> = by_end
            .iter()
            .enumerate()
            .filter(|(i, (_, at))| *i < excess || now.saturating_duration_since(*at) > KEEP_FOR)
            .map(|(_, (id, _))| id.clone())
            .collect();
        if forget.is_empty() {
            return;
        }
        for id in &forget {
            self.by_id.remove(id);
        }
        self.order.retain(|id| self.by_id.contains_key(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memwarden_protocol::api::DefragAllDto;

    fn result() -> OperationResult {
        OperationResult::DefragmentAll(DefragAllDto { bytes_moved: 0, bytes_released: 0, devices: Vec::new() })
    }

    #[test]
    fn progress_and_ends_read_as_a_transfer_does() {
        let ops = Operations::new();
        let op = ops.start(OperationKind::Defragment, Some("cpu".into()));
        let d = op.dto();
        assert_eq!((d.status, d.bytes_done, d.bytes_total, d.progress), (OperationStatus::Running, 0, 0, 0.0));
        assert_eq!(d.location, format!("/api/memory/operations/{}", op.id));
        op.progress().set(25, 100);
        op.progress().set(10, 100);
        assert_eq!(op.dto().bytes_done, 25, "bytes done never go back");
        assert!((op.dto().progress - 0.25).abs() < 1e-9);
        op.progress().set(100, 100);
        op.complete(result());
        op.fail("LATE", "a second end does not count");
        let d = ops.get(&op.id).expect("kept").dto();
        assert_eq!((d.status, d.progress, d.error), (OperationStatus::Completed, 1.0, None));
        assert!(d.completed_at.is_some() && d.result.is_some() && d.bytes_per_second > 0.0);
        let failed = ops.start(OperationKind::ModelLoad, None);
        failed.fail("FILE_NOT_FOUND", "/x: no such file");
        let d = failed.dto();
        assert_eq!(
            (d.status, d.error_code.as_deref(), d.error.as_deref()),
            (OperationStatus::Failed, Some("FILE_NOT_FOUND"), Some("/x: no such file"))
        );
        assert_eq!(d.progress, 0.0, "nothing done, nothing to do: not completed");
        assert_eq!(ops.list().iter().map(|o| o.id.clone()).collect::<Vec<_>>(), [op.id.clone(), failed.id.clone()]);
    }

    #[test]
    fn finished_operations_are_forgotten_beyond_the_bound_running_ones_never() {
        let ops = Operations::new();
        let running = ops.start(OperationKind::Defragment, None);
        let first = ops.start(OperationKind::Defragment, None);
        first.complete(result());
        for _ in 0..FINISHED_KEPT {
            ops.start(OperationKind::Defragment, None).complete(result());
        }
        assert!(ops.get(&first.id).is_none(), "the oldest finished one went");
        assert!(ops.get(&running.id).is_some(), "running ones stay");
        assert_eq!(ops.list().len(), FINISHED_KEPT + 1);
        // Past KEEP_FOR every finished one goes.
        lock(&ops.all).prune(Instant::now() + KEEP_FOR + Duration::from_secs(1));
        assert_eq!(ops.list().iter().map(|o| o.id.clone()).collect::<Vec<_>>(), vec![running.id.clone()]);
    }
}
