//! Analytics: the history recorder (a sampler that adds one point per device per
//! `analytics.fine_interval_ms` and tracks model memory), the window reports
//! (`/api/memory/usage`, `/api/memory/analytics`), the recommendations
//! (`/api/memory/optimization`) and the Prometheus exposition (`/metrics`). Every figure comes
//! from what was measured or recorded: the OS and driver readings, the service's counters and
//! event log, and what the model holders report.

pub mod metrics;
pub mod report;

use crate::config::AnalyticsSection;
use crate::models::ModelView;
use crate::pressure::PressureMonitor;
use crate::service::Service;
use crate::supervisor::Supervisor;
use crate::sync::lock;
use memwarden_core::advice;
use memwarden_core::history::{Peak, Point, Ring, Series, LEVELS};
use memwarden_core::DeviceId;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use time::OffsetDateTime;

/// Changes of one model's bytes kept per model (a sample is stored only when the bytes change).
const MODEL_SAMPLES_KEPT: usize = 512;

pub fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

pub fn from_unix_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// One model's memory over time.
#[derive(Debug, Clone)]
pub struct ModelTrack {
    pub model_id: String,
    pub model_name: String,
    pub device: String,
    pub worker_id: String,
    /// `(unix ms, bytes)` each time the reported bytes changed; 0 once it is gone.
    pub samples: Ring<(i64, u64)>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// Present in the last sample.
    pub loaded: bool,
    pub peak: Peak,
}

impl ModelTrack {
    /// The highest bytes in `(start_ms, end_ms]`, counting the value held when it began.
    pub fn max_in(&self, start_ms: i64, end_ms: i64) -> u64 {
        let before = self.samples.iter().rev().find(|(t, _)| *t <= start_ms).map(|(_, b)| *b).unwrap_or(0);
        self.samples.iter().filter(|(t, _)| *t > start_ms && *t <= end_ms).map(|(_, b)| *b).fold(before, u64::max)
    }

    pub fn current_bytes(&self) -> u64 {
        self.samples.last().map(|(_, b)| *b).unwrap_or(0)
    }
}

pub(crate) struct State {
    pub series: BTreeMap<DeviceId, Series>,
    /// Highest used bytes (OS or driver) per device, resettable.
    pub used_peaks: BTreeMap<DeviceId, Peak>,
    pub models: BTreeMap<String, ModelTrack>,
    last_sample_ms: Option<i64>,
    pub samples_taken: u64,
}

/// Analytics. Owns the recorded history behind its own lock (per device a series of points and
/// the resettable peak of used bytes, per model its bytes over time, the sampler's progress),
/// its settings and the recommendation thresholds, and the sampler task that fills the history.
/// It reads, and owns none of, the service's counters and event log, the supervisor's models
/// and the pressure monitor's levels. The window reports are in `report.rs`; the `/metrics`
/// exposition (built afresh each time) in `metrics.rs`.
pub struct Analytics {
    pub(crate) service: Arc<Service>,
    pub(crate) supervisor: Arc<Supervisor>,
    pub(crate) pressure: Arc<PressureMonitor>,
    pub(crate) config: AnalyticsSection,
    /// Where the recommendation rules draw their lines.
    pub(crate) advice: advice::AdviceThresholds,
    pub(crate) state: Mutex<State>,
    pub(crate) started_ms: i64,
}

impl Analytics {
    pub fn new(
        service: Arc<Service>,
        supervisor: Arc<Supervisor>,
        pressure: Arc<PressureMonitor>,
        config: AnalyticsSection,
        advice: advice::AdviceThresholds,
    ) -> Arc<Analytics> {
        Arc::new(Analytics {
            service,
            supervisor,
            pressure,
            config,
            advice,
            state: Mutex::new(State {
                series: BTreeMap::new(),
                used_peaks: BTreeMap::new(),
                models: BTreeMap::new(),
                last_sample_ms: None,
                samples_taken: 0,
            }),
            started_ms: unix_ms(OffsetDateTime::now_utc()),
        })
    }

    pub fn config(&self) -> &AnalyticsSection {
        &self.config
    }

    /// The whole `/metrics` exposition, measured now; `weights`: the models memwarden holds;
    /// `park_pool`: its park pool's figures.
    pub fn render_metrics(
        &self,
        http: &metrics::HttpMetrics,
        weights: &[memwarden_protocol::api::HeldModelDto],
        park_pool: Option<crate::weights::PoolStats>,
    ) -> Result<String, std::fmt::Error> {
        metrics::render(self, http, weights, park_pool)
    }

    /// Starts the sampler task (when recording is on). It ends when the analytics are dropped.
    pub fn start(self: &Arc<Self>) {
        if !self.config.enabled {
            return;
        }
        let weak: Weak<Analytics> = Arc::downgrade(self);
        let every = Duration::from_millis(self.config.fine_interval_ms.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(a) = weak.upgrade() else { return };
                // Status reads of a GPU take microseconds, of the host a /proc read: inline.
                a.sample_now(OffsetDateTime::now_utc());
            }
        });
    }

    /// Adds one point per device and updates the model tracks (the sampler calls this; tests
    /// may call it to take a point at once).
    pub fn sample_now(&self, now: OffsetDateTime) {
        let now_ms = unix_ms(now);
        let view = ModelView::snapshot(&self.supervisor);
        let mut points = Vec::new();
        for id in self.service.device_ids() {
            let Ok(st) = self.service.status(id) else { continue };
            let level = self.pressure.report(id).map(|p| p.level as u8).unwrap_or(0);
            let rec = self.service.device_record(id);
            let (reserved, allocated) = st.pool_totals();
            let dev = id.to_string();
            points.push((
                id,
                Point {
                    at_ms: now_ms,
                    span_ms: 0,
                    used_bytes: st.used_bytes,
                    used_max_bytes: st.used_bytes,
                    available_bytes: st.available_bytes,
                    total_bytes: st.total_bytes,
                    pool_reserved_bytes: reserved,
                    pool_allocated_bytes: allocated,
                    reservation_bytes: st.reservation_bytes,
                    model_bytes: view.callable_models().map(|(m, _)| crate::models::bytes_on(m, &dev)).sum(),
                    fragmentation: st.fragmentation(),
                    level,
                    level_ms: [0; LEVELS],
                    counters: rec.counters,
                },
            ));
        }
        let mut s = lock(&self.state);
        let span = s.last_sample_ms.map(|t| (now_ms - t).max(0) as u64).unwrap_or(self.config.fine_interval_ms);
        s.last_sample_ms = Some(now_ms);
        s.samples_taken += 1;
        let resolution = self.config.resolution();
        for (id, mut p) in points {
            p.span_ms = span;
            p.level_ms[(p.level as usize).min(LEVELS - 1)] = span;
            let peak = s.used_peaks.entry(id).or_insert(Peak { since_ms: self.started_ms, ..Peak::default() });
            peak.observe(p.used_bytes, now_ms);
            s.series.entry(id).or_insert_with(|| Series::new(resolution)).record(p);
        }
        self.track_models(&mut s, &view, now_ms);
    }

    fn track_models(&self, s: &mut State, view: &ModelView, now_ms: i64) {
        for track in s.models.values_mut() {
            track.loaded = false;
        }
        for (m, holder) in view.callable_models() {
            let worker = &holder.slot.id;
            let bytes = m.size_bytes;
            let track = s.models.entry(m.model_id.clone()).or_insert_with(|| ModelTrack {
                model_id: m.model_id.clone(),
                model_name: m.model_name.clone(),
                device: m.device_id.clone(),
                worker_id: worker.clone(),
                samples: Ring::new(MODEL_SAMPLES_KEPT),
                first_seen_ms: now_ms,
                last_seen_ms: now_ms,
                loaded: true,
                peak: Peak { since_ms: now_ms, ..Peak::default() },
            });
            track.loaded = true;
            track.last_seen_ms = now_ms;
            track.device = m.device_id.clone();
            track.worker_id = worker.clone();
            if track.samples.last().map(|(_, b)| *b) != Some(bytes) {
                track.samples.push((now_ms, bytes));
            }
            track.peak.observe(bytes, now_ms);
        }
        for track in s.models.values_mut().filter(|t| !t.loaded) {
            if track.samples.last().map(|(_, b)| *b) != Some(0) {
                track.samples.push((now_ms, 0));
            }
        }
        // Bounded: forget the models gone longest.
        while s.models.len() > self.config.max_tracked_models.max(1) {
            let oldest = s
                .models
                .values()
                .filter(|t| !t.loaded)
                .min_by_key(|t| t.last_seen_ms)
                .or_else(|| s.models.values().min_by_key(|t| t.last_seen_ms))
                .map(|t| t.model_id.clone());
            match oldest {
                Some(id) => s.models.remove(&id),
                None => break,
            };
        }
    }

    /// Starts every peak over from its current value: used bytes, memwarden's live bytes, and
    /// each model's bytes. Returns when the new peaks start.
    pub fn reset_peaks(&self) -> OffsetDateTime {
        let now = OffsetDateTime::now_utc();
        let now_ms = unix_ms(now);
        self.service.reset_live_peaks(now);
        let mut s = lock(&self.state);
        let current: Vec<(DeviceId, u64)> =
            s.series.iter().filter_map(|(id, se)| se.latest().map(|p| (*id, p.used_bytes))).collect();
        for (id, used) in current {
            s.used_peaks.entry(id).or_default().reset(used, now_ms);
        }
        for t in s.models.values_mut() {
            let cur = if t.loaded { t.current_bytes() } else { 0 };
            t.peak.reset(cur, now_ms);
        }
        now
    }
}
