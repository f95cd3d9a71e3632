//! Placement: every "where" decision of the daemon, in one room.
//!
//! - the device of an allocation that names none (the roomiest device of its kind);
//! - the device of a model load that names none (`cpu`);
//! - the worker that loads or maps a model (the least loaded one serving the device);
//! - what must leave a device to make room for a model: placement asks the optimizer, whose
//!   ladder ranks what may go ([`crate::optimizer`]); it does not rank itself.
//!
//! The rebalance advice ([`memwarden_core::advice::rebalance`]) reads the same rule as an
//! allocation without a device: [`memwarden_core::placement::roomiest`].

use crate::optimizer::Optimizer;
use crate::service::{Service, ServiceError};
use crate::supervisor::{Conn, Slot, Supervisor, SupervisorError};
use memwarden_core::{DeviceId, MemoryKind};
use memwarden_protocol::Role;
use std::sync::Arc;

/// The device a model load goes to when the request names none.
pub const DEFAULT_LOAD_DEVICE: DeviceId = DeviceId::Cpu;

/// Decides where allocations and models go, and asks the optimizer what leaves to make room.
/// Owns no state of its own: it reads the devices (service), the workers (supervisor) and the
/// optimizer's ranking each time it decides.
pub struct Placement {
    service: Arc<Service>,
    supervisor: Arc<Supervisor>,
    optimizer: Arc<Optimizer>,
}

impl Placement {
    pub fn new(service: Arc<Service>, supervisor: Arc<Supervisor>, optimizer: Arc<Optimizer>) -> Arc<Placement> {
        Arc::new(Placement { service, supervisor, optimizer })
    }

    /// The device for an allocation: the one named (`requested`, resolved: an alias or a
    /// `cuda:N` on a Vulkan-only host), else (the seed leaves this open) of the devices that
    /// provide `kind` (each device's own default kind without one; a reservation fits any), the
    /// one with the most available memory now. Ties go to the first listed.
    pub fn device_for_allocation(
        &self,
        requested: Option<&str>,
        kind: Option<MemoryKind>,
    ) -> Result<DeviceId, ServiceError> {
        if let Some(text) = requested {
            return self.service.resolve(text);
        }
        let candidates = self.service.device_ids().into_iter().filter_map(|id| {
            let k = kind.unwrap_or(id.default_kind());
            let offers =
                k == MemoryKind::Reservation || self.service.backend(id).is_some_and(|b| b.kinds().contains(&k));
            let status = self.service.status(id).ok().filter(|_| offers)?;
            Some((id, status.available_bytes))
        });
        memwarden_core::placement::roomiest(candidates).ok_or_else(|| {
            ServiceError::invalid(
                "memoryType",
                format!("no device here provides {} memory", kind.unwrap_or(MemoryKind::Host)),
            )
        })
    }

    /// The device for a model load: the one named, else [`DEFAULT_LOAD_DEVICE`].
    pub fn device_for_load(&self, requested: Option<&str>) -> Result<DeviceId, ServiceError> {
        match requested {
            Some(text) => self.service.resolve(text),
            None => Ok(DEFAULT_LOAD_DEVICE),
        }
    }

    /// The ready supervised worker serving `device` (and passing `usable`) whose models take
    /// the fewest bytes: where a new model goes, or who maps a held model.
    pub fn worker_for(&self, device: &str, usable: impl Fn(&Conn) -> bool) -> Option<Arc<Slot>> {
        self.supervisor
            .slots()
            .into_iter()
            .filter(|s| s.role == Role::Worker && s.serves(device))
            .filter_map(|s| s.conn().filter(|c| usable(c)).map(|c| (s, c)))
            .min_by_key(|(_, c)| c.model_list().iter().map(|m| m.size_bytes).sum::<u64>())
            .map(|(s, _)| s)
    }

    /// The worker that loads a model on `device`, after waiting for one that is starting; an
    /// error says why there is none.
    pub async fn worker_for_load(&self, device: &str) -> Result<Arc<Slot>, SupervisorError> {
        self.supervisor.wait_while_starting(|s| s.role == Role::Worker && s.serves(device)).await;
        self.worker_for(device, |_| true).ok_or_else(|| {
            let any_worker = self.supervisor.slots().iter().any(|s| s.role == Role::Worker && s.conn().is_some());
            SupervisorError::Unavailable(if any_worker {
                format!("no ready model worker serves {device}")
            } else {
                self.supervisor.unavailable_reason()
            })
        })
    }

    /// Makes `bytes` available on `device` by what the optimizer ranks least valuable (its
    /// ladder: idle held models parked first, then worker and client models), never touching
    /// `exclude` (the model that needs the room); nothing when they fit already. `Err` names the
    /// bytes needed and available after it ran, and the models left and why (pinned, in use).
    /// Hold [`Placement::room_lock`] across this and the attempt that takes the room.
    pub async fn make_room(&self, device: DeviceId, bytes: u64, exclude: &str) -> Result<(), String> {
        crate::optimizer::room::make_room(&self.optimizer, device, bytes, exclude).await
    }

    /// The lock serializing "make room on `device`, then take it" (admission's, a resume's, a
    /// move's): two requests racing for the same room are served one after the other.
    pub async fn room_lock(&self, device: DeviceId) -> tokio::sync::OwnedMutexGuard<()> {
        crate::optimizer::room::room_lock(&self.optimizer, device).await
    }
}
