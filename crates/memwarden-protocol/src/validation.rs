//! What [`ModelInfo::validate`](crate::ModelInfo::validate) reports.

/// The invariant of a [`ModelInfo`](crate::ModelInfo) that
/// [`ModelInfo::validate`](crate::ModelInfo::validate) found broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelInfoError {
    #[error("modelId is empty")]
    EmptyModelId,
    #[error("model {model_id}: priority {priority} is above 100")]
    PriorityAbove100 { model_id: String, priority: u8 },
    #[error("model {model_id}: bytesByDevice sums to {sum_bytes}, sizeBytes is {size_bytes}")]
    BytesByDeviceSum { model_id: String, sum_bytes: u64, size_bytes: u64 },
}
