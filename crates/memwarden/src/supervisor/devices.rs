//! The daemon's devices as the protocol's peers name them. A peer's device id is canonicalized
//! (`gpu-0` → `cuda:0`, as the API resolves it) and one that names no device of this host is
//! refused, so a model is never counted on a device the listing, the optimizer and `/metrics`
//! do not know.

use memwarden_core::DeviceId;
use memwarden_protocol::{codes, DeviceMemory, MemoryReport, ModelInfo};
use std::collections::BTreeMap;

/// The devices of this host, canonical (`cpu`, `cuda:0`, …).
#[derive(Debug, Clone, Default)]
pub struct DeviceCatalog {
    known: Vec<DeviceId>,
}

/// Why a peer's device id was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceError {
    #[error("device '{requested}' not found; devices: {}", known.join(", "))]
    NotFound { requested: String, known: Vec<String> },
    /// The id is well formed, but no device of its GPU API exists here (`cuda:0` without a GPU).
    #[error("device '{requested}' is {device}, but the {backend} backend is not available on this host; devices: {}", known.join(", "))]
    BackendUnavailable { requested: String, device: String, backend: &'static str, known: Vec<String> },
}

impl DeviceError {
    /// The protocol's error code (`DEVICE_NOT_FOUND`, `BACKEND_UNAVAILABLE`).
    pub fn code(&self) -> &'static str {
        match self {
            DeviceError::NotFound { .. } => codes::DEVICE_NOT_FOUND,
            DeviceError::BackendUnavailable { .. } => codes::BACKEND_UNAVAILABLE,
        }
    }
}

impl DeviceCatalog {
    /// From the daemon's canonical ids; one that does not parse is left out.
    pub fn new(ids: &[String]) -> DeviceCatalog {
        DeviceCatalog { known: ids.iter().filter_map(|d| d.parse().ok()).collect() }
    }

    fn known_names(&self) -> Vec<String> {
        self.known.iter().map(DeviceId::to_string).collect()
    }

    /// The canonical id of `text`, a device of this host.
    pub fn resolve(&self, text: &str) -> Result<String, DeviceError> {
        let not_found = || DeviceError::NotFound { requested: text.to_string(), known: self.known_names() };
        let id = DeviceId::parse_among(text, &self.known).map_err(|_| not_found())?;
        if self.known.contains(&id) {
            return Ok(id.to_string());
        }
        match id.gpu() {
            Some((api, _)) if !self.known.iter().any(|k| k.gpu().is_some_and(|(a, _)| a == api)) => {
                Err(DeviceError::BackendUnavailable {
                    requested: text.to_string(),
                    device: id.to_string(),
                    backend: api.prefix(),
                    known: self.known_names(),
                })
            }
            _ => Err(not_found()),
        }
    }

    /// A peer's model with canonical device ids (its `deviceId` and the keys of
    /// `bytesByDevice`, merged where two aliases name one device); refused when one names no
    /// device of this host.
    pub fn model(&self, mut m: ModelInfo) -> Result<ModelInfo, DeviceError> {
        m.device_id = self.resolve(&m.device_id)?;
        let mut by_device = BTreeMap::new();
        for (dev, bytes) in std::mem::take(&mut m.bytes_by_device) {
            *by_device.entry(self.resolve(&dev)?).or_insert(0) += bytes;
        }
        m.bytes_by_device = by_device;
        Ok(m)
    }

    /// A peer's report with canonical ids: a model on an unknown device is left out (logged),
    /// as are the allocator figures of an unknown device.
    pub fn report(&self, peer: &str, report: MemoryReport) -> MemoryReport {
        let models = report
            .models
            .into_iter()
            .filter_map(|m| {
                let id = m.model_id.clone();
                self.model(m).map_err(|e| tracing::warn!(worker = %peer, model = %id, "model left out: {e}")).ok()
            })
            .collect();
        let mut memory: BTreeMap<String, DeviceMemory> = BTreeMap::new();
        for (dev, figures) in report.memory {
            match self.resolve(&dev) {
                Ok(d) => {
                    let entry = memory.entry(d).or_default();
                    entry.allocated_bytes += figures.allocated_bytes;
                    entry.reserved_bytes += figures.reserved_bytes;
                }
                Err(e) => tracing::warn!(worker = %peer, "allocator figures left out: {e}"),
            }
        }
        MemoryReport { models, memory, rss_bytes: report.rss_bytes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_only() -> DeviceCatalog {
        DeviceCatalog::new(&["cpu".into()])
    }

    #[test]
    fn aliases_become_canonical_and_unknown_devices_are_refused_with_the_right_code() {
        let gpu = DeviceCatalog::new(&["cpu".into(), "cuda:0".into()]);
        assert_eq!(gpu.resolve("gpu-0"), Ok("cuda:0".into()));
        assert_eq!(gpu.resolve("CPU:0"), Ok("cpu".into()));
        assert_eq!(gpu.resolve("cuda:3").map_err(|e| e.code()), Err(codes::DEVICE_NOT_FOUND));
        assert_eq!(gpu.resolve("tpu:7").map_err(|e| e.code()), Err(codes::DEVICE_NOT_FOUND));
        assert_eq!(gpu.resolve("vulkan:0").map_err(|e| e.code()), Err(codes::BACKEND_UNAVAILABLE));
        let e = cpu_only().resolve("gpu-0").expect_err("no GPU");
        assert_eq!(e.code(), codes::BACKEND_UNAVAILABLE);
        assert!(e.to_string().contains("cuda:0") && e.to_string().contains("cuda backend"), "{e}");
    }

    #[test]
    fn a_models_bytes_by_device_are_canonical_and_merged() {
        let gpu = DeviceCatalog::new(&["cpu".into(), "cuda:0".into()]);
        let m: ModelInfo = serde_json::from_value(serde_json::json!({
            "modelId": "m", "modelName": "m", "deviceId": "gpu:0", "sizeBytes": 30,
            "bytesByDevice": {"cuda:0": 10, "gpu_0": 15, "cpu": 5},
            "loadedAt": "2026-11-26T12:00:00Z", "lastAccess": "2026-11-26T12:00:00Z"
        }))
        .expect("model");
        let m = gpu.model(m).expect("known devices");
        assert_eq!(m.device_id, "cuda:0");
        assert_eq!(m.bytes_by_device, BTreeMap::from([("cpu".into(), 5), ("cuda:0".into(), 25)]));
        let mut tpu = m.clone();
        tpu.bytes_by_device.insert("tpu:7".into(), 0);
        assert!(gpu.model(tpu).is_err());
    }
}
