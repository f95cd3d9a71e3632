//! Loading a model: the one admit → load → give the ticket back sequence, whichever way the
//! load arrives (`POST /api/memory/models/load`, held or by a worker, synchronous or as an
//! operation; a peer's `loadWeights`), with the file's header read once for all of it (the
//! admission estimate, the operation's total and the load itself). Admission makes room when
//! the device is full (idle held models parked first: [`crate::optimizer::room`]).

use super::error::AppError;
use super::App;
use crate::operations::Progress;
use crate::optimizer::admission::{AdmissionError, Ticket};
use crate::optimizer::Optimizer;
use crate::placement::Placement;
use crate::weights::checkpoint::{Checkpoint, Pipeline};
use crate::weights::file::ModelFile;
use crate::weights::{Attached, LoadRequest, WeightHolder, WeightStore, WeightsError};
use memwarden_core::DeviceId;
use memwarden_protocol::api::{HeldPipelineDto, LoadBody, LoadedDto, LoadedModelDto, WeightState};
use memwarden_protocol::{LoadModel, Role, DEFAULT_PRIORITY};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

/// Why a load failed: refused by admission, or by the load itself.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// What a model load needs of the daemon.
pub struct Loads<'a> {
    pub optimizer: &'a Optimizer,
    pub weights: &'a Arc<WeightStore>,
}

impl Loads<'_> {
    /// Loads `req` (one model: a file, an index or a model folder) into memwarden's memory (or
    /// shares the copy already held) through admission,
    /// reporting to `progress`. `holder` maps it at once (a peer's `loadWeights`); with
    /// `hand_to`, a model freshly read is handed to the least loaded worker that can map it.
    pub async fn held(
        &self,
        req: LoadRequest,
        holder: Option<Arc<dyn WeightHolder>>,
        progress: Option<Arc<Progress>>,
        hand_to: Option<&Placement>,
    ) -> Result<Attached, LoadError> {
        self.weights.check_device(req.device)?;
        let path = req.path.clone();
        // The header, read once: a file that is missing or broken fails here, before admission.
        let file = tokio::task::spawn_blocking(move || ModelFile::open(&path))
            .await
            .map_err(|e| WeightsError::Internal(format!("worker thread: {e}")))??;
        self.held_file(file, req, holder, progress, hand_to).await
    }

    /// [`Loads::held`] of a model whose headers were read ([`ModelFile::open`]).
    pub async fn held_file(
        &self,
        file: ModelFile,
        req: LoadRequest,
        holder: Option<Arc<dyn WeightHolder>>,
        progress: Option<Arc<Progress>>,
        hand_to: Option<&Placement>,
    ) -> Result<Attached, LoadError> {
        if let Some(p) = &progress {
            p.set_total(file.data_bytes);
        }
        let label = req.name.clone().unwrap_or_else(|| req.path.display().to_string());
        let estimate = held_bytes_of(file.data_bytes);
        let device = req.device;
        // A copy of the file resident on the device already is shared: it takes no memory, so
        // there is nothing to admit (and nothing to park for it, least of all itself).
        let identity = file.identity();
        let shared = self.weights.models().iter().any(|m| {
            m.file.identity() == identity
                && m.device() == device
                && matches!(m.state(), WeightState::Resident | WeightState::Orphaned)
        });
        let optimizer = self.optimizer;
        let attempt = |admit: bool| {
            let (weights, file, req, holder, progress, label) =
                (self.weights.clone(), file.clone(), req.clone(), holder.clone(), progress.clone(), label.clone());
            async move {
                let load = async move { weights.load_file(file, req, holder, progress).await.map_err(LoadError::from) };
                if admit {
                    admitted(optimizer, device, Some(estimate), &label, load).await
                } else {
                    load.await
                }
            }
        };
        let attached = match attempt(!shared).await {
            // Admitted, but the room was taken before the load allocated it (a resume, or a
            // process outside memwarden), or the shared copy was parked meanwhile: admission
            // runs (again), and makes room this time.
            Err(LoadError::Weights(WeightsError::InsufficientMemory { .. })) => attempt(true).await,
            other => other,
        }?;
        if let Some(placement) = hand_to.filter(|_| !attached.reused) {
            super::hand_off::hand_to_worker(self.weights, placement, &attached.model).await;
        }
        Ok(attached)
    }
}

/// The device memory a held model takes: its tensor bytes, rounded up to the largest block
/// granularity a backend uses for dedicated memory (2 MiB, CUDA's VMM granularity). A held
/// model needs no allocator state of its own, unlike a worker's
/// ([`crate::models::estimate::model_bytes_of`]), so admission asks for no more than this: on a
/// full card it parks as little as it can.
fn held_bytes_of(data_bytes: u64) -> u64 {
    const GRANULARITY: u64 = 2 * memwarden_core::units::MIB;
    data_bytes.div_ceil(GRANULARITY).max(1) * GRANULARITY
}

/// Who holds a model loaded by `POST /api/memory/models/load`: memwarden (`true`) or a worker.
/// Without `held_by`, memwarden where it can hold weights on the device.
pub fn held_by_memwarden(app: &App, device: DeviceId, held_by: Option<&str>) -> Result<bool, AppError> {
    match held_by {
        None | Some("memwarden") if app.weights.holds_device(device) => Ok(true),
        Some("memwarden") => {
            Err(AppError::DeviceUnavailable(format!("memwarden cannot hold weights on {device}; use heldBy: worker")))
        }
        None | Some("worker") => Ok(false),
        Some(other) => Err(AppError::Invalid(format!("heldBy must be memwarden or worker, got {other:?}"))),
    }
}

/// The device of a load: the one the request names, else where placement puts models.
pub fn device_for(app: &App, requested: Option<&str>) -> Result<DeviceId, AppError> {
    Ok(app.placement.device_for_load(requested)?)
}

/// Loads a model whose request was checked: into memwarden's memory (`held`), reporting the
/// bytes read to `progress`, or by a worker (waiting for one that is starting).
pub async fn load(
    app: &App,
    device: DeviceId,
    held: bool,
    body: LoadBody,
    progress: Option<Arc<Progress>>,
) -> Result<LoadedDto, AppError> {
    if held {
        let req = LoadRequest {
            path: body.path.into(),
            device,
            name: body.name,
            priority: body.priority.unwrap_or(DEFAULT_PRIORITY),
            pinned: body.pinned,
            keep_alive_ms: body.keep_alive_ms,
        };
        let path = req.path.clone();
        // The headers (and indexes), read once: broken input fails here, before admission.
        let checkpoint = tokio::task::spawn_blocking(move || Checkpoint::open(&path))
            .await
            .map_err(|e| WeightsError::Internal(format!("worker thread: {e}")))??;
        let loaded = match checkpoint {
            Checkpoint::Model(file) => {
                let loads = Loads { optimizer: &app.optimizer, weights: &app.weights };
                loads
                    .held_file(file, req, None, progress, Some(&app.placement))
                    .await
                    .map(|a| LoadedDto::Held(Box::new(app.weights.dto(&a.model))))
            }
            Checkpoint::Pipeline(p) => held_pipeline(app, p, req, progress).await.map(LoadedDto::Pipeline),
        };
        let _ = app.service.measure_now(device);
        let _ = app.service.measure_now(DeviceId::Cpu);
        return Ok(loaded?);
    }
    let dev = device.to_string();
    app.supervisor.wait_while_starting(|s| s.role == Role::Worker && s.serves(&dev)).await;
    if app.supervisor.slots().iter().all(|s| s.conn().is_none()) {
        return Err(crate::supervisor::SupervisorError::Unavailable(app.supervisor.unavailable_reason()).into());
    }
    let loaded = by_worker(app, device, body, progress.clone()).await?;
    if let Some(p) = progress {
        // The worker says nothing until it is done: then every byte is in.
        p.set(p.total(), p.total());
    }
    Ok(LoadedDto::Worker(loaded))
}

/// Loads each component of a pipeline that has weights as a held model of its own, named
/// `group/component` (the group: the load's `name`, else the folder's). A component that fails
/// fails the load, and the components this load read are unloaded again.
async fn held_pipeline(
    app: &App,
    pipeline: Pipeline,
    req: LoadRequest,
    progress: Option<Arc<Progress>>,
) -> Result<HeldPipelineDto, LoadError> {
    let group = req.name.clone().unwrap_or(pipeline.group);
    let total: u64 = pipeline.components.iter().map(|c| c.data_bytes).sum();
    if let Some(p) = &progress {
        p.set_total(total);
    }
    let loads = Loads { optimizer: &app.optimizer, weights: &app.weights };
    let mut held: Vec<Attached> = Vec::new();
    for mut file in pipeline.components {
        let component = file.component.clone().unwrap_or_default();
        file.group = Some(group.clone());
        let req = LoadRequest { path: file.path.clone(), name: Some(format!("{group}/{component}")), ..req.clone() };
        let bytes = file.data_bytes;
        match loads.held_file(file, req, None, None, Some(&app.placement)).await {
            Ok(a) => held.push(a),
            Err(e) => {
                for a in held.iter().filter(|a| !a.reused) {
                    if let Err(undo) = app.weights.unload(&a.model.id).await {
                        tracing::warn!(model = %a.model.id, "a pipeline's component stays held after the load failed: {undo}");
                    }
                }
                return Err(e);
            }
        }
        if let Some(p) = &progress {
            p.add(bytes);
        }
    }
    Ok(HeldPipelineDto {
        path: pipeline.path.display().to_string(),
        group,
        size_bytes: total,
        components: held.iter().map(|a| app.weights.dto(&a.model)).collect(),
    })
}

/// A worker's load through admission: the estimate from the header (read once), the worker
/// placement picks, the ticket given back however the load ends.
pub async fn by_worker(
    app: &App,
    device: DeviceId,
    body: LoadBody,
    progress: Option<Arc<Progress>>,
) -> Result<LoadedModelDto, AppError> {
    let declared = declared_bytes(Path::new(&body.path)).await;
    if let Some(p) = &progress {
        let size = || std::fs::metadata(&body.path).map(|m| m.len()).ok();
        if let Some(total) = declared.or_else(size) {
            p.set_total(total);
        }
    }
    let estimate = declared.map(|b| crate::models::estimate::model_bytes_of(b, device));
    let label = body.name.clone().unwrap_or_else(|| body.path.clone());
    let req = LoadModel {
        path: body.path,
        name: body.name,
        device_id: device.to_string(),
        priority: body.priority.unwrap_or(DEFAULT_PRIORITY),
        pinned: body.pinned,
        model_id: None,
        weights: None,
    };
    admitted(&app.optimizer, device, estimate, &label, async {
        let slot = app.placement.worker_for_load(&req.device_id).await?;
        let info = app.supervisor.load_on(&slot, req).await?;
        let pid = slot.snapshot().pid.unwrap_or(0);
        Ok::<_, AppError>(LoadedModelDto::new(&info, &slot.id, pid))
    })
    .await
}

/// The tensor bytes a `.safetensors` header names, read here once (the header alone), for an
/// admission estimate and an operation's total; `None` when the header cannot be read here (a
/// worker, more lenient about headers, decides).
pub async fn declared_bytes(path: &Path) -> Option<u64> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || Checkpoint::declared_bytes(&path).ok()).await.ok().flatten()
}

/// Runs `load` holding an admission ticket for `estimate` bytes on `device` (none when the
/// size is unknown: nothing to reserve), and gives the ticket back however the load ends.
pub async fn admitted<T, E: From<AdmissionError>>(
    optimizer: &Optimizer,
    device: DeviceId,
    estimate: Option<u64>,
    label: &str,
    load: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let ticket = optimizer.admit(device, estimate, label).await?;
    // Given back on drop too: a request cancelled mid-load (its client hung up) leaves no
    // reservation behind.
    let _ticket = TicketGuard(optimizer, Some(ticket));
    load.await
}

/// An admission ticket held while a load runs.
struct TicketGuard<'a>(&'a Optimizer, Option<Ticket>);

impl Drop for TicketGuard<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.1.take() {
            self.0.release_ticket(t);
        }
    }
}

impl From<LoadError> for AppError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Admission(e) => e.into(),
            LoadError::Weights(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::models::process::ProcessMeter;
    use crate::service::Service;
    use crate::supervisor::Supervisor;
    use memwarden_core::units::MIB;
    use memwarden_core::MemoryKind;
    use std::time::Duration;

    fn optimizer() -> (Arc<Service>, Arc<Optimizer>) {
        let config = Config::default();
        let service = Arc::new(Service::from_config(&config));
        let supervisor =
            Supervisor::new(config.workers.clone(), vec!["cpu".into()], ProcessMeter::new("/proc".into(), None));
        let thresholds = memwarden_core::pressure::PressureThresholds::default();
        let optimizer = Optimizer::new(service.clone(), supervisor, None, config.optimizer.clone(), thresholds);
        (service, optimizer)
    }

    fn reservations(service: &Service) -> usize {
        service.allocations(Some(DeviceId::Cpu)).iter().filter(|a| a.kind == MemoryKind::Reservation).count()
    }

    /// The ticket is held while the load runs and given back however it ends: done, failed, or
    /// dropped half-way (a request whose client hung up).
    #[tokio::test]
    async fn the_admission_ticket_is_given_back_however_the_load_ends() {
        let (service, optimizer) = optimizer();
        let s = service.clone();
        let ok: Result<usize, AdmissionError> =
            admitted(&optimizer, DeviceId::Cpu, Some(MIB), "ok", async move { Ok(reservations(&s)) }).await;
        assert_eq!(ok.expect("admitted"), 1, "held while loading");
        assert_eq!(reservations(&service), 0, "given back after");
        let failed: Result<(), AdmissionError> = admitted(&optimizer, DeviceId::Cpu, Some(MIB), "failed", async {
            Err(AdmissionError::InsufficientMemory("the load failed".into()))
        })
        .await;
        assert!(failed.is_err());
        assert_eq!(reservations(&service), 0, "given back after a failure");
        let hung = admitted(
            &optimizer,
            DeviceId::Cpu,
            Some(MIB),
            "cancelled",
            std::future::pending::<Result<(), AdmissionError>>(),
        );
        assert!(tokio::time::timeout(Duration::from_millis(50), hung).await.is_err());
        assert_eq!(reservations(&service), 0, "given back when the load is dropped half-way");
        let unknown: Result<(), AdmissionError> =
            admitted(&optimizer, DeviceId::Cpu, None, "unknown size", async { Ok(()) }).await;
        assert!(unknown.is_ok(), "no estimate: nothing to reserve, the load goes on");
    }
}
