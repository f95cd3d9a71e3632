//! The devices of this machine: the registry the service places allocations on, and what is
//! read from it (status, fresh measurements).

use super::device::{Device, Limits};
use super::ledger::Ledger;
use super::{ClearOutcome, DeviceStatus, LedgerError, ServiceError};
use crate::sync::lock;
use memwarden_backends::{Backend, BackendHealth};
use memwarden_core::{DeviceId, MemoryKind, PoolConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The devices part of the service. Owns every [`Device`] of this machine (each with its pools
/// and budget behind its own lock), the backends' health (which GPU APIs were found, and why
/// not), the pool configuration, and per device the count of allocations that did not fit
/// (behind its own lock). Device ids and aliases are resolved here.
pub(crate) struct Devices {
    list: Vec<(DeviceId, Device)>,
    health: Vec<BackendHealth>,
    pool_config: PoolConfig,
    /// Per device: allocations that did not fit (a pressure signal of their own).
    failures: Mutex<HashMap<DeviceId, u64>>,
}

impl Devices {
    /// A device per backend, its pools made with `pool` and bounded by `limits`; every backend
    /// listed as the available host backend until [`Devices::set_health`] says otherwise.
    pub fn new(backends: Vec<Arc<dyn Backend>>, pool: PoolConfig, limits: Limits) -> Self {
        let health = vec![BackendHealth {
            name: "host",
            available: true,
            devices: backends.iter().map(|b| b.info().device_id.to_string()).collect(),
            reason: None,
        }];
        Devices {
            list: backends.into_iter().map(|b| (b.info().device_id, Device::new(b, pool, limits))).collect(),
            health,
            pool_config: pool,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The backends discovery found, available or not (with the reason).
    pub fn set_health(&mut self, health: Vec<BackendHealth>) {
        self.health = health;
    }

    pub fn health(&self) -> &[BackendHealth] {
        &self.health
    }

    pub fn pool_config(&self) -> &PoolConfig {
        &self.pool_config
    }

    pub fn ids(&self) -> Vec<DeviceId> {
        self.list.iter().map(|(id, _)| *id).collect()
    }

    pub fn get(&self, id: DeviceId) -> Option<&Device> {
        self.list.iter().find(|(d, _)| *d == id).map(|(_, dev)| dev)
    }

    fn not_found(&self, requested: String) -> ServiceError {
        ServiceError::DeviceNotFound { requested, known: self.list.iter().map(|(id, _)| id.to_string()).collect() }
    }

    pub fn get_or_404(&self, id: DeviceId) -> Result<&Device, ServiceError> {
        self.get(id).ok_or_else(|| self.not_found(id.to_string()))
    }

    /// Each device with the memory kinds it provides, a reservation included (what quotas
    /// can cover).
    pub fn offered(&self) -> Vec<(DeviceId, Vec<MemoryKind>)> {
        self.list
            .iter()
            .map(|(id, dev)| (*id, dev.backend.kinds().iter().copied().chain([MemoryKind::Reservation]).collect()))
            .collect()
    }

    /// Resolves a device id or alias to a device of this machine.
    pub fn resolve(&self, text: &str) -> Result<DeviceId, ServiceError> {
        let id = DeviceId::parse_among(text, &self.ids()).map_err(|_| self.not_found(text.to_string()))?;
        if self.get(id).is_some() {
            return Ok(id);
        }
        // A GPU id whose backend is known here but not available (no driver, no device): say so,
        // with the canonical id and the backend's reason, rather than "not found".
        if let DeviceId::Gpu(api, _) = id {
            let down = self.health.iter().find(|b| b.name == api.prefix() && !b.available);
            if let Some(b) = down {
                return Err(ServiceError::BackendUnavailable {
                    device: id.to_string(),
                    reason: format!(
                        "the {} backend is not available: {}",
                        b.name,
                        b.reason.as_deref().unwrap_or("no reason given")
                    ),
                });
            }
        }
        Err(self.not_found(id.to_string()))
    }

    /// `(total, available)` bytes of `device` read from the OS or driver now (no cached sample;
    /// the status cache is dropped too, so the next status shows the change).
    pub fn measure_now(&self, device: DeviceId) -> Result<(u64, u64), ServiceError> {
        let dev = self.get_or_404(device)?;
        dev.backend.refresh();
        let reading = dev.backend.sample().map_err(|e| ServiceError::from_backend(device, e))?;
        lock(&dev.state).invalidate_sample();
        Ok(reading)
    }

    /// Allocations on `device` that did not fit, since start.
    pub fn failures(&self, device: DeviceId) -> u64 {
        lock(&self.failures).get(&device).copied().unwrap_or(0)
    }

    pub fn note_failure(&self, device: DeviceId) {
        *lock(&self.failures).entry(device).or_default() += 1;
    }

    /// Status of one device, from a sample no older than the configured maximum age.
    pub fn status(&self, id: DeviceId) -> Result<DeviceStatus, ServiceError> {
        let dev = self.get_or_404(id)?;
        let mut st = lock(&dev.state);
        let max_age = st.max_age();
        let sample = st.sample(dev.backend.as_ref(), max_age).map_err(|e| ServiceError::from_backend(id, e))?;
        let info = dev.backend.info();
        Ok(DeviceStatus {
            device: id,
            device_type: info.device_type,
            name: info.name.clone(),
            memory_type: info.memory_type,
            total_bytes: sample.reading.total_bytes,
            available_bytes: sample.reading.available_bytes,
            used_bytes: sample.reading.used_bytes,
            source: sample.reading.source.clone(),
            last_updated: sample.taken_at,
            pools: st.pools.iter().map(|p| (p.kind(), p.stats())).collect(),
            reservation_bytes: st.reservation_bytes,
            gpu: info.gpu.clone(),
            extra: info.extra.clone(),
            driver_reserved_bytes: sample.reading.reserved_bytes,
            processes: sample.reading.processes.clone(),
            fault: dev.backend.fault(),
        })
    }

    /// Returns cached empty pool blocks to the OS or driver, on one device or all.
    pub fn clear(&self, device: Option<DeviceId>) -> Result<Vec<ClearOutcome>, ServiceError> {
        let ids = match device {
            Some(d) => vec![d],
            None => self.ids(),
        };
        ids.into_iter()
            .map(|id| {
                let dev = self.get_or_404(id)?;
                let mut st = lock(&dev.state);
                let cleared_bytes = st.clear().map_err(|e| ServiceError::from_backend(id, e))?;
                Ok(ClearOutcome { device: id, cleared_bytes, reserved_bytes_after: st.pool_totals().reserved_bytes })
            })
            .collect()
    }

    /// Checks every pool's invariants and that the ledger's allocations and reservations add
    /// up to what each device's pools and budget hold.
    pub fn check_against(&self, ledger: &Ledger) -> Result<(), LedgerError> {
        for (id, dev) in &self.list {
            // A device, then the ledger: the order every path that takes both keeps.
            let st = lock(&dev.state);
            let ledger = ledger.lock();
            for pool in &st.pools {
                pool.validate().map_err(|source| LedgerError::Pool { device: *id, kind: pool.kind(), source })?;
                let in_ledger: u64 = ledger
                    .records
                    .values()
                    .filter(|r| r.device == *id && r.kind == pool.kind())
                    .map(|r| r.allocated_bytes)
                    .sum();
                if in_ledger != pool.stats().allocated_bytes {
                    return Err(LedgerError::Allocated {
                        device: *id,
                        kind: pool.kind(),
                        ledger_bytes: in_ledger,
                        pool_bytes: pool.stats().allocated_bytes,
                    });
                }
            }
            let reserved: u64 = ledger
                .records
                .values()
                .filter(|r| r.device == *id && r.kind == MemoryKind::Reservation)
                .map(|r| r.size_bytes)
                .sum();
            if reserved != st.reservation_bytes {
                return Err(LedgerError::Reserved {
                    device: *id,
                    ledger_bytes: reserved,
                    device_bytes: st.reservation_bytes,
                });
            }
        }
        Ok(())
    }
}
