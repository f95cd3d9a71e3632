//! `GET /metrics`: the Prometheus text exposition (format 0.0.4), encoded by
//! `prometheus-client`. Device, pool, pressure, model and worker figures are read at scrape
//! time from the same sources as `/api/memory/status` and `/api/memory/models`; counters are
//! the service's cumulative counters; request latencies are a histogram the API middleware
//! fills. Names carry base units (`_bytes`, `_seconds`, `_total`); label values come from
//! bounded sets (devices, memory kinds, route templates, worker ids and states, loaded models).

use super::Analytics;
use crate::models::{bytes_on, ModelView};
use crate::supervisor::WorkerState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The route template (`/api/memory/allocations/{allocation_id}`), or `unmatched`.
    pub route: String,
    /// The status class: `2xx`, `4xx`, `5xx`, …
    pub status: String,
}

fn latency_histogram() -> Histogram {
    // 25 µs … ~3.3 s, doubling.
    Histogram::new(exponential_buckets(25e-6, 2.0, 18))
}

/// Request latencies, filled by the API middleware; shared between scrapes.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    pub latency: Family<HttpLabels, Histogram, fn() -> Histogram>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics { latency: Family::new_with_constructor(latency_histogram) }
    }
}

impl HttpMetrics {
    pub fn observe(&self, method: &str, route: &str, status: u16, seconds: f64) {
        // Label values from bounded sets: a client may send any method name.
        let method = match method {
            "GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS" => method,
            _ => "other",
        };
        let labels =
            HttpLabels { method: method.to_string(), route: route.to_string(), status: format!("{}xx", status / 100) };
        self.latency.get_or_create(&labels).observe(seconds);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Dev {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DevKind {
    device: String,
    memory_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DevDirection {
    device: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
    device: String,
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelInfoLabels {
    model: String,
    name: String,
    device: String,
    worker: String,
    backend: String,
    pinned: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Worker {
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerStateLabels {
    worker: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Level {
    device: String,
    level: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: String,
}

type GaugeU = Gauge<u64, AtomicU64>;
type GaugeF = Gauge<f64, AtomicU64>;

/// Registers a fresh family and returns it to fill.
fn family<L, M>(r: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> Family<L, M>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let f = Family::<L, M>::default();
    match unit {
        Some(u) => r.register_with_unit(name, help, u, f.clone()),
        None => r.register(name, help, f.clone()),
    }
    f
}

impl Analytics {
    /// The whole exposition, measured now.
    pub fn render_metrics(&self, http: &HttpMetrics) -> Result<String, std::fmt::Error> {
        let mut r = Registry::default();
        let b = || Some(Unit::Bytes);
        let total: Family<Dev, GaugeU> = family(&mut r, "memwarden_device_total", "Total memory of the device", b());
        let used: Family<Dev, GaugeU> =
            family(&mut r, "memwarden_device_used", "Used memory of the device (OS or driver)", b());
        let available: Family<Dev, GaugeU> =
            family(&mut r, "memwarden_device_available", "Available memory of the device (OS or driver)", b());
        let reserved: Family<DevKind, GaugeU> = family(
            &mut r,
            "memwarden_pool_reserved",
            "Memory memwarden's pools hold from the OS or driver, per memory kind",
            b(),
        );
        let allocated: Family<DevKind, GaugeU> =
            family(&mut r, "memwarden_pool_allocated", "Memory of live memwarden allocations, per memory kind", b());
        let reservation: Family<Dev, GaugeU> =
            family(&mut r, "memwarden_device_reservation", "Bytes promised to reservations (admission tickets)", b());
        let frag: Family<Dev, GaugeF> = family(
            &mut r,
            "memwarden_device_fragmentation_ratio",
            "Fragmentation index of memwarden's pools (1 - largest free range / free bytes)",
            None,
        );
        let pressure: Family<Dev, GaugeU> = family(
            &mut r,
            "memwarden_device_pressure_level",
            "Pressure level: 0 low, 1 moderate, 2 high, 3 critical",
            None,
        );
        let pressure_state: Family<Level, GaugeU> = family(
            &mut r,
            "memwarden_device_pressure",
            "1 for the device's current pressure level, 0 for the others",
            None,
        );
        let healthy: Family<Dev, GaugeU> = family(
            &mut r,
            "memwarden_device_healthy",
            "1 when the device's status reads without a driver fault, 0 otherwise",
            None,
        );
        let utilization: Family<Dev, GaugeF> =
            family(&mut r, "memwarden_device_utilization_ratio", "Used over total memory (0-1)", None);
        let allocs: Family<Dev, Counter> =
            family(&mut r, "memwarden_allocations", "Allocations made through memwarden", None);
        let alloc_bytes: Family<Dev, Counter> =
            family(&mut r, "memwarden_allocated", "Bytes allocated through memwarden", b());
        let frees: Family<Dev, Counter> = family(&mut r, "memwarden_frees", "Allocations freed", None);
        let freed_bytes: Family<Dev, Counter> = family(&mut r, "memwarden_freed", "Bytes freed", b());
        let failures: Family<Dev, Counter> =
            family(&mut r, "memwarden_allocation_failures", "Allocations that did not fit", None);
        let moves: Family<Dev, Counter> =
            family(&mut r, "memwarden_allocation_moves", "Allocations moved by defragmentation", None);
        let exports: Family<Dev, Counter> =
            family(&mut r, "memwarden_exports", "Allocations shared with another process", None);
        let transfers: Family<Dev, Counter> =
            family(&mut r, "memwarden_transfers", "Transfers and copies out of the device's allocations", None);
        let transfer_bytes: Family<DevDirection, Counter> =
            family(&mut r, "memwarden_transfer", "Bytes copied out of (out) and into (in) the device", b());
        let defrag_runs: Family<Dev, Counter> =
            family(&mut r, "memwarden_defragmentations", "Defragmentation passes", None);
        let defrag_moved: Family<Dev, Counter> =
            family(&mut r, "memwarden_defragmentation_moved", "Bytes moved by defragmentation", b());
        let defrag_released: Family<Dev, Counter> = family(
            &mut r,
            "memwarden_defragmentation_released",
            "Bytes returned to the OS or driver by defragmentation",
            b(),
        );
        let model_bytes: Family<ModelLabels, GaugeU> =
            family(&mut r, "memwarden_model", "Memory a loaded model holds on a device", b());
        let model_info: Family<ModelInfoLabels, GaugeU> =
            family(&mut r, "memwarden_model_info", "1 per loaded model, with its holder and how it is held", None);
        let device_models: Family<Dev, GaugeU> =
            family(&mut r, "memwarden_device_models", "Memory of all models on the device", b());
        let worker_state: Family<WorkerStateLabels, GaugeU> =
            family(&mut r, "memwarden_worker_state", "1 for the worker's current state, 0 for the others", None);
        let worker_restarts: Family<Worker, Counter> =
            family(&mut r, "memwarden_worker_restarts", "Restarts of a supervised worker", None);
        let build: Family<Build, GaugeU> = family(&mut r, "memwarden_build_info", "The daemon's version", None);
        let start: Family<Build, GaugeF> =
            family(&mut r, "memwarden_start_time_seconds", "When the daemon started, Unix seconds", None);
        r.register("memwarden_http_request_duration_seconds", "API request latency", http.latency.clone());

        let version = Build { version: env!("CARGO_PKG_VERSION").into() };
        build.get_or_create(&version).set(1);
        start.get_or_create(&version).set(self.started_ms as f64 / 1000.0);

        let view = ModelView::snapshot(&self.supervisor);
        let models: Vec<(&memwarden_protocol::ModelInfo, &String)> =
            view.callable_models().map(|(m, h)| (m, &h.slot.id)).collect();
        for id in self.service.device_ids() {
            let device = id.to_string();
            let d = Dev { device: device.clone() };
            let Ok(st) = self.service.status(id) else {
                healthy.get_or_create(&d).set(0);
                continue;
            };
            healthy.get_or_create(&d).set(u64::from(st.fault.is_none()));
            total.get_or_create(&d).set(st.total_bytes);
            used.get_or_create(&d).set(st.used_bytes);
            available.get_or_create(&d).set(st.available_bytes);
            reservation.get_or_create(&d).set(st.reservation_bytes);
            frag.get_or_create(&d).set(st.fragmentation());
            utilization.get_or_create(&d).set(st.utilization());
            for (kind, p) in &st.pools {
                let k = DevKind { device: device.clone(), memory_type: kind.to_string() };
                reserved.get_or_create(&k).set(p.reserved_bytes);
                allocated.get_or_create(&k).set(p.allocated_bytes);
            }
            if let Ok(p) = self.pressure.report(id) {
                pressure.get_or_create(&d).set(p.level as u64);
                for l in ["low", "moderate", "high", "critical"] {
                    let labels = Level { device: device.clone(), level: l.into() };
                    pressure_state.get_or_create(&labels).set(u64::from(p.level.as_str() == l));
                }
            }
            let c = self.service.device_record(id).counters;
            allocs.get_or_create(&d).inc_by(c.allocations);
            alloc_bytes.get_or_create(&d).inc_by(c.allocated_bytes);
            frees.get_or_create(&d).inc_by(c.frees);
            freed_bytes.get_or_create(&d).inc_by(c.freed_bytes);
            failures.get_or_create(&d).inc_by(c.failed_allocations);
            moves.get_or_create(&d).inc_by(c.moves);
            exports.get_or_create(&d).inc_by(c.exports);
            transfers.get_or_create(&d).inc_by(c.transfers);
            for (dir, v) in [("out", c.transfer_out_bytes), ("in", c.transfer_in_bytes)] {
                transfer_bytes.get_or_create(&DevDirection { device: device.clone(), direction: dir.into() }).inc_by(v);
            }
            defrag_runs.get_or_create(&d).inc_by(c.defrag_runs);
            defrag_moved.get_or_create(&d).inc_by(c.defrag_moved_bytes);
            defrag_released.get_or_create(&d).inc_by(c.defrag_released_bytes);
            device_models.get_or_create(&d).set(models.iter().map(|(m, _)| bytes_on(m, &device)).sum());
        }
        for (m, worker) in &models {
            let devices: Vec<(String, u64)> = if m.bytes_by_device.is_empty() {
                vec![(m.device_id.clone(), m.size_bytes)]
            } else {
                m.bytes_by_device.iter().map(|(d, b)| (d.clone(), *b)).collect()
            };
            for (device, bytes) in devices {
                let l = ModelLabels { model: m.model_id.clone(), device, worker: worker.to_string() };
                model_bytes.get_or_create(&l).set(bytes);
            }
            model_info
                .get_or_create(&ModelInfoLabels {
                    model: m.model_id.clone(),
                    name: m.model_name.clone(),
                    device: m.device_id.clone(),
                    worker: worker.to_string(),
                    backend: m.backend.clone().unwrap_or_default(),
                    pinned: m.pinned.to_string(),
                })
                .set(1);
        }
        for slot in self.supervisor.slots() {
            let snap = slot.snapshot();
            for s in [
                WorkerState::Starting,
                WorkerState::Ready,
                WorkerState::Unhealthy,
                WorkerState::Restarting,
                WorkerState::Stopped,
            ] {
                let labels = WorkerStateLabels { worker: slot.id.clone(), state: worker_state_name(s).into() };
                worker_state.get_or_create(&labels).set(u64::from(snap.state == s));
            }
            worker_restarts.get_or_create(&Worker { worker: slot.id.clone() }).inc_by(u64::from(snap.restarts));
        }
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &r)?;
        Ok(out)
    }
}

fn worker_state_name(s: WorkerState) -> &'static str {
    match s {
        WorkerState::Starting => "starting",
        WorkerState::Ready => "ready",
        WorkerState::Unhealthy => "unhealthy",
        WorkerState::Restarting => "restarting",
        WorkerState::Stopped => "stopped",
    }
}
