//! Why a weights operation failed, with the protocol's stable code for each reason.

use memwarden_backends::DedicatedError;
use memwarden_protocol::codes;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeightsError {
    #[error("{0}")]
    FileNotFound(String),
    #[error("{0}")]
    InvalidFile(String),
    #[error("{0}")]
    FileChanged(String),
    #[error("no model {0:?} is held by memwarden")]
    ModelNotFound(String),
    #[error("no held model is in the group {0:?}")]
    GroupNotFound(String),
    #[error("{0}")]
    NotSupported(String),
    #[error("{0}")]
    InUse(String),
    #[error("{message}")]
    InsufficientMemory { device: String, needed_bytes: u64, message: String },
    #[error("{0}")]
    DeviceUnavailable(String),
    #[error("{0}")]
    LoadFailed(String),
    #[error("{0}")]
    Internal(String),
}

impl WeightsError {
    pub fn file(path: &Path, e: std::io::Error) -> WeightsError {
        if e.kind() == std::io::ErrorKind::NotFound {
            WeightsError::FileNotFound(format!("{}: no such file", path.display()))
        } else {
            WeightsError::LoadFailed(format!("{}: {e}", path.display()))
        }
    }

    /// The same error, its message passed through `f` (to say which request it came from); an
    /// id (`ModelNotFound`, `GroupNotFound`) is kept as it is.
    pub fn map_message(self, f: impl FnOnce(String) -> String) -> WeightsError {
        use WeightsError as E;
        match self {
            E::FileNotFound(m) => E::FileNotFound(f(m)),
            E::InvalidFile(m) => E::InvalidFile(f(m)),
            E::FileChanged(m) => E::FileChanged(f(m)),
            E::NotSupported(m) => E::NotSupported(f(m)),
            E::InUse(m) => E::InUse(f(m)),
            E::InsufficientMemory { device, needed_bytes, message } => {
                E::InsufficientMemory { device, needed_bytes, message: f(message) }
            }
            E::DeviceUnavailable(m) => E::DeviceUnavailable(f(m)),
            E::LoadFailed(m) => E::LoadFailed(f(m)),
            E::Internal(m) => E::Internal(f(m)),
            id @ (E::ModelNotFound(_) | E::GroupNotFound(_)) => id,
        }
    }

    /// The protocol's code for this error (the HTTP layer maps codes to statuses).
    pub fn code(&self) -> &'static str {
        match self {
            WeightsError::FileNotFound(_) => codes::FILE_NOT_FOUND,
            WeightsError::InvalidFile(_) => codes::INVALID_MODEL_FILE,
            WeightsError::FileChanged(_) => codes::FILE_CHANGED,
            WeightsError::ModelNotFound(_) => codes::MODEL_NOT_FOUND,
            WeightsError::GroupNotFound(_) => codes::GROUP_NOT_FOUND,
            WeightsError::NotSupported(_) => codes::NOT_SUPPORTED,
            WeightsError::InUse(_) => codes::IN_USE,
            WeightsError::InsufficientMemory { .. } => codes::INSUFFICIENT_MEMORY,
            WeightsError::DeviceUnavailable(_) => codes::DEVICE_UNAVAILABLE,
            WeightsError::LoadFailed(_) => codes::LOAD_FAILED,
            WeightsError::Internal(_) => codes::INTERNAL,
        }
    }
}

impl From<DedicatedError> for WeightsError {
    fn from(e: DedicatedError) -> Self {
        match e {
            DedicatedError::OutOfMemory { device, bytes, message } => {
                WeightsError::InsufficientMemory { device: device.into(), needed_bytes: bytes, message }
            }
            DedicatedError::Unsupported { .. } => WeightsError::DeviceUnavailable(e.to_string()),
            DedicatedError::Failed(message) => WeightsError::Internal(message),
            DedicatedError::Stopped => WeightsError::Internal(e.to_string()),
        }
    }
}
