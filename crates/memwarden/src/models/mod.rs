//! Model memory: the models every Python process holds (supervised workers and attached
//! clients), as one view taken at one moment. The listing (`GET /api/memory/models`), the
//! optimizer's eviction candidates, the advice's facts, the history and `/metrics` are all
//! derived from a [`ModelView`], with one rule for what a model holds on a device: the bytes it
//! reports ([`bytes_on`], what the listing and metrics show), and what releasing it gives back
//! ([`footprint_on`], what eviction, admission and the advice rules count). Also here: what the OS says a model process holds ([`process`]) and what a
//! model file will take once loaded ([`estimate`]).

pub mod estimate;
pub mod process;

use crate::supervisor::{Conn, Slot, SlotState, Supervisor};
use memwarden_core::eviction::Candidate;
use memwarden_core::DeviceId;
use memwarden_protocol::{ModelInfo, Role};
use std::collections::BTreeMap;
use std::sync::Arc;
use time::OffsetDateTime;

/// The one rule for a model's size on a device: the bytes it reports there (split models
/// report per device; otherwise all of it is on its `deviceId`).
pub fn bytes_on(m: &ModelInfo, device: &str) -> u64 {
    m.bytes_by_device.get(device).copied().unwrap_or(if m.device_id == device { m.size_bytes } else { 0 })
}

/// Every device a model holds bytes on, with those bytes (split models report per device;
/// otherwise all of it is on its `deviceId`).
pub fn placements(m: &ModelInfo) -> Vec<(&str, u64)> {
    if m.bytes_by_device.is_empty() {
        vec![(m.device_id.as_str(), m.size_bytes)]
    } else {
        m.bytes_by_device.iter().map(|(d, b)| (d.as_str(), *b)).collect()
    }
}

/// What releasing a model gives back on `device`: its reported bytes there, or its own allocator
/// pool when it has one and that is larger (torch rounds every tensor up into its pool).
pub fn footprint_on(m: &ModelInfo, device: &str) -> u64 {
    let on = bytes_on(m, device);
    if on == 0 {
        return 0;
    }
    m.reserved_bytes.unwrap_or(on).max(on)
}

/// The model's weights are memwarden's (the process maps them zero-copy): they are counted
/// where they live, once, not as the process's own memory.
pub fn held_by_memwarden(m: &ModelInfo) -> bool {
    m.backend.as_deref() == Some("memwarden")
}

fn per_device<'a>(models: impl Iterator<Item = &'a ModelInfo>) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    for (d, b) in models.flat_map(placements) {
        *out.entry(d.to_string()).or_default() += b;
    }
    out
}

/// One worker or client, as seen when the view was taken.
pub struct ModelProcess {
    pub slot: Arc<Slot>,
    pub state: SlotState,
    /// Its connection while open.
    pub conn: Option<Arc<Conn>>,
    /// Whether it takes calls now (`ready` or `unhealthy`): only then are its models candidates.
    pub callable: bool,
    pub pid: Option<u32>,
    pub models: Vec<ModelInfo>,
}

impl ModelProcess {
    fn of(slot: &Arc<Slot>) -> ModelProcess {
        let state = slot.snapshot();
        let conn = state.conn.clone().filter(|c| !c.is_closed());
        let models = conn.as_ref().map(|c| c.model_list()).unwrap_or_default();
        let pid = conn.as_ref().map(|c| c.pid).or(state.pid);
        ModelProcess { callable: slot.conn().is_some(), slot: slot.clone(), state, conn, pid, models }
    }

    pub fn id(&self) -> &str {
        &self.slot.id
    }

    /// Reported bytes per device of the models it holds itself: not the weights memwarden
    /// holds, which it only maps ([`ModelProcess::mapped_bytes`]).
    pub fn model_bytes(&self) -> BTreeMap<String, u64> {
        per_device(self.models.iter().filter(|m| !held_by_memwarden(m)))
    }

    /// Per device, the bytes of the weights memwarden holds that this process maps.
    pub fn mapped_bytes(&self) -> BTreeMap<String, u64> {
        per_device(self.models.iter().filter(|m| held_by_memwarden(m)))
    }

    /// Its model was loaded from a file by a supervised worker, so it can be loaded elsewhere.
    pub fn can_reload(&self, m: &ModelInfo) -> bool {
        m.path.is_some() && self.slot.role == Role::Worker
    }

    /// Its process can move it to the CPU: torch models, or a client's (through its callback),
    /// from a GPU.
    pub fn can_offload(&self, m: &ModelInfo, device: DeviceId) -> bool {
        device.is_gpu() && (m.backend.as_deref() == Some("torch") || self.slot.role == Role::Client)
    }
}

/// Every model process (worker or client) and its models at one moment.
pub struct ModelView {
    pub processes: Vec<ModelProcess>,
    pub taken_at: OffsetDateTime,
}

impl ModelView {
    pub fn snapshot(supervisor: &Supervisor) -> ModelView {
        ModelView {
            processes: supervisor.slots().iter().map(ModelProcess::of).collect(),
            taken_at: OffsetDateTime::now_utc(),
        }
    }

    /// Every model with the process that holds it.
    pub fn models(&self) -> impl Iterator<Item = (&ModelInfo, &ModelProcess)> {
        self.processes.iter().flat_map(|h| h.models.iter().map(move |m| (m, h)))
    }

    /// Models of processes that take calls: those memwarden can act on.
    pub fn callable_models(&self) -> impl Iterator<Item = (&ModelInfo, &ModelProcess)> {
        self.models().filter(|(_, h)| h.callable)
    }

    /// Models on `device` that memwarden can release, as eviction candidates (their size is
    /// [`footprint_on`]), with their process.
    pub fn candidates(&self, device: DeviceId) -> Vec<(Candidate, Arc<Slot>)> {
        let dev = device.to_string();
        self.callable_models()
            // Weights memwarden holds are released by the ladder's own rung (park, drop).
            .filter(|(m, _)| m.backend.as_deref() != Some("memwarden"))
            .filter_map(|(m, h)| {
                let bytes = footprint_on(m, &dev);
                (bytes > 0).then(|| (self.candidate(m, h, device, bytes), h.slot.clone()))
            })
            .collect()
    }

    fn candidate(&self, m: &ModelInfo, h: &ModelProcess, device: DeviceId, size_bytes: u64) -> Candidate {
        Candidate {
            model_id: m.model_id.clone(),
            worker_id: h.slot.id.clone(),
            size_bytes,
            priority: m.priority,
            pinned: m.pinned,
            idle_secs: (self.taken_at - m.last_access).as_seconds_f64(),
            load_time_ms: m.load_time_ms,
            offloadable: h.can_offload(m, device),
            reloadable: h.can_reload(m),
        }
    }

    /// Every model on `device` of a process that takes calls, pinned ones included, as the
    /// advice rules see them (sized like the candidates, by [`footprint_on`]).
    pub fn facts(&self, device: DeviceId) -> Vec<Candidate> {
        let dev = device.to_string();
        self.callable_models()
            // Weights memwarden holds are released by the ladder's own rung (park, drop).
            .filter(|(m, _)| m.backend.as_deref() != Some("memwarden"))
            .filter_map(|(m, h)| {
                let bytes = footprint_on(m, &dev);
                (bytes > 0).then(|| self.candidate(m, h, device, bytes))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(device: &str, size: u64, by_device: &[(&str, u64)], reserved: Option<u64>) -> ModelInfo {
        ModelInfo {
            model_id: "m".into(),
            model_name: "m".into(),
            device_id: device.into(),
            size_bytes: size,
            bytes_by_device: by_device.iter().map(|(d, b)| (d.to_string(), *b)).collect(),
            loaded_at: OffsetDateTime::UNIX_EPOCH,
            last_access: OffsetDateTime::UNIX_EPOCH,
            load_time_ms: 0.0,
            priority: 50,
            pinned: false,
            path: None,
            tensor_count: 0,
            backend: None,
            reserved_bytes: reserved,
        }
    }

    #[test]
    fn a_models_bytes_are_what_it_reports_and_its_footprint_counts_its_own_pool() {
        let plain = model("cpu", 100, &[], None);
        assert_eq!((bytes_on(&plain, "cpu"), bytes_on(&plain, "cuda:0")), (100, 0));
        assert_eq!(footprint_on(&plain, "cpu"), 100);
        let torch = model("cuda:0", 100, &[], Some(128));
        assert_eq!((bytes_on(&torch, "cuda:0"), footprint_on(&torch, "cuda:0")), (100, 128));
        assert_eq!(footprint_on(&torch, "cpu"), 0, "nothing on a device it is not on");
        let split = model("cuda:0", 100, &[("cuda:0", 60), ("cuda:1", 40)], None);
        assert_eq!((bytes_on(&split, "cuda:0"), bytes_on(&split, "cuda:1")), (60, 40));
        assert_eq!(placements(&split), [("cuda:0", 60), ("cuda:1", 40)]);
        assert_eq!(placements(&plain), [("cpu", 100)]);
    }
}
