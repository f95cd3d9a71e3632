//! Admission before a model load: a `reservation` for the model's estimated size, held while it
//! loads. If it does not fit, the ladder runs (balanced) for the difference, idle held models
//! parked first (`room.rs`), under the device's room lock so two loads racing for the same room
//! are served one after the other; if it still does not fit, the load is refused, and the
//! refusal names the models left and why (pinned, in use past the bound).

use super::room::{self, held_back_note, merge, HeldBack, ADMISSION_OWNER};
use super::{OptimizeRequest, Optimizer};
use crate::service::{AllocateRequest, ServiceError};
use memwarden_core::eviction::EvictionStrategy;
use memwarden_core::units::MIB;
use memwarden_core::{DeviceId, MemoryKind};
use memwarden_protocol::api::OptimizeOutcome;
use std::time::{Duration, Instant};

/// Why a load was not admitted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdmissionError {
    /// The model does not fit, even after (or without) releasing what may be released.
    #[error("{0}")]
    InsufficientMemory(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

/// A ticket held while a model loads; give it back with [`Optimizer::release_ticket`].
#[derive(Debug)]
pub struct Ticket(Option<String>);

impl Optimizer {
    /// Admits a load of the model `label` onto `device` that will take about `estimate` bytes
    /// (`crate::models::estimate`): `Ok` with the ticket once they fit the budget (releasing
    /// models and caches when they do not). Use it through `crate::app::load::admitted`, which
    /// gives the ticket back however the load ends.
    pub async fn admit(&self, device: DeviceId, estimate: Option<u64>, label: &str) -> Result<Ticket, AdmissionError> {
        if !self.config.admission {
            return Ok(Ticket(None));
        }
        let Some(estimate) = estimate else {
            // The worker decides: it reports a missing or broken file, and loads headers the
            // reference parser refuses (gaps between tensors, non-string metadata).
            tracing::warn!(model = label, "admission skipped: the model's size cannot be estimated here");
            return Ok(Ticket(None));
        };
        let request = AllocateRequest {
            kind: Some(MemoryKind::Reservation),
            purpose: Some(format!("model load {label}")),
            owner: Some(ADMISSION_OWNER.into()),
            ..AllocateRequest::new(device, estimate.max(1))
        };
        // The budget must see models loaded a moment ago: read the device afresh.
        let _ = self.service.measure_now(device);
        match self.service.allocate(request.clone()) {
            Ok(ticket) => return Ok(Ticket(Some(ticket.id.clone()))),
            Err(ServiceError::InsufficientMemory { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        // No room: one load or resume at a time makes room on a device and takes it. The loser
        // of a race re-checks here, after the winner took its share, and makes its own room.
        let _room = room::room_lock(self, device).await;
        let _ = self.service.measure_now(device);
        let shortfall = match self.service.allocate(request.clone()) {
            Ok(ticket) => return Ok(Ticket(Some(ticket.id.clone()))),
            Err(ServiceError::InsufficientMemory { requested_bytes, available_bytes, .. }) => {
                requested_bytes.saturating_sub(available_bytes)
            }
            Err(e) => return Err(e.into()),
        };
        // When even releasing everything allowed would not make room, touch nothing.
        let releasable = room::room(self, device, &[]);
        if shortfall > releasable.releasable_bytes {
            return Err(AdmissionError::InsufficientMemory(format!(
                "the model needs about {estimate} bytes on {device}, {shortfall} more than the budget allows, and \
                 only {} could be released (idle held models, unpinned worker and client models, cached pool \
                 blocks); nothing was unloaded{}",
                releasable.releasable_bytes,
                held_back_note(&releasable.held_back)
            )));
        }
        let mut run = OptimizeRequest::new(device, EvictionStrategy::Balanced, "admission", &self.config);
        run.min_memory_to_free = shortfall + (16 * MIB);
        run.force = true;
        let (outcome, mut held_back) = self.run_noting(run).await;
        merge(&mut held_back, releasable.held_back);
        self.retry(device, &request, outcome, held_back).await
    }

    /// After the ladder ran for `request`: retries the reservation. The OS's counters can
    /// trail a release (the host's per-CPU free lists are re-read once a second): retry until
    /// the freed bytes show or `verify_ms` passes. A load admitted just before (the winner of a
    /// race) counts twice while it runs, its reservation and the memory it took: wait for it
    /// (at most `max_time_ms`) rather than refuse. The refusal names `held_back`.
    async fn retry(
        &self,
        device: DeviceId,
        request: &AllocateRequest,
        outcome: OptimizeOutcome,
        held_back: Vec<HeldBack>,
    ) -> Result<Ticket, AdmissionError> {
        let deadline = Instant::now() + Duration::from_millis(self.config.verify_ms);
        let loads_deadline = Instant::now() + Duration::from_millis(self.config.max_time_ms);
        loop {
            let _ = self.service.measure_now(device);
            match self.service.allocate(request.clone()) {
                Ok(ticket) => return Ok(Ticket(Some(ticket.id.clone()))),
                Err(ServiceError::InsufficientMemory { requested_bytes, available_bytes, .. }) => {
                    let now = Instant::now();
                    let others_loading = room::loads_in_flight(self, device) && now < loads_deadline;
                    if now >= deadline && !others_loading {
                        return Err(AdmissionError::InsufficientMemory(format!(
                            "the model needs about {requested_bytes} bytes on {device}; {available_bytes} are available \
                             after the optimizer freed {} ({}){}",
                            outcome.memory_freed,
                            outcome.message,
                            held_back_note(&held_back)
                        )));
                    }
                }
                Err(e) => return Err(e.into()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Gives an admission ticket back (the load finished, or failed).
    pub fn release_ticket(&self, ticket: Ticket) {
        if let Some(id) = ticket.0 {
            let _ = self.service.free(&id);
        }
    }
}
