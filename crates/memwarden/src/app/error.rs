//! Why a use case failed: the room's own error where one room refused, or the use case's own
//! reason. Each transport (HTTP, the socket) maps it to its codes in one place.

use crate::optimizer::admission::AdmissionError;
use crate::service::ServiceError;
use crate::supervisor::SupervisorError;
use crate::weights::WeightsError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    /// The request, as it stands, cannot be done (`INVALID_ARGUMENT`).
    #[error("{0}")]
    Invalid(String),
    /// The target's state does not allow it (`INVALID_OPERATION`).
    #[error("{0}")]
    InvalidOperation(String),
    /// memwarden cannot hold weights on the device (`DEVICE_UNAVAILABLE`).
    #[error("{0}")]
    DeviceUnavailable(String),
    /// Room could not be made (`INSUFFICIENT_MEMORY`).
    #[error("{0}")]
    InsufficientMemory(String),
    #[error("{0}")]
    Internal(String),
}
