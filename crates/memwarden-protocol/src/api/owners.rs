//! Owners: what each allocation owner holds per device and memory kind, and the quotas.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `GET /api/memory/owners`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OwnersDto {
    /// One row per owner, device and memory type, sorted in that order (the allocations that
    /// name no owner first, as `owner: null`). An owner with a quota has a row on every device
    /// and memory type of this host the quota covers, also where it holds nothing.
    pub owners: Vec<OwnerUsageDto>,
    /// Every `[[quotas]]` entry, in configuration order, with what its owner holds under it.
    pub quotas: Vec<QuotaDto>,
}

/// One owner's live allocations on one device of one memory type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OwnerUsageDto {
    /// The allocations' `owner`; null for allocations that name none.
    pub owner: Option<String>,
    pub device_id: String,
    pub memory_type: String,
    /// Bytes they occupy in their pools (the sum of their `allocatedSize`): what quotas count.
    pub allocated_bytes: u64,
    /// Bytes they asked for (the sum of their `sizeBytes`).
    pub requested_bytes: u64,
    pub allocation_count: usize,
    /// The quota covering these bytes with the least room left; null when none does.
    pub quota: Option<QuotaDto>,
}

/// A `[[quotas]]` entry and its use now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaDto {
    pub owner: String,
    /// The canonical device id, or `*`: the owner's bytes on every device together.
    pub device_id: String,
    /// `host` | `pinned` | `device` | `reservation`, or `*`: every memory type together.
    pub memory_type: String,
    pub max_bytes: u64,
    /// Bytes of the owner's live allocations the quota covers (their `allocatedSize`).
    pub used_bytes: u64,
    /// `maxBytes − usedBytes` (0 when over, after a restart with a lower limit).
    pub remaining_bytes: u64,
}
