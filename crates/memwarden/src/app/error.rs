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

impl AppError {
    /// The same error, its message between `head` and `tail` (to say which part of a larger
    /// request failed); the code stays.
    pub fn with_context(self, head: &str, tail: &str) -> AppError {
        let f = |m: String| format!("{head}{m}{tail}");
        match self {
            AppError::Weights(e) => AppError::Weights(e.map_message(f)),
            AppError::Invalid(m) => AppError::Invalid(f(m)),
            AppError::InvalidOperation(m) => AppError::InvalidOperation(f(m)),
            AppError::DeviceUnavailable(m) => AppError::DeviceUnavailable(f(m)),
            AppError::InsufficientMemory(m) => AppError::InsufficientMemory(f(m)),
            AppError::Internal(m) => AppError::Internal(f(m)),
            other => other,
        }
    }
}
