//! Owners route: what each allocation owner holds per device and memory kind, with the quotas.

use super::envelope::{ApiResponse, Data};
use super::{ApiResult, AppState};
use crate::app::{devices, OwnerUsage, OwnersReport, QuotaUse};
use axum::extract::State;
use memwarden_protocol::api::owners::{OwnerUsageDto, OwnersDto, QuotaDto};

impl From<&QuotaUse> for QuotaDto {
    fn from(q: &QuotaUse) -> Self {
        QuotaDto {
            owner: q.rule.owner.clone(),
            device_id: q.rule.device_text(),
            memory_type: q.rule.kind_text().into(),
            max_bytes: q.rule.max_bytes,
            used_bytes: q.used_bytes,
            remaining_bytes: q.remaining_bytes(),
        }
    }
}

impl From<&OwnerUsage> for OwnerUsageDto {
    fn from(u: &OwnerUsage) -> Self {
        OwnerUsageDto {
            owner: u.owner.clone(),
            device_id: u.device.to_string(),
            memory_type: u.kind.to_string(),
            allocated_bytes: u.allocated_bytes,
            requested_bytes: u.requested_bytes,
            allocation_count: u.allocation_count,
            quota: u.quota.as_ref().map(QuotaDto::from),
        }
    }
}

impl From<&OwnersReport> for OwnersDto {
    fn from(r: &OwnersReport) -> Self {
        OwnersDto {
            owners: r.owners.iter().map(OwnerUsageDto::from).collect(),
            quotas: r.quotas.iter().map(QuotaDto::from).collect(),
        }
    }
}

/// Per owner, device and memory type: the live allocations' bytes (as the pools count them,
/// and as requested), their count and the quota that binds (null when none); allocations with
/// no owner under `owner: null`. Owners with a quota are listed also where they hold nothing,
/// and `quotas` gives every `[[quotas]]` entry with its use.
#[utoipa::path(get, path = "/api/memory/owners", responses((status = 200, body = ApiResponse<OwnersDto>)))]
pub async fn list_owners(State(state): State<AppState>) -> ApiResult<OwnersDto> {
    Ok(Data(OwnersDto::from(&devices::owners(&state.app))))
}
