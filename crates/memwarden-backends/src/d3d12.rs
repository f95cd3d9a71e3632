//! `d3d12:N`: GPUs through Direct3D 12 (Windows). For now the adapters and their memory status:
//! every DXGI adapter (the software ones with `include_software`), its dedicated memory as the
//! total and its budget less the larger of DXGI's usage and memwarden's own as available,
//! `source` naming which figure set it (`dxgi-budget`, or `dxgi-dedicated` where the budget is
//! not reported). Blocks (heaps with placed buffers, copies on a copy queue) come with the rest
//! of the port: the device offers no memory type yet, so an allocation is refused by name.

#[cfg(windows)]
pub use imp::{discover, D3d12Backend};

/// Total, available and the source, from an adapter's dedicated memory and DXGI's local budget.
/// (Here on every platform so its test runs in CI.)
#[cfg_attr(not(windows), allow(dead_code))]
fn totals(dedicated_bytes: u64, budget_bytes: u64, usage_bytes: u64) -> (u64, u64, &'static str) {
    if budget_bytes == 0 {
        return (dedicated_bytes, dedicated_bytes, "dxgi-dedicated");
    }
    let total = if dedicated_bytes > 0 { dedicated_bytes } else { budget_bytes };
    (total, budget_bytes.saturating_sub(usage_bytes).min(total), "dxgi-budget")
}

#[cfg(windows)]
mod imp {
    use super::totals;
    use crate::backend::{Backend, BackendError, BlockMemory, DeviceInfo, MemoryReading};
    use memwarden_core::{DeviceId, GpuApi, MemoryKind};
    use memwarden_sys::d3d12::{self, D3d12Device};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    pub struct D3d12Backend {
        device: D3d12Device,
        info: DeviceInfo,
    }

    impl D3d12Backend {
        pub fn new(n: u32, device: D3d12Device) -> Self {
            let a = device.info.clone();
            let mut extra = BTreeMap::new();
            extra.insert("api".to_string(), "d3d12".to_string());
            extra.insert("vendorId".into(), format!("0x{:04x}", a.vendor_id));
            extra.insert("pciDeviceId".into(), format!("0x{:04x}", a.device_id));
            extra.insert("luid".into(), a.luid.clone());
            extra.insert("dxgiIndex".into(), a.dxgi_index.to_string());
            extra.insert("dedicatedVideoMemory".into(), a.dedicated_video_memory_bytes.to_string());
            extra.insert("sharedSystemMemory".into(), a.shared_system_memory_bytes.to_string());
            extra.insert("software".into(), a.software.to_string());
            extra.insert("blocks".into(), "not yet: the Direct3D 12 port's heaps and copies come next".into());
            let info = DeviceInfo {
                device_id: DeviceId::Gpu(GpuApi::D3d12, n),
                device_type: "GPU",
                name: a.name,
                memory_type: "VRAM",
                gpu: None,
                extra,
            };
            D3d12Backend { device, info }
        }

        /// What any block operation answers until the port's heaps and copies exist.
        fn no_blocks(&self) -> BackendError {
            BackendError::UnsupportedKind { device: self.info.device_id, kind: MemoryKind::Device }
        }
    }

    impl Backend for D3d12Backend {
        fn info(&self) -> &DeviceInfo {
            &self.info
        }

        /// None yet: an allocation here is refused before any block is asked for.
        fn kinds(&self) -> &[MemoryKind] {
            &[]
        }

        fn read_status(&self) -> Result<MemoryReading, BackendError> {
            let m = self
                .device
                .memory_info()
                .map_err(|e| BackendError::Failed { operation: "QueryVideoMemoryInfo", message: e.to_string() })?;
            let (total, available, source) =
                totals(self.device.info.dedicated_video_memory_bytes, m.local.budget_bytes, m.local.usage_bytes);
            Ok(MemoryReading {
                total_bytes: total,
                available_bytes: available,
                used_bytes: total - available,
                source: source.into(),
                reserved_bytes: Some(m.local.reservation_bytes),
                processes: vec![],
            })
        }

        fn max_alignment_bytes(&self) -> u64 {
            // D3D12_DEFAULT_MSAA_RESOURCE_PLACEMENT_ALIGNMENT: the largest placement alignment.
            4 << 20
        }

        fn create_block(&self, _kind: MemoryKind, _size_bytes: u64) -> Result<Box<dyn BlockMemory>, BackendError> {
            Err(self.no_blocks())
        }

        fn copy(
            &self,
            _src: &dyn BlockMemory,
            _src_offset: u64,
            _dst: &dyn BlockMemory,
            _dst_offset: u64,
            _len_bytes: u64,
        ) -> Result<(), BackendError> {
            Err(self.no_blocks())
        }

        fn write(&self, _block: &dyn BlockMemory, _offset: u64, _data: &[u8]) -> Result<(), BackendError> {
            Err(self.no_blocks())
        }

        fn read(&self, _block: &dyn BlockMemory, _offset: u64, _out: &mut [u8]) -> Result<(), BackendError> {
            Err(self.no_blocks())
        }
    }

    /// The `d3d12:N` devices: one per DXGI adapter (hardware only unless `include_software`), in
    /// DXGI's order; the adapters on which no device can be made are left out and named.
    pub fn discover(include_software: bool) -> Result<Vec<Arc<dyn Backend>>, String> {
        let adapters = d3d12::adapters(include_software).map_err(|e| e.to_string())?;
        if adapters.is_empty() {
            return Err("DXGI lists no adapter (d3d12.include_software = true adds WARP and CPU drivers)".into());
        }
        let mut out: Vec<Arc<dyn Backend>> = Vec::new();
        let mut failed = Vec::new();
        for a in adapters {
            match D3d12Device::open(a.dxgi_index) {
                Ok(dev) => out.push(Arc::new(D3d12Backend::new(out.len() as u32, dev))),
                Err(e) => failed.push(format!("{}: {e}", a.name)),
            }
        }
        if out.is_empty() {
            return Err(format!("no Direct3D 12 device could be made: {}", failed.join("; ")));
        }
        for f in failed {
            tracing::warn!("d3d12: an adapter left out: {f}");
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::totals;

    #[test]
    fn available_is_the_budget_less_usage_within_the_dedicated_memory() {
        assert_eq!(totals(8 << 30, 7 << 30, 1 << 30), (8 << 30, 6 << 30, "dxgi-budget"));
        assert_eq!(totals(8 << 30, 16 << 30, 0), (8 << 30, 8 << 30, "dxgi-budget"), "never above the total");
        assert_eq!(totals(8 << 30, 1 << 30, 2 << 30), (8 << 30, 0, "dxgi-budget"), "over budget: none");
        assert_eq!(totals(2 << 30, 0, 0), (2 << 30, 2 << 30, "dxgi-dedicated"));
        assert_eq!(totals(0, 4 << 30, 0), (4 << 30, 4 << 30, "dxgi-budget"), "an integrated GPU: the budget");
    }
}
