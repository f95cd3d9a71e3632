//! Loading a model: the one admit → load → give the ticket back sequence, whichever way the
//! load arrives (`POST /api/memory/models/load`, held or by a worker, synchronous or as an
//! operation; a peer's `loadWeights`), with the file's header read once for all of it (the
//! admission estimate, the operation's total and the load itself).

use crate::operations::Progress;
use crate::optimizer::admission::{AdmissionError, Ticket};
use crate::optimizer::Optimizer;
use crate::supervisor::Supervisor;
use crate::weights::file::ModelFile;
use crate::weights::{Attached, LoadRequest, WeightHolder, WeightStore, WeightsError};
use memwarden_core::DeviceId;
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
    /// Loads `req` into memwarden's memory (or shares the copy already held) through admission,
    /// reporting to `progress`. `holder` maps it at once (a peer's `loadWeights`); with
    /// `hand_to`, a model freshly read is handed to the least loaded worker that can map it.
    pub async fn held(
        &self,
        req: LoadRequest,
        holder: Option<Arc<dyn WeightHolder>>,
        progress: Option<Arc<Progress>>,
        hand_to: Option<&Supervisor>,
    ) -> Result<Attached, LoadError> {
        self.weights.check_device(req.device)?;
        let path = req.path.clone();
        // The header, read once: a file that is missing or broken fails here, before admission.
        let file = tokio::task::spawn_blocking(move || ModelFile::open(&path))
            .await
            .map_err(|e| WeightsError::Internal(format!("worker thread: {e}")))??;
        if let Some(p) = &progress {
            p.set_total(file.data_bytes);
        }
        let label = req.name.clone().unwrap_or_else(|| req.path.display().to_string());
        let estimate = crate::models::estimate::model_bytes_of(file.data_bytes, req.device);
        let (device, weights) = (req.device, self.weights.clone());
        let attached = admitted(self.optimizer, device, Some(estimate), &label, async move {
            weights.load_file(file, req, holder, progress).await.map_err(LoadError::from)
        })
        .await?;
        if let Some(sup) = hand_to.filter(|_| !attached.reused) {
            super::hand_off::hand_to_worker(self.weights, sup, &attached.model).await;
        }
        Ok(attached)
    }
}

/// The tensor bytes a `.safetensors` header names, read here once (the header alone), for an
/// admission estimate and an operation's total; `None` when the header cannot be read here (a
/// worker, more lenient about headers, decides).
pub async fn declared_bytes(path: &Path) -> Option<u64> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || ModelFile::declared(&path).map(|f| f.data_bytes).ok()).await.ok().flatten()
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
    let _ticket = Held(optimizer, Some(ticket));
    load.await
}

/// An admission ticket held while a load runs.
struct Held<'a>(&'a Optimizer, Option<Ticket>);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.1.take() {
            self.0.release_ticket(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::models::process::ProcessMeter;
    use crate::service::Service;
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
