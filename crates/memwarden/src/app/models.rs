//! Listing model memory (`GET /api/memory/models`): every model the workers and clients report
//! and the weights memwarden holds, per device, beside what the OS and NVML say the processes
//! hold. Each byte is counted once, where it lives: a model a process maps from memwarden is
//! memwarden's (`heldModelMemory`), not the process's.

use crate::models::process::ProcessMeter;
use crate::models::{ModelProcess, ModelView};
use crate::service::{DeviceStatus, Service, ServiceError};
use crate::supervisor::{Supervisor, SupervisorError};
use crate::weights::WeightStore;
use memwarden_core::DeviceId;
use memwarden_protocol::api::{
    rfc3339, AllocatorDto, CoordinationDto, CoordinationMode, DeviceModelsDto, HeldModelDto, LoadedModelDto,
    ModelMemoryDto, ModelsDto, SystemMemoryDto, WorkerDto,
};
use memwarden_protocol::Role;
use std::collections::{BTreeMap, HashMap};

/// Why the listing could not answer: every connected worker failed (a hung one is a timeout),
/// or the devices' status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

/// What the listing reads.
pub struct Listing<'a> {
    pub service: &'a Service,
    pub supervisor: &'a Supervisor,
    pub weights: &'a WeightStore,
}

/// What the processes hold on one device, summed over them.
#[derive(Default)]
struct Measured {
    models: HashMap<String, Vec<LoadedModelDto>>,
    bytes: HashMap<String, u64>,
    /// Devices where a process with models has no figure.
    unmeasured: HashMap<String, bool>,
}

/// The models on every device (or on `device`), as the listing shows them.
pub async fn list(app: &super::App, device: Option<DeviceId>) -> Result<ModelsDto, super::error::AppError> {
    let listing = Listing { service: &app.service, supervisor: &app.supervisor, weights: &app.weights };
    Ok(listing.list(device).await?)
}

impl Listing<'_> {
    /// Asks every connected worker and client for its models (a worker still starting is waited
    /// for, at most `workers.ready_wait_ms`) and lists them, on `device` or on every device.
    /// With nobody to ask it still answers: system memory only (`fallback`, with the reason).
    pub async fn list(&self, device: Option<DeviceId>) -> Result<ModelsDto, ListError> {
        let sup = self.supervisor;
        sup.wait_while_starting(|_| true).await;
        let results = sup.sync().await;
        if !results.is_empty() && results.iter().all(|(_, e)| e.is_some()) {
            let errors = || results.iter().filter_map(|(_, e)| e.as_ref());
            // A hung worker is a timeout, a broken one its error; workers that all went away
            // during the call leave nobody to ask: the fallback below.
            let timeout = errors().find(|e| matches!(e, SupervisorError::Timeout { .. }));
            if let Some(e) = timeout.or_else(|| errors().find(|e| !matches!(e, SupervisorError::Unavailable(_)))) {
                return Err(e.clone().into());
            }
        }
        // Nobody to ask: the seed's fallback, system memory only (never WORKER_UNAVAILABLE here).
        let fallback = results.iter().all(|(_, e)| e.is_some()).then(|| sup.unavailable_reason());
        // Every device's status (a worker's process is measured on all of them); the listing
        // shows the one asked for.
        let all_statuses = self.service.status_all()?;
        let all_weights = self.weights.list();
        let mut measured = Measured::default();
        let mut workers = Vec::new();
        for process in &ModelView::snapshot(sup).processes {
            let (dto, models, bytes) = worker_dto(process, sup.meter(), &all_statuses);
            for m in models {
                measured.models.entry(m.device_id.clone()).or_default().push(m);
            }
            for (dev, b) in bytes {
                match b {
                    Some(b) => *measured.bytes.entry(dev).or_default() += b,
                    None => {
                        measured.unmeasured.insert(dev, true);
                    }
                }
            }
            workers.push(dto);
        }
        let devices = all_statuses
            .iter()
            .filter(|s| device.is_none_or(|d| s.device == d))
            .map(|s| device_row(s, &mut measured, &all_weights, fallback.is_some()))
            .collect();
        let synchronized = fallback.is_none() && results.iter().all(|(_, e)| e.is_none());
        Ok(ModelsDto {
            devices,
            coordination_status: CoordinationDto {
                mode: if fallback.is_some() { CoordinationMode::Fallback } else { CoordinationMode::Coordinated },
                reason: fallback,
                synchronized,
                last_sync: sup.last_sync().map(rfc3339),
                socket: sup.socket_path().map(|p| p.display().to_string()),
                workers,
            },
            weights: all_weights.into_iter().filter(|w| device.is_none_or(|d| w.device_id == d.to_string())).collect(),
        })
    }
}

/// One device's row: its status, the models listed on it, the processes' own bytes there.
fn device_row(s: &DeviceStatus, measured: &mut Measured, weights: &[HeldModelDto], fallback: bool) -> DeviceModelsDto {
    let dev = s.device.to_string();
    let mut loaded = measured.models.remove(&dev).unwrap_or_default();
    loaded.sort_by(|a, b| a.loaded_at.cmp(&b.loaded_at).then(a.model_id.cmp(&b.model_id)));
    // The models listed here (those whose `deviceId` is this device), by what they report, less
    // the held weights a process maps: those count once, as memwarden's.
    let own: u64 = loaded
        .iter()
        .filter(|m| m.backend.as_deref() != Some("memwarden"))
        .map(|m| m.bytes_by_device.get(&dev).copied().unwrap_or(m.size_bytes))
        .sum();
    // Held weights where they live: resident on their device, parked copies on the host.
    let held: u64 = weights
        .iter()
        .map(|w| {
            let resident = if w.device_id == dev { w.resident_bytes } else { 0 };
            resident + if s.device.is_gpu() { 0 } else { w.parked_bytes }
        })
        .sum();
    let process_bytes = if fallback || measured.unmeasured.contains_key(&dev) {
        None
    } else {
        Some(measured.bytes.get(&dev).copied().unwrap_or(0))
    };
    DeviceModelsDto {
        device_id: dev,
        system_memory: SystemMemoryDto {
            total_bytes: s.total_bytes,
            available_bytes: s.available_bytes,
            used_bytes: s.used_bytes,
            source: s.source.clone(),
        },
        model_memory: ModelMemoryDto {
            loaded_model_count: loaded.len(),
            loaded_models: loaded,
            total_model_memory: own + held,
            held_model_memory: held,
            available_for_models: s.available_bytes.saturating_sub(s.reservation_bytes),
            process_bytes,
            unattributed_bytes: process_bytes.map(|m| unattributed_of(m, own)),
        },
    }
}

/// What a process holds beyond the models it holds itself (interpreter, context, caches,
/// leaks). Never negative: a process may report more than it has touched (a lazily mapped file).
fn unattributed_of(process_bytes: u64, own_model_bytes: u64) -> i64 {
    process_bytes.saturating_sub(own_model_bytes).min(i64::MAX as u64) as i64
}

/// One worker's row, its models, and per device the measured bytes of its process (None where
/// it holds models but no figure exists, e.g. NVML without per-process data in a container).
type DeviceBytes = Vec<(String, Option<u64>)>;

fn worker_dto(
    holder: &ModelProcess,
    meter: &ProcessMeter,
    statuses: &[DeviceStatus],
) -> (WorkerDto, Vec<LoadedModelDto>, DeviceBytes) {
    let (st, conn, pid, models) = (&holder.state, &holder.conn, holder.pid, &holder.models);
    let model_bytes = holder.model_bytes();
    let mapped_bytes = holder.mapped_bytes();
    let mut dtos = Vec::new();
    let mut device_bytes = Vec::new();
    let mut measured = BTreeMap::new();
    let mut unattributed = BTreeMap::new();
    if let (Some(pid), Some(_)) = (pid, conn) {
        measured = meter.process_bytes(pid, statuses);
        dtos = models.iter().map(|m| LoadedModelDto::new(m, holder.id(), pid)).collect();
        for (dev, bytes) in &measured {
            unattributed.insert(dev.clone(), unattributed_of(*bytes, model_bytes.get(dev).copied().unwrap_or(0)));
            device_bytes.push((dev.clone(), Some(*bytes)));
        }
        for dev in model_bytes.keys().filter(|d| !measured.contains_key(*d)) {
            device_bytes.push((dev.clone(), None));
        }
    }
    let allocator = conn
        .as_ref()
        .map(|c| {
            c.allocator_memory()
                .into_iter()
                .map(|(d, m)| {
                    (d, AllocatorDto { allocated_bytes: m.allocated_bytes, reserved_bytes: m.reserved_bytes })
                })
                .collect()
        })
        .unwrap_or_default();
    let dto = WorkerDto {
        worker_id: holder.id().to_string(),
        role: if holder.slot.role == Role::Client { "client".into() } else { "worker".into() },
        state: st.state,
        since: rfc3339(st.since),
        pid,
        last_error: st.last_error.clone(),
        restarts: st.restarts,
        devices: conn.as_ref().map(|c| c.devices.clone()).unwrap_or_default(),
        frameworks: conn.as_ref().map(|c| c.frameworks.clone()).unwrap_or_default(),
        model_count: models.len(),
        model_bytes,
        mapped_bytes,
        process_bytes: measured,
        unattributed_bytes: unattributed,
        unverified_releases: st.unverified_releases,
        allocator,
    };
    (dto, dtos, device_bytes)
}

impl From<ListError> for super::error::AppError {
    fn from(e: ListError) -> Self {
        match e {
            ListError::Supervisor(e) => e.into(),
            ListError::Service(e) => e.into(),
        }
    }
}
