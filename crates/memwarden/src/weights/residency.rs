//! What a router sees of held models and what the park pool is told: each state change goes
//! to the event stream (`modelState`) and sets the model's place in the park pool's demand;
//! the measured rates give each model its `resumeEstimateMs`.

use super::memory::ParkPool;
use super::{Held, Rate};
use crate::sync::lock;
use memwarden_core::DeviceId;
use memwarden_protocol::api::{rfc3339, ModelStateEventDto, WeightState};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;

/// Resume rate assumed for a parked model when neither it nor any model on its device has
/// resumed from a parked copy yet (bytes per second: PCIe 4/5 x16 measured in practice).
pub const DEFAULT_PARKED_RESUME_BYTES_PER_S: f64 = 25e9;
/// Read rate assumed for a dropped model when neither it nor any model on its device has a
/// measured load (bytes per second).
pub const DEFAULT_FILE_RESUME_BYTES_PER_S: f64 = 2e9;
/// Model state events kept for a slow subscriber before it misses some.
pub(super) const STATE_EVENTS_CAPACITY: usize = 1024;
/// Measured rates kept per device and kind for the averages.
const RATES_KEPT: usize = 16;

impl Held {
    /// The measured rates to the store's averages for this device.
    pub(super) fn note_rates(&self) {
        let Some(sink) = &self.sink else { return };
        sink.rates.note(self.device, RateKind::File, &sink.model_id, self.file_rate());
        if self.resumed_from == Some(WeightState::Parked) {
            sink.rates.note(self.device, RateKind::Parked, &sink.model_id, self.resume.as_ref());
        }
    }

    /// The last read of the file: the load, or a later resume of the dropped model.
    fn file_rate(&self) -> Option<&Rate> {
        let reload = self.resume.as_ref().filter(|_| self.resumed_from == Some(WeightState::Dropped));
        match (self.load.as_ref(), reload) {
            (Some(l), Some(r)) => Some(if r.at >= l.at { r } else { l }),
            (l, r) => l.or(r),
        }
    }

    /// Milliseconds a resume of `size_bytes` would take now, rounded up: 0 when resident; for a
    /// parked model its own last resume from a parked copy, else the average of such resumes
    /// on its device, else [`DEFAULT_PARKED_RESUME_BYTES_PER_S`]; for a dropped one its own
    /// last read of the file, else the device's average, else
    /// [`DEFAULT_FILE_RESUME_BYTES_PER_S`].
    pub(super) fn resume_estimate_ms(&self, size_bytes: u64) -> u64 {
        self.resume_estimate_ms_as(self.state, size_bytes)
    }

    /// [`Held::resume_estimate_ms`] as if the model were in `state`: the optimizer prices a park
    /// by the resume it would cost (`Parked`).
    pub fn resume_estimate_ms_as(&self, state: WeightState, size_bytes: u64) -> u64 {
        let rates = self.sink.as_ref().map(|s| &s.rates);
        let bytes_per_s = match state {
            WeightState::Resident | WeightState::Orphaned => return 0,
            WeightState::Parked => self
                .resume
                .as_ref()
                .filter(|_| self.resumed_from == Some(WeightState::Parked))
                .map(Rate::bytes_per_s)
                .or_else(|| rates.and_then(|r| r.average(self.device, RateKind::Parked)))
                .unwrap_or(DEFAULT_PARKED_RESUME_BYTES_PER_S),
            WeightState::Dropped => self
                .file_rate()
                .map(Rate::bytes_per_s)
                .or_else(|| rates.and_then(|r| r.average(self.device, RateKind::File)))
                .unwrap_or(DEFAULT_FILE_RESUME_BYTES_PER_S),
        };
        (size_bytes as f64 / bytes_per_s.max(1.0) * 1e3).ceil().max(1.0) as u64
    }

    /// Tells the park pool what this model may ask of it and the event stream what it became.
    pub(super) fn announce(&self, previous: Option<WeightState>, unloaded: bool) {
        let Some(sink) = &self.sink else { return };
        let may_park = !unloaded
            && sink.parkable
            && !sink.pinned
            && matches!(self.state, WeightState::Resident | WeightState::Orphaned);
        sink.pool.set_demand(&sink.model_id, may_park.then_some(sink.size_bytes));
        // No subscriber is not an error: nobody listens.
        let _ = sink.events.send(ModelStateEventDto {
            kind: "modelState".into(),
            model_id: sink.model_id.clone(),
            name: sink.name.clone(),
            device_id: self.device.to_string(),
            state: self.state,
            previous_state: previous,
            unloaded,
            bytes: sink.size_bytes,
            resume_estimate_ms: if unloaded { 0 } else { self.resume_estimate_ms(sink.size_bytes) },
            at: rfc3339(OffsetDateTime::now_utc()),
        });
    }
}

/// Where one model's state changes go: the store's event stream, its park pool (what may be
/// parked next) and its rate averages.
#[derive(Clone)]
pub(super) struct StateSink {
    pub(super) model_id: String,
    pub(super) name: String,
    pub(super) size_bytes: u64,
    pub(super) pinned: bool,
    /// Its device parks (a GPU): while resident and unpinned it may be parked next.
    pub(super) parkable: bool,
    pub(super) events: tokio::sync::broadcast::Sender<ModelStateEventDto>,
    pub(super) pool: Arc<ParkPool>,
    pub(super) rates: Arc<RateBook>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum RateKind {
    /// A resume from a parked copy.
    Parked,
    /// A load or a resume of a dropped model: a read of the file.
    File,
}

/// The last measured rates of the models on each device, for the estimates of models that
/// have none of their own: bounded, the oldest measurements go first.
#[derive(Default)]
pub(super) struct RateBook {
    rates: Mutex<BTreeMap<(DeviceId, RateKind), BTreeMap<String, Rate>>>,
}

impl RateBook {
    fn note(&self, device: DeviceId, kind: RateKind, model_id: &str, rate: Option<&Rate>) {
        let Some(rate) = rate else { return };
        let mut all = lock(&self.rates);
        let here = all.entry((device, kind)).or_default();
        if here.get(model_id).is_some_and(|r| r.at == rate.at) {
            return;
        }
        here.insert(model_id.to_string(), rate.clone());
        while here.len() > RATES_KEPT {
            let Some(oldest) = here.iter().min_by_key(|(_, r)| r.at).map(|(k, _)| k.clone()) else { break };
            here.remove(&oldest);
        }
    }

    /// Bytes per second over the kept measurements (all bytes / all time).
    fn average(&self, device: DeviceId, kind: RateKind) -> Option<f64> {
        let all = lock(&self.rates);
        let here = all.get(&(device, kind))?;
        let bytes: u64 = here.values().map(|r| r.bytes).sum();
        let secs: f64 = here.values().map(|r| r.elapsed.as_secs_f64()).sum();
        (bytes > 0 && secs > 0.0).then(|| bytes as f64 / secs)
    }
}

/// A load in progress on a device that parks: its size counts in the park pool's demand from
/// the moment the load knows it, so a park right after the load finds the pool grown.
pub(super) struct LoadDemand {
    pub(super) pool: Arc<ParkPool>,
    pub(super) key: String,
}

impl Drop for LoadDemand {
    fn drop(&mut self) {
        self.pool.set_demand(&self.key, None);
    }
}

/// The host's memory for the park pool's share: `MemTotal`, or the memory cgroup's limit
/// when lower; 0 (the pool then holds only its floor) when neither can be read.
pub(super) fn host_memory_bytes(host: &crate::config::HostSection) -> u64 {
    let reader = memwarden_backends::host::HostStatusReader::new(&host.proc_root, &host.cgroup_root);
    match reader.meminfo() {
        Ok(m) => reader.cgroup_memory(m.total_bytes).map_or(m.total_bytes, |c| c.limit_bytes.min(m.total_bytes)),
        Err(e) => {
            tracing::warn!("park pool: host memory unknown ({e}); it grows only to weights.park_pool_bytes");
            0
        }
    }
}
