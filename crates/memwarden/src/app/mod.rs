//! The application layer: one module per operation, each a plain function over [`App`] that
//! every way the operation arrives calls (an HTTP handler, a request on the socket, a background
//! operation), so a handler only parses, calls one use case and renders.
//!
//! [`App`] holds the daemon's rooms; its fields are private to this layer, so nothing above it
//! (the HTTP handlers, the socket's requests) reaches a room except through a use case. The
//! types the use cases take and return are re-exported here, the layer's vocabulary.

pub mod allocations;
pub mod devices;
pub mod error;
pub mod hand_off;
pub mod load;
pub mod models;
pub mod observe;
pub mod optimize;
pub mod pools;
pub mod residency;
pub mod socket;
pub mod transfers;

#[cfg(test)]
mod room_tests;

use crate::analytics::Analytics;
use crate::config::Config;
use crate::operations::Operations;
use crate::optimizer::Optimizer;
use crate::placement::Placement;
use crate::pressure::PressureMonitor;
use crate::service::Service;
use crate::supervisor::Supervisor;
use crate::weights::WeightStore;
use std::sync::Arc;

pub use crate::analytics::metrics::{HttpMetrics, CONTENT_TYPE as METRICS_CONTENT_TYPE};
pub use crate::operations::{Operation, Progress, FINISHED_KEPT, KEEP_FOR};
pub use crate::optimizer::admission::AdmissionError;
pub use crate::pressure::{PressureEvent, PressureReport};
pub use crate::service::{
    AllocateRequest, Allocation, AllocationFilter, AllocationPage, AllocationRecord, BackendHealth, CanAllocate,
    ClearOutcome, DefragReport, DeviceStatus, ExportInfo, ExportVia, FreedAllocation, ListPosition, OwnerUsage,
    OwnersReport, PoolDump, QuotaUse, ServiceError, TransferRecord, TransferRequest, TransferStatus, TransferTarget,
    DEFAULT_ALIGNMENT_BYTES,
};
pub use crate::supervisor::SupervisorError;
pub use crate::weights::{ActionOutcome, HeldModel, WeightsError};
pub use error::AppError;
pub use load::LoadError;

/// The daemon's rooms, wired once ([`App::start`]): the memory service, the placement room, the
/// model workers, the pressure monitor, the optimizer, the analytics, the weights memwarden holds
/// and the operations running in the background.
pub struct App {
    service: Arc<Service>,
    placement: Arc<Placement>,
    supervisor: Arc<Supervisor>,
    pressure: Arc<PressureMonitor>,
    optimizer: Arc<Optimizer>,
    analytics: Arc<Analytics>,
    weights: Arc<WeightStore>,
    operations: Arc<Operations>,
}

impl App {
    /// Builds every room over `service` in dependency order and starts their background work
    /// (the pressure sampler, the workers, the weights policy, the optimizer's watchdog, the
    /// analytics' sampler).
    pub async fn start(service: Arc<Service>, config: &Config) -> Arc<App> {
        let pressure = PressureMonitor::new(service.clone(), service.host_signals(), config.pressure.clone());
        pressure.start();
        let supervisor = Supervisor::new(
            config.workers.clone(),
            service.device_ids().iter().map(|d| d.to_string()).collect(),
            crate::models::process::ProcessMeter::new(
                config.host.proc_root.clone(),
                (!config.host.shared_memory_dir.as_os_str().is_empty()).then(|| config.host.shared_memory_dir.clone()),
            ),
        );
        let weights = WeightStore::for_service(&service, config);
        let optimizer = Optimizer::new(
            service.clone(),
            supervisor.clone(),
            Some(weights.clone()),
            config.optimizer.clone(),
            pressure.thresholds(),
        );
        let placement = Placement::new(service.clone(), supervisor.clone(), optimizer.clone());
        let analytics = Analytics::new(
            service.clone(),
            supervisor.clone(),
            pressure.clone(),
            config.analytics.clone(),
            config.advice_thresholds(),
        );
        let app = Arc::new(App {
            service: service.clone(),
            placement,
            supervisor: supervisor.clone(),
            pressure: pressure.clone(),
            optimizer: optimizer.clone(),
            analytics: analytics.clone(),
            weights: weights.clone(),
            operations: Operations::new(),
        });
        // The one setter left, a real cycle at run time: the supervisor carries the socket's
        // requests, which this layer answers, and this layer asks the supervisor's workers to
        // load and release models. Registered before any worker starts; it holds the app
        // weakly, so the two do not keep each other alive.
        supervisor.set_conn_requests(Arc::new(socket::SocketRequests(Arc::downgrade(&app))));
        crate::weights::policy::KeepAlive::start(&weights);
        supervisor.start().await;
        optimizer.start_watchdog(pressure.subscribe());
        analytics.start();
        app
    }

    /// Stops the workers (the server has stopped taking requests).
    pub async fn shutdown(&self) {
        self.supervisor.shutdown().await;
    }
}
