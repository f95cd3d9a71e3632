//! Model weights held by memwarden: `/api/memory/models/load` (default), `…/{id}/park`,
//! `…/{id}/resume`, and the `weights` part of the model listing.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a held model's weights are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum WeightState {
    /// In memwarden memory on its device; holders may map it.
    Resident,
    /// Copied to memwarden's pinned host memory; the device memory went back to the driver.
    Parked,
    /// Only the file is kept; a resume reads it again (and checks it did not change).
    Dropped,
    /// Resident, but every holder died; kept for `weights.orphan_grace_ms` so a restarted
    /// process re-attaches it without reading the file.
    Orphaned,
}

impl WeightState {
    pub fn as_str(self) -> &'static str {
        match self {
            WeightState::Resident => "resident",
            WeightState::Parked => "parked",
            WeightState::Dropped => "dropped",
            WeightState::Orphaned => "orphaned",
        }
    }
}

/// One measured move of a model's bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateDto {
    pub at: String,
    pub bytes: u64,
    pub ms: f64,
    pub gb_per_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeldModelDto {
    pub model_id: String,
    pub name: String,
    /// What the load named: a `.safetensors` file, a `*.safetensors.index.json`, or a model
    /// (or pipeline component) folder.
    pub path: String,
    /// The safetensors files it was read from, in the order their data lies in its memory (one
    /// for a single file; every shard of a sharded checkpoint).
    #[serde(default)]
    pub files: Vec<WeightFileDto>,
    /// A diffusers pipeline's component: its sub-folder's name (`unet`, `vae`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// The pipeline the component belongs to (the pipeline folder's name, or the load's `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The device it lives on when resident (and returns to on a plain resume).
    pub device_id: String,
    pub state: WeightState,
    /// The tensors' bytes: the file's data section; for shards, their data sections laid end
    /// to end, each starting at a 4 KiB boundary.
    pub size_bytes: u64,
    /// Device (or, on cpu, shared host) memory held now.
    pub resident_bytes: u64,
    /// Pinned host memory held for the parked copy now.
    pub parked_bytes: u64,
    pub tensor_count: u64,
    /// BLAKE3 content hash of the file as loaded (docs/PROTOCOL.md).
    pub hash: String,
    /// Processes mapping it now (worker or client ids); the bytes are counted once.
    pub holders: Vec<String>,
    pub priority: u8,
    pub pinned: bool,
    /// Idle time after which it is parked (cpu: dropped); `null`: never.
    pub keep_alive_ms: Option<u64>,
    pub loaded_at: String,
    pub last_used: String,
    pub load: Option<RateDto>,
    pub last_park: Option<RateDto>,
    pub last_resume: Option<RateDto>,
    /// Milliseconds a resume would take now (rounded up): 0 when resident or orphaned; parked:
    /// the size over its own last resume rate from a parked copy, else the average of such
    /// resumes on its device, else 25 GB/s; dropped: the size over its own last read of the
    /// file, else the device's average load rate, else 2 GB/s.
    #[serde(default)]
    pub resume_estimate_ms: u64,
    /// Set while orphaned: when the grace period ends.
    pub orphaned_until: Option<String>,
}

/// One safetensors file of a held model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WeightFileDto {
    pub path: String,
    /// The file's size on disk.
    pub bytes: u64,
}

/// The reply to a load of a diffusers pipeline folder: one held model per component that has
/// weights, each with `group` set to the pipeline's name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeldPipelineDto {
    /// The pipeline folder.
    pub path: String,
    /// The pipeline's name: each component's `group`.
    pub group: String,
    /// The components' tensor bytes together.
    pub size_bytes: u64,
    pub components: Vec<HeldModelDto>,
}

/// A held model changed state (`modelState` on `GET /api/memory/events`): loaded, parked,
/// resumed, dropped, orphaned or unloaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelStateEventDto {
    /// `modelState`.
    #[serde(rename = "type")]
    pub kind: String,
    pub model_id: String,
    pub name: String,
    /// The device it lives on when resident.
    pub device_id: String,
    /// The state it is in now (`dropped` when unloaded).
    pub state: WeightState,
    /// The state it left; `null` for a model just loaded.
    pub previous_state: Option<WeightState>,
    /// The model is no longer held (unloaded): its id is gone.
    #[serde(default)]
    pub unloaded: bool,
    /// The model's tensor bytes.
    pub bytes: u64,
    /// As in the listing: milliseconds a resume would take now (0 when resident).
    pub resume_estimate_ms: u64,
    /// When it changed (RFC 3339).
    pub at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResumeBody {
    /// Another GPU to resume on (default: the model's own device).
    pub target_device_id: Option<String>,
}

/// The reply to park, resume and drop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WeightsActionDto {
    /// `park`, `resume`, `drop`, or `none` when the model was already in the asked state.
    pub action: String,
    pub model: HeldModelDto,
    /// Device bytes given back to the driver (park, drop of a resident model).
    pub freed_bytes: u64,
    /// The copy's own time and rate (`null` for `none`).
    pub rate: Option<RateDto>,
    /// Time for the whole request, including the holders' unmap and remap.
    pub total_ms: f64,
    /// Where the time went, in order: e.g. `unmapHolders` (until every holder is quiet),
    /// `takePinned`, `copy`, `awaitUnmaps` (the holders' unmaps left after the copy),
    /// `freeDevice` (park); `allocDevice`, `copy`, `releasePinned`, `remapHolders` (resume); a resume by a
    /// switch: `unmapHolders` (of the model parked), `takePinned`, `mapPieces`, `copyOut`,
    /// `copyInTail`, `releasePinned`, `remapHolders`.
    pub phases_ms: Vec<PhaseDto>,
    /// A resume that made its room by a switch: the model parked in its place, both copies
    /// overlapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_with: Option<String>,
}

/// The reply to a group's park, resume and drop: each component's action, in the order they
/// ran (by model id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupActionDto {
    pub group: String,
    pub actions: Vec<WeightsActionDto>,
    /// Device bytes given back to the driver, summed over the components.
    pub freed_bytes: u64,
    /// Time for the whole request.
    pub total_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseDto {
    pub phase: String,
    pub ms: f64,
}
