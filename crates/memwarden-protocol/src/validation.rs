//! The invariants of a [`ModelInfo`] a well-behaved peer keeps, and what breaks them.

use crate::ModelInfo;

impl ModelInfo {
    /// Invariants a well-behaved peer keeps.
    pub fn validate(&self) -> Result<(), ModelInfoError> {
        if self.model_id.is_empty() {
            return Err(ModelInfoError::EmptyModelId);
        }
        if self.priority > 100 {
            return Err(ModelInfoError::PriorityAbove100 { model_id: self.model_id.clone(), priority: self.priority });
        }
        if !self.bytes_by_device.is_empty() {
            let (sum_bytes, size_bytes): (u64, u64) = (self.bytes_by_device.values().sum(), self.size_bytes);
            if sum_bytes != size_bytes {
                return Err(ModelInfoError::BytesByDeviceSum {
                    model_id: self.model_id.clone(),
                    sum_bytes,
                    size_bytes,
                });
            }
        }
        Ok(())
    }
}

/// The invariant of a [`ModelInfo`] that
/// [`ModelInfo::validate`] found broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelInfoError {
    #[error("modelId is empty")]
    EmptyModelId,
    #[error("model {model_id}: priority {priority} is above 100")]
    PriorityAbove100 { model_id: String, priority: u8 },
    #[error("model {model_id}: bytesByDevice sums to {sum_bytes}, sizeBytes is {size_bytes}")]
    BytesByDeviceSum { model_id: String, sum_bytes: u64, size_bytes: u64 },
}
