//! `GET /metrics`: the Prometheus text exposition (format 0.0.4), encoded by
//! `prometheus-client`. Device, pool, pressure, model and worker figures are read at scrape
//! time from the same sources as `/api/memory/status` and `/api/memory/models`; counters are
//! the service's cumulative counters; request latencies are a histogram the API middleware
//! fills. Names carry base units (`_bytes`, `_seconds`, `_total`); label values come from
//! bounded sets (devices, memory kinds, route templates, worker ids and states, loaded models).

use super::Analytics;
use crate::models::{bytes_on, placements, ModelView};
use crate::supervisor::WorkerState;
use memwarden_core::DeviceId;
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

/// A device's memory now: status, pools, pressure, models.
struct DeviceGauges {
    total: Family<Dev, GaugeU>,
    used: Family<Dev, GaugeU>,
    available: Family<Dev, GaugeU>,
    reserved: Family<DevKind, GaugeU>,
    allocated: Family<DevKind, GaugeU>,
    reservation: Family<Dev, GaugeU>,
    frag: Family<Dev, GaugeF>,
    pressure: Family<Dev, GaugeU>,
    pressure_state: Family<Level, GaugeU>,
    healthy: Family<Dev, GaugeU>,
    utilization: Family<Dev, GaugeF>,
    models: Family<Dev, GaugeU>,
}

impl DeviceGauges {
    fn register(r: &mut Registry) -> Self {
        let b = || Some(Unit::Bytes);
        DeviceGauges {
            total: family(r, "memwarden_device_total", "Total memory of the device", b()),
            used: family(r, "memwarden_device_used", "Used memory of the device (OS or driver)", b()),
            available: family(r, "memwarden_device_available", "Available memory of the device (OS or driver)", b()),
            reserved: family(
                r,
                "memwarden_pool_reserved",
                "Memory memwarden's pools hold from the OS or driver, per memory kind",
                b(),
            ),
            allocated: family(
                r,
                "memwarden_pool_allocated",
                "Memory of live memwarden allocations, per memory kind",
                b(),
            ),
            reservation: family(
                r,
                "memwarden_device_reservation",
                "Bytes promised to reservations (admission tickets)",
                b(),
            ),
            frag: family(
                r,
                "memwarden_device_fragmentation_ratio",
                "Fragmentation index of memwarden's pools (1 - largest free range / free bytes)",
                None,
            ),
            pressure: family(
                r,
                "memwarden_device_pressure_level",
                "Pressure level: 0 low, 1 moderate, 2 high, 3 critical",
                None,
            ),
            pressure_state: family(
                r,
                "memwarden_device_pressure",
                "1 for the device's current pressure level, 0 for the others",
                None,
            ),
            healthy: family(
                r,
                "memwarden_device_healthy",
                "1 when the device's status reads without a driver fault, 0 otherwise",
                None,
            ),
            utilization: family(r, "memwarden_device_utilization_ratio", "Used over total memory (0-1)", None),
            models: family(r, "memwarden_device_models", "Memory of all models on the device", b()),
        }
    }

    fn fill(&self, a: &Analytics, id: DeviceId, model_bytes: u64) {
        let device = id.to_string();
        let d = Dev { device: device.clone() };
        let Ok(st) = a.service.status(id) else {
            self.healthy.get_or_create(&d).set(0);
            return;
        };
        self.healthy.get_or_create(&d).set(u64::from(st.fault.is_none()));
        self.total.get_or_create(&d).set(st.total_bytes);
        self.used.get_or_create(&d).set(st.used_bytes);
        self.available.get_or_create(&d).set(st.available_bytes);
        self.reservation.get_or_create(&d).set(st.reservation_bytes);
        self.frag.get_or_create(&d).set(st.fragmentation());
        self.utilization.get_or_create(&d).set(st.utilization());
        for (kind, p) in &st.pools {
            let k = DevKind { device: device.clone(), memory_type: kind.to_string() };
            self.reserved.get_or_create(&k).set(p.reserved_bytes);
            self.allocated.get_or_create(&k).set(p.allocated_bytes);
        }
        if let Ok(p) = a.pressure.report(id) {
            self.pressure.get_or_create(&d).set(p.level as u64);
            for l in ["low", "moderate", "high", "critical"] {
                let labels = Level { device: device.clone(), level: l.into() };
                self.pressure_state.get_or_create(&labels).set(u64::from(p.level.as_str() == l));
            }
        }
        self.models.get_or_create(&d).set(model_bytes);
    }
}

/// A device's cumulative counters (the service's recorder).
struct DeviceCounters {
    allocs: Family<Dev, Counter>,
    alloc_bytes: Family<Dev, Counter>,
    frees: Family<Dev, Counter>,
    freed_bytes: Family<Dev, Counter>,
    failures: Family<Dev, Counter>,
    moves: Family<Dev, Counter>,
    exports: Family<Dev, Counter>,
    transfers: Family<Dev, Counter>,
    transfer_bytes: Family<DevDirection, Counter>,
    defrag_runs: Family<Dev, Counter>,
    defrag_moved: Family<Dev, Counter>,
    defrag_released: Family<Dev, Counter>,
}

impl DeviceCounters {
    fn register(r: &mut Registry) -> Self {
        let b = || Some(Unit::Bytes);
        DeviceCounters {
            allocs: family(r, "memwarden_allocations", "Allocations made through memwarden", None),
            alloc_bytes: family(r, "memwarden_allocated", "Bytes allocated through memwarden", b()),
            frees: family(r, "memwarden_frees", "Allocations freed", None),
            freed_bytes: family(r, "memwarden_freed", "Bytes freed", b()),
            failures: family(r, "memwarden_allocation_failures", "Allocations that did not fit", None),
            moves: family(r, "memwarden_allocation_moves", "Allocations moved by defragmentation", None),
            exports: family(r, "memwarden_exports", "Allocations shared with another process", None),
            transfers: family(r, "memwarden_transfers", "Transfers and copies out of the device's allocations", None),
            transfer_bytes: family(r, "memwarden_transfer", "Bytes copied out of (out) and into (in) the device", b()),
            defrag_runs: family(r, "memwarden_defragmentations", "Defragmentation passes", None),
            defrag_moved: family(r, "memwarden_defragmentation_moved", "Bytes moved by defragmentation", b()),
            defrag_released: family(
                r,
                "memwarden_defragmentation_released",
                "Bytes returned to the OS or driver by defragmentation",
                b(),
            ),
        }
    }

    fn fill(&self, a: &Analytics, id: DeviceId) {
        let device = id.to_string();
        let d = Dev { device: device.clone() };
        let c = a.service.device_record(id).counters;
        self.allocs.get_or_create(&d).inc_by(c.allocations);
        self.alloc_bytes.get_or_create(&d).inc_by(c.allocated_bytes);
        self.frees.get_or_create(&d).inc_by(c.frees);
        self.freed_bytes.get_or_create(&d).inc_by(c.freed_bytes);
        self.failures.get_or_create(&d).inc_by(c.failed_allocations);
        self.moves.get_or_create(&d).inc_by(c.moves);
        self.exports.get_or_create(&d).inc_by(c.exports);
        self.transfers.get_or_create(&d).inc_by(c.transfers);
        for (dir, v) in [("out", c.transfer_out_bytes), ("in", c.transfer_in_bytes)] {
            self.transfer_bytes
                .get_or_create(&DevDirection { device: device.clone(), direction: dir.into() })
                .inc_by(v);
        }
        self.defrag_runs.get_or_create(&d).inc_by(c.defrag_runs);
        self.defrag_moved.get_or_create(&d).inc_by(c.defrag_moved_bytes);
        self.defrag_released.get_or_create(&d).inc_by(c.defrag_released_bytes);
    }
}

/// The models and the processes that hold them.
struct ProcessGauges {
    model_bytes: Family<ModelLabels, GaugeU>,
    model_info: Family<ModelInfoLabels, GaugeU>,
    worker_state: Family<WorkerStateLabels, GaugeU>,
    worker_restarts: Family<Worker, Counter>,
}

impl ProcessGauges {
    fn register(r: &mut Registry) -> Self {
        ProcessGauges {
            model_bytes: family(r, "memwarden_model", "Memory a loaded model holds on a device", Some(Unit::Bytes)),
            model_info: family(
                r,
                "memwarden_model_info",
                "1 per loaded model, with its holder and how it is held",
                None,
            ),
            worker_state: family(
                r,
                "memwarden_worker_state",
                "1 for the worker's current state, 0 for the others",
                None,
            ),
            worker_restarts: family(r, "memwarden_worker_restarts", "Restarts of a supervised worker", None),
        }
    }

    fn fill(&self, a: &Analytics, view: &ModelView) {
        for (m, holder) in view.callable_models() {
            let worker = holder.id().to_string();
            for (device, bytes) in placements(m) {
                let l = ModelLabels { model: m.model_id.clone(), device: device.to_string(), worker: worker.clone() };
                self.model_bytes.get_or_create(&l).set(bytes);
            }
            self.model_info
                .get_or_create(&ModelInfoLabels {
                    model: m.model_id.clone(),
                    name: m.model_name.clone(),
                    device: m.device_id.clone(),
                    worker,
                    backend: m.backend.clone().unwrap_or_default(),
                    pinned: m.pinned.to_string(),
                })
                .set(1);
        }
        for slot in a.supervisor.slots() {
            let snap = slot.snapshot();
            for s in [
                WorkerState::Starting,
                WorkerState::Ready,
                WorkerState::Unhealthy,
                WorkerState::Restarting,
                WorkerState::Stopped,
            ] {
                let labels = WorkerStateLabels { worker: slot.id.clone(), state: s.as_str().into() };
                self.worker_state.get_or_create(&labels).set(u64::from(snap.state == s));
            }
            self.worker_restarts.get_or_create(&Worker { worker: slot.id.clone() }).inc_by(u64::from(snap.restarts));
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WeightLabels {
    model: String,
    device: String,
    state: String,
    /// `resident` (device or shared host memory) or `parked` (pinned host memory).
    memory: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HeldModel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DevState {
    /// The device the model lives on when resident (a parked model's too).
    device: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolState {
    /// `free` (ready for the next park) or `parked` (holding parked models).
    state: String,
}

/// Model weights memwarden holds.
struct WeightGauges {
    bytes: Family<WeightLabels, GaugeU>,
    holders: Family<HeldModel, GaugeU>,
    /// Tensor bytes of the held models per device and state (a router's view of residency).
    by_state: Family<DevState, GaugeU>,
    /// Held models per device and state.
    count: Family<DevState, GaugeU>,
    pool: Family<PoolState, GaugeU>,
    pool_target: GaugeU,
    pool_path: Counter,
}

impl WeightGauges {
    fn register(r: &mut Registry) -> Self {
        WeightGauges {
            bytes: family(
                r,
                "memwarden_weights",
                "Memory held for a model's weights by memwarden, resident or parked",
                Some(Unit::Bytes),
            ),
            holders: family(r, "memwarden_weights_holders", "Processes mapping a held model's weights", None),
            by_state: family(
                r,
                "memwarden_held_model",
                "Tensor bytes of the models memwarden holds, by the device they live on when resident and their \
                 state (resident, parked, dropped, orphaned)",
                Some(Unit::Bytes),
            ),
            count: family(r, "memwarden_held_models", "Models memwarden holds, by device and state", None),
            pool: family(
                r,
                "memwarden_park_pool",
                "Pinned host memory registered for parking: free (ready for the next park) or parked",
                Some(Unit::Bytes),
            ),
            pool_target: {
                let g = GaugeU::default();
                r.register_with_unit(
                    "memwarden_park_pool_target_free",
                    "Free park pool bytes the pool grows to: the largest unpinned model on a GPU, at least \
                     weights.park_pool_bytes",
                    Unit::Bytes,
                    g.clone(),
                );
                g
            },
            pool_path: {
                let c = Counter::default();
                r.register(
                    "memwarden_park_pool_chunks_on_park_path",
                    "Park pool chunks a park had to register on its own path (the pool was short)",
                    c.clone(),
                );
                c
            },
        }
    }

    fn fill(&self, weights: &[memwarden_protocol::api::HeldModelDto], pool: Option<crate::weights::PoolStats>) {
        use memwarden_protocol::api::WeightState;
        let states = [WeightState::Resident, WeightState::Parked, WeightState::Dropped, WeightState::Orphaned];
        // Every state of every device that holds a model, zeros too: the series stay put.
        for w in weights {
            for s in states {
                let l = DevState { device: w.device_id.clone(), state: s.as_str().to_string() };
                self.by_state.get_or_create(&l).set(0);
                self.count.get_or_create(&l).set(0);
            }
        }
        for w in weights {
            let l = DevState { device: w.device_id.clone(), state: w.state.as_str().to_string() };
            self.by_state.get_or_create(&l).inc_by(w.size_bytes);
            self.count.get_or_create(&l).inc();
        }
        if let Some(p) = pool {
            let free = p.free_bytes.min(p.registered_bytes);
            self.pool.get_or_create(&PoolState { state: "free".into() }).set(free);
            self.pool.get_or_create(&PoolState { state: "parked".into() }).set(p.registered_bytes - free);
            self.pool_target.set(p.target_free_bytes);
            self.pool_path.inc_by(p.chunks_on_park_path);
        }
        for w in weights {
            for (memory, bytes, device) in
                [("resident", w.resident_bytes, w.device_id.as_str()), ("parked", w.parked_bytes, "cpu")]
            {
                let l = WeightLabels {
                    model: w.model_id.clone(),
                    device: device.to_string(),
                    state: w.state.as_str().to_string(),
                    memory: memory.to_string(),
                };
                self.bytes.get_or_create(&l).set(bytes);
            }
            self.holders.get_or_create(&HeldModel { model: w.model_id.clone() }).set(w.holders.len() as u64);
        }
    }
}

/// The whole exposition of `a`'s figures, measured now; `weights`: the models memwarden holds.
/// The metric families are made afresh for each exposition: nothing here keeps state.
pub(super) fn render(
    a: &Analytics,
    http: &HttpMetrics,
    weights: &[memwarden_protocol::api::HeldModelDto],
    park_pool: Option<crate::weights::PoolStats>,
) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();
    let gauges = DeviceGauges::register(&mut r);
    let counters = DeviceCounters::register(&mut r);
    let holders = ProcessGauges::register(&mut r);
    let held = WeightGauges::register(&mut r);
    let build: Family<Build, GaugeU> = family(&mut r, "memwarden_build_info", "The daemon's version", None);
    let start: Family<Build, GaugeF> =
        family(&mut r, "memwarden_start_time_seconds", "When the daemon started, Unix seconds", None);
    r.register("memwarden_http_request_duration_seconds", "API request latency", http.latency.clone());

    let version = Build { version: env!("CARGO_PKG_VERSION").into() };
    build.get_or_create(&version).set(1);
    start.get_or_create(&version).set(a.started_ms as f64 / 1000.0);
    let view = ModelView::snapshot(&a.supervisor);
    for id in a.service.device_ids() {
        let dev = id.to_string();
        gauges.fill(a, id, view.callable_models().map(|(m, _)| bytes_on(m, &dev)).sum());
        counters.fill(a, id);
    }
    holders.fill(a, &view);
    held.fill(weights, park_pool);
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &r)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use memwarden_protocol::api::{HeldModelDto, WeightState};

    fn held(id: &str, device: &str, state: WeightState, size_bytes: u64) -> HeldModelDto {
        HeldModelDto {
            model_id: id.into(),
            name: id.into(),
            path: format!("/m/{id}.safetensors"),
            files: Vec::new(),
            component: None,
            group: None,
            device_id: device.into(),
            state,
            size_bytes,
            resident_bytes: if state == WeightState::Resident { size_bytes } else { 0 },
            parked_bytes: if state == WeightState::Parked { size_bytes } else { 0 },
            tensor_count: 1,
            hash: String::new(),
            holders: Vec::new(),
            priority: 50,
            pinned: false,
            keep_alive_ms: None,
            loaded_at: String::new(),
            last_used: String::new(),
            load: None,
            last_park: None,
            last_resume: None,
            resume_estimate_ms: 0,
            orphaned_until: None,
        }
    }

    #[test]
    fn held_weights_are_summed_per_device_and_state_with_the_park_pool() {
        let mut r = Registry::default();
        let gauges = WeightGauges::register(&mut r);
        let weights = [
            held("w-1", "cuda:0", WeightState::Parked, 100),
            held("w-2", "cuda:0", WeightState::Parked, 20),
            held("w-3", "cuda:0", WeightState::Resident, 7),
            held("w-4", "cuda:1", WeightState::Dropped, 5),
        ];
        let pool = crate::weights::PoolStats {
            registered_bytes: 768,
            free_bytes: 256,
            target_free_bytes: 256,
            max_bytes: 1024,
            chunks_on_park_path: 3,
        };
        gauges.fill(&weights, Some(pool));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &r).expect("encode");
        for line in [
            "memwarden_held_model_bytes{device=\"cuda:0\",state=\"parked\"} 120",
            "memwarden_held_model_bytes{device=\"cuda:0\",state=\"resident\"} 7",
            "memwarden_held_model_bytes{device=\"cuda:0\",state=\"dropped\"} 0",
            "memwarden_held_model_bytes{device=\"cuda:1\",state=\"dropped\"} 5",
            "memwarden_held_models{device=\"cuda:0\",state=\"parked\"} 2",
            "memwarden_held_models{device=\"cuda:1\",state=\"resident\"} 0",
            "memwarden_park_pool_bytes{state=\"free\"} 256",
            "memwarden_park_pool_bytes{state=\"parked\"} 512",
            "memwarden_park_pool_target_free_bytes 256",
            "memwarden_park_pool_chunks_on_park_path_total 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
    }
}
