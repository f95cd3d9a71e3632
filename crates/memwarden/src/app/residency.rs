//! Where a model's weights live, changed by request: park (device → host), resume (host →
//! device, making room first when the device is full: by a request, or by a holder's `use()`
//! of a parked model), drop the parked copy, unload, and move to another device (held weights
//! by park and resume, making room on the target; a worker's model by a load there, through
//! admission, and an unload here).

use super::error::AppError;
use super::App;
use crate::weights::{ActionOutcome, HeldModel, WeightHolder, WeightStore, WeightsError};
use memwarden_core::DeviceId;
use memwarden_protocol::api::{LoadBody, LoadedModelDto, WeightState};
use memwarden_protocol::Role;
use std::future::Future;
use std::sync::Arc;

/// A held model's action and the model as it was asked for.
pub struct Acted {
    pub model: Arc<HeldModel>,
    pub outcome: ActionOutcome,
    /// A resume by a switch: the model parked in its place.
    pub switched_with: Option<String>,
}

/// Runs a weights operation on a task of its own: a client that goes away does not stop a park
/// or a resume halfway.
async fn detached<T: Send + 'static>(
    op: impl Future<Output = Result<T, WeightsError>> + Send + 'static,
) -> Result<T, AppError> {
    match tokio::spawn(op).await {
        Ok(r) => r.map_err(AppError::from),
        Err(e) => Err(AppError::Internal(e.to_string())),
    }
}

/// Reads `device` and the host afresh, so the next status shows what a weights action changed.
fn refresh(app: &App, device: DeviceId) {
    let _ = app.service.measure_now(device);
    let _ = app.service.measure_now(DeviceId::Cpu);
}

async fn act<F, Fut>(app: &App, model_id: &str, op: F) -> Result<Acted, AppError>
where
    F: FnOnce(Arc<WeightStore>, String) -> Fut,
    Fut: Future<Output = Result<ActionOutcome, WeightsError>> + Send + 'static,
{
    let model = app.weights.get(model_id)?;
    let outcome = detached(op(app.weights.clone(), model_id.to_string())).await?;
    refresh(app, model.device());
    Ok(Acted { model, outcome, switched_with: None })
}

pub async fn park(app: &App, model_id: &str) -> Result<Acted, AppError> {
    act(app, model_id, |store, id| async move { store.park(&id).await }).await
}

pub async fn drop_copy(app: &App, model_id: &str) -> Result<Acted, AppError> {
    act(app, model_id, |store, id| async move { store.drop_copy(&id).await }).await
}

/// What a group request does to each of its components.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupAction {
    Park,
    Resume,
    Drop,
}

/// Parks, resumes or drops every held model of `group` (a diffusers pipeline's components), one
/// after another in the order of their ids, each as its own request would (a resume makes room),
/// with the time from the start to each one's end. No model in the group is `GroupNotFound`. A
/// component that fails stops the request: the error names the group, the component and the
/// ones already done, which stay as they are. A resume whose room-making parked a component
/// resumed before it (the group does not fit) is 507 naming them.
pub async fn for_group(app: &App, group: &str, action: GroupAction) -> Result<Vec<(Acted, f64)>, AppError> {
    let mut members: Vec<Arc<HeldModel>> =
        app.weights.models().into_iter().filter(|m| m.file.group.as_deref() == Some(group)).collect();
    if members.is_empty() {
        return Err(WeightsError::GroupNotFound(group.to_string()).into());
    }
    members.sort_by(|a, b| a.id.cmp(&b.id));
    let started = std::time::Instant::now();
    let mut done: Vec<(Acted, f64)> = Vec::with_capacity(members.len());
    for m in &members {
        let acted = match action {
            GroupAction::Park => park(app, &m.id).await,
            GroupAction::Resume => resume(app, &m.id, None).await,
            GroupAction::Drop => drop_copy(app, &m.id).await,
        };
        match acted {
            Ok(a) => done.push((a, started.elapsed().as_secs_f64() * 1e3)),
            Err(e) => {
                let done_ids: Vec<&str> = done.iter().map(|(a, _)| a.model.id.as_str()).collect();
                let what = format!("group {group:?}, component {} ({}): ", m.id, m.name);
                let tail = format!(" (done before it, left as they are: {done_ids:?})");
                return Err(e.with_context(&what, &tail));
            }
        }
    }
    let out: Vec<&str> = members.iter().filter(|m| m.state() != WeightState::Resident).map(|m| m.id.as_str()).collect();
    if action == GroupAction::Resume && !out.is_empty() {
        return Err(AppError::InsufficientMemory(format!(
            "group {group:?} does not fit on its device at once: making room for one component parked {out:?} of \
             the same group (resume them one at a time, or make room first)"
        )));
    }
    Ok(done)
}

/// Whether `e` says the device had no room (the one error that making room answers).
fn short_of_memory(e: &AppError) -> bool {
    matches!(e, AppError::Weights(WeightsError::InsufficientMemory { .. }) | AppError::InsufficientMemory(_))
}

/// Resumes a parked model on its own device or on `target`; when the device is full, placement
/// makes room (never by this model: idle held models are parked first, see
/// [`crate::optimizer::room`]) and the resume runs once more. The make-room-and-retry section
/// holds the device's room lock: of two resumes (or loads) racing for the same room, the second
/// re-checks after the first took its share, and makes room of its own.
pub async fn resume(app: &App, model_id: &str, target: Option<DeviceId>) -> Result<Acted, AppError> {
    let model = app.weights.get(model_id)?;
    let device = target.unwrap_or_else(|| model.device());
    let run = || act(app, model_id, move |store, id| async move { store.resume(&id, target).await });
    match run().await {
        Err(e) if short_of_memory(&e) => {
            let _room = app.placement.room_lock(device).await;
            match run().await {
                Err(e) if short_of_memory(&e) => {
                    if target.is_none_or(|t| t == model.device()) {
                        if let Some(acted) = resume_by_switch(app, &model).await? {
                            return Ok(acted);
                        }
                    }
                    app.placement
                        .make_room(device, model.file.data_bytes, model_id)
                        .await
                        .map_err(AppError::InsufficientMemory)?;
                    run().await
                }
                other => other,
            }
        }
        other => other,
    }
}

/// On a GPU too full for `model`, resumes it in the place of the least valuable resident
/// model whose memory makes the room, the two copies overlapped ([`WeightStore::switch`]).
/// `None` when no single model's memory would do or each candidate is in use, or when the
/// switch parked its partner but still found no room: the caller makes room and resumes.
pub async fn resume_by_switch(app: &App, model: &Arc<HeldModel>) -> Result<Option<Acted>, AppError> {
    let device = model.device();
    if model.state() != memwarden_protocol::api::WeightState::Parked || !device.is_gpu() {
        return Ok(None);
    }
    let available = app.service.measure_now(device).map(|(_, a)| a).unwrap_or(0);
    for partner in crate::weights::switch_partners(&app.weights, model, available) {
        let (store, out, inc) = (app.weights.clone(), partner.id.clone(), model.id.clone());
        match detached(async move { crate::weights::switch(&store, &out, &inc).await }).await {
            Ok(sw) => {
                refresh(app, device);
                tracing::info!(
                    model = %model.id, parked = %partner.id, overlapped = sw.overlapped,
                    "resumed by a switch on {device}"
                );
                let outcome = sw.resumed;
                return Ok(Some(Acted { model: model.clone(), outcome, switched_with: Some(partner.id.clone()) }));
            }
            // That one cannot go now (a `use()` open past the bound, or it changed state
            // meanwhile): the next one may.
            Err(AppError::Weights(WeightsError::InUse(why) | WeightsError::NotSupported(why))) => {
                tracing::info!(model = %model.id, partner = %partner.id, "no switch with it: {why}");
            }
            Err(AppError::Weights(WeightsError::InsufficientMemory { .. })) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Makes a held model resident for a holder that wants to use it (the socket's
/// `resumeWeights`, sent by a `use()` of a parked model), making room on its device as
/// [`resume`] does when it is full: by a switch where one model's room suffices, else by the
/// ladder.
pub async fn resume_for_holder(
    app: &App,
    model_id: &str,
    holder: impl Fn() -> Arc<dyn WeightHolder>,
) -> Result<ActionOutcome, AppError> {
    let model = app.weights.get(model_id)?;
    let store = &app.weights;
    let device = model.device();
    let attempt = || async { store.ensure_resident(model_id, holder()).await.map_err(AppError::from) };
    let outcome = match attempt().await {
        Err(e) if short_of_memory(&e) => {
            let _room = app.placement.room_lock(device).await;
            match attempt().await {
                Err(e) if short_of_memory(&e) => match resume_by_switch(app, &model).await? {
                    // Resident now, and the switch remapped this holder if it still held the
                    // model; one that had let go is sent the memory.
                    Some(acted) if model.with_held(|h| h.holders.contains_key(&holder().holder_id())) => {
                        Ok(acted.outcome)
                    }
                    Some(_) => attempt().await,
                    None => {
                        app.placement
                            .make_room(device, model.file.data_bytes, model_id)
                            .await
                            .map_err(AppError::InsufficientMemory)?;
                        attempt().await
                    }
                },
                other => other,
            }
        }
        other => other,
    }?;
    refresh(app, device);
    Ok(outcome)
}

/// What an unload freed, and (a worker's model) what the OS and driver said its process held
/// before and after.
pub struct Unloaded {
    pub worker_id: String,
    pub device_id: String,
    pub freed_bytes: u64,
    pub process_bytes_before: Option<u64>,
    pub process_bytes_after: Option<u64>,
}

pub async fn unload(app: &App, model_id: &str) -> Result<Unloaded, AppError> {
    if app.weights.contains(model_id) {
        let (store, id) = (app.weights.clone(), model_id.to_string());
        let (model, freed) = detached(async move { store.unload(&id).await }).await?;
        refresh(app, model.device());
        return Ok(Unloaded {
            worker_id: "memwarden".into(),
            device_id: model.device().to_string(),
            freed_bytes: freed,
            process_bytes_before: None,
            process_bytes_after: None,
        });
    }
    let (slot, info) = app.supervisor.find_model(model_id).await?;
    let pid = slot.snapshot().pid;
    let measure = || -> Option<u64> {
        let pid = pid?;
        let dev = app.service.resolve(&info.device_id).ok()?;
        // A fresh reading: the cached status sample may predate the unload.
        let _ = app.service.measure_now(dev);
        let status = super::allocations::blocking(|| app.service.status(dev)).ok()?;
        app.supervisor.meter().process_bytes(pid, std::slice::from_ref(&status)).remove(&info.device_id)
    };
    let before = measure();
    let (released, slot, info) = app.supervisor.unload(model_id).await?;
    let after = measure();
    Ok(Unloaded {
        worker_id: slot.id.clone(),
        device_id: info.device_id,
        freed_bytes: released.freed_bytes,
        process_bytes_before: before,
        process_bytes_after: after,
    })
}

/// Where a moved model is now: a held model keeps its id (`Held`); a worker's model is a new
/// model on the target (`Worker`).
pub enum Moved {
    Held { model: Arc<HeldModel>, previous_device: DeviceId, freed_bytes: u64 },
    Worker { model: Box<LoadedModelDto>, previous_device_id: String, freed_bytes: u64 },
}

pub async fn move_model(app: &App, model_id: &str, target: DeviceId) -> Result<Moved, AppError> {
    let already = || AppError::Invalid(format!("targetDeviceId: model {model_id} is already on {target}"));
    if let Ok(held) = app.weights.get(model_id) {
        // memwarden's own weights move by park and resume: the id stays. The resume makes room
        // on the target when it is full (as a resume does); refused, the model goes back.
        let from = held.device();
        if from == target {
            return Err(already());
        }
        let freed_bytes = app.weights.park(model_id).await?.freed_bytes;
        refresh(app, from);
        if let Err(e) = resume(app, model_id, Some(target)).await {
            if let Err(back) = resume(app, model_id, Some(from)).await {
                tracing::warn!(model = %model_id, "the move to {target} failed and the model stays parked: {back}");
            }
            return Err(e);
        }
        return Ok(Moved::Held { model: held, previous_device: from, freed_bytes });
    }
    let (slot, info) = app.supervisor.find_model(model_id).await?;
    let path = match (&info.path, slot.role) {
        (Some(p), Role::Worker) => p.clone(),
        _ => {
            return Err(AppError::InvalidOperation(format!(
                "model {model_id} is held by {} without a file to load it from elsewhere",
                slot.id
            )))
        }
    };
    if info.device_id == target.to_string() {
        return Err(already());
    }
    let load = LoadBody {
        path,
        name: Some(info.model_name.clone()),
        device_id: Some(target.to_string()),
        priority: Some(info.priority),
        pinned: info.pinned,
        held_by: Some("worker".into()),
        keep_alive_ms: None,
        run_async: false,
    };
    let model = super::load::by_worker(app, target, load, None).await?;
    let (released, _, _) = app.supervisor.unload(model_id).await?;
    Ok(Moved::Worker { model: Box::new(model), previous_device_id: info.device_id, freed_bytes: released.freed_bytes })
}

/// The held models, as the listing and `/metrics` show them.
pub fn held_models(app: &App) -> Vec<memwarden_protocol::api::HeldModelDto> {
    app.weights.list()
}

/// One held model as the API shows it.
pub fn held_dto(app: &App, model: &HeldModel) -> memwarden_protocol::api::HeldModelDto {
    app.weights.dto(model)
}
