//! Version 2's data: daemon-held weights (docs/PROTOCOL.md).

use serde::{Deserialize, Serialize};

fn default_device() -> String {
    "cpu".to_string()
}

/// `loadWeights` data: put a safetensors file's tensors into memwarden memory and map them here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadWeights {
    pub path: String,
    #[serde(default = "default_device")]
    pub device_id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub priority: Option<u8>,
    #[serde(default)]
    pub pinned: Option<bool>,
    /// Idle time after which the weights are parked (default: `weights.keep_alive_ms`).
    #[serde(default)]
    pub keep_alive_ms: Option<u64>,
}

/// One tensor inside a weights mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TensorEntry {
    pub name: String,
    /// The safetensors dtype name (`F32`, `BF16`, …).
    pub dtype: String,
    pub shape: Vec<u64>,
    /// From the start of the mapping.
    pub offset: u64,
    pub nbytes: u64,
}

/// How a holder maps the descriptor of a [`WeightsGrant`] (defined in core: the backend that
/// made the memory names it).
pub use memwarden_core::HandleKind;

/// One physical piece of a grant's memory: a holder maps the piece's descriptor at its base
/// address plus `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantPiece {
    pub offset: u64,
    pub bytes: u64,
}

/// `loadWeights` reply and `remapWeights` data; one descriptor per piece rides with it, in
/// the order of `pieces`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightsGrant {
    pub model_id: String,
    pub name: String,
    pub device_id: String,
    pub handle: HandleKind,
    pub allocation_bytes: u64,
    pub data_bytes: u64,
    pub tensors: Vec<TensorEntry>,
    /// The file's content hash (hex; docs/PROTOCOL.md says how it is computed).
    pub hash: String,
    /// Another holder maps the same bytes.
    #[serde(default)]
    pub shared: bool,
    /// `readwrite`: holders share one writable copy.
    #[serde(default = "default_access")]
    pub access: String,
    /// The memory's pieces in address order, covering `[0, allocationBytes)`; absent: one
    /// piece covering it all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pieces: Vec<GrantPiece>,
}

fn default_access() -> String {
    "readwrite".to_string()
}

/// `releaseWeights` / `resumeWeights` data and `weightsUsed` event data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelRef {
    pub model_id: String,
}

/// `unmapWeights` data: unmap once no `use()` is open, waiting at most `timeoutMs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnmapWeights {
    pub model_id: String,
    pub timeout_ms: u64,
    /// The model is being unloaded: release the address reservation too.
    #[serde(default)]
    pub r#final: bool,
    /// Send `weightsQuiesced` (`{modelId}`) as soon as no `use()` is open and none can start,
    /// before unmapping; the reply still comes once unmapped. A park copies the memory out
    /// meanwhile (the unmaps of several holders overlap the copy).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub confirm_early: bool,
}
