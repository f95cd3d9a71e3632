//! Direct3D 12 through DXGI (Windows only; elsewhere every call answers `Unavailable`): the
//! adapters (`IDXGIFactory6::EnumAdapterByGpuPreference`), a device on one
//! (`D3D12CreateDevice` at feature level 11_0), and its memory budget and usage
//! (`IDXGIAdapter3::QueryVideoMemoryInfo`, local and non-local segment groups). Under Wine the
//! budget figures are fixed numbers (usage stays 0): callers keep their own accounting and say
//! which source a figure comes from.

/// Why Direct3D 12 cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum D3d12Error {
    /// No DXGI or Direct3D 12 here (another OS, no `d3d12.dll`, no adapter, no device).
    #[error("{0}")]
    Unavailable(String),
    /// A call failed: its name and the HRESULT's words.
    #[error("{call}: {message}")]
    Failed { call: &'static str, message: String },
}

/// One adapter as DXGI describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    /// Its position in DXGI's enumeration (the N of `d3d12:N` counts hardware adapters only,
    /// unless software adapters are included).
    pub dxgi_index: u32,
    pub name: String,
    pub vendor_id: u32,
    pub device_id: u32,
    /// The adapter's LUID, `high:low` in hex (what Windows' tools print).
    pub luid: String,
    pub dedicated_video_memory_bytes: u64,
    pub shared_system_memory_bytes: u64,
    /// The Microsoft Basic Render Driver, WARP or (under Wine) a CPU driver such as lavapipe.
    pub software: bool,
}

/// One segment group's budget and usage (`DXGI_QUERY_VIDEO_MEMORY_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SegmentInfo {
    pub budget_bytes: u64,
    pub usage_bytes: u64,
    pub available_for_reservation_bytes: u64,
    pub reservation_bytes: u64,
}

/// The local (dedicated) and non-local (shared system memory) segment groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryInfo {
    pub local: SegmentInfo,
    pub non_local: SegmentInfo,
}

#[cfg(windows)]
pub use imp::{adapters, D3d12Device};

#[cfg(windows)]
mod imp {
    use super::{AdapterInfo, D3d12Error, MemoryInfo, SegmentInfo};
    use windows::core::Interface;
    use windows::Win32::Graphics::Direct3D::D3D_FEATURE_LEVEL_11_0;
    use windows::Win32::Graphics::Direct3D12::{D3D12CreateDevice, ID3D12Device};
    use windows::Win32::Graphics::Dxgi::{
        CreateDXGIFactory2, IDXGIAdapter1, IDXGIAdapter3, IDXGIFactory6, DXGI_ADAPTER_FLAG_SOFTWARE,
        DXGI_CREATE_FACTORY_FLAGS, DXGI_ERROR_NOT_FOUND, DXGI_GPU_PREFERENCE_UNSPECIFIED, DXGI_MEMORY_SEGMENT_GROUP,
        DXGI_MEMORY_SEGMENT_GROUP_LOCAL, DXGI_MEMORY_SEGMENT_GROUP_NON_LOCAL, DXGI_QUERY_VIDEO_MEMORY_INFO,
    };

    fn failed(call: &'static str) -> impl FnOnce(windows::core::Error) -> D3d12Error {
        move |e| D3d12Error::Failed { call, message: e.message().trim().to_string() + &format!(" ({:#x})", e.code().0) }
    }

    fn factory() -> Result<IDXGIFactory6, D3d12Error> {
        // SAFETY: a plain factory creation; the interface it returns is reference counted.
        unsafe { CreateDXGIFactory2::<IDXGIFactory6>(DXGI_CREATE_FACTORY_FLAGS(0)) }
            .map_err(|e| D3d12Error::Unavailable(format!("no DXGI 1.6 factory (CreateDXGIFactory2): {}", e.message())))
    }

    /// Every adapter DXGI enumerates, in its order, described.
    fn enumerate() -> Result<Vec<(IDXGIAdapter1, AdapterInfo)>, D3d12Error> {
        let factory = factory()?;
        let mut out = Vec::new();
        for i in 0.. {
            // SAFETY: an index query on a live factory; DXGI_ERROR_NOT_FOUND ends the list.
            let adapter: IDXGIAdapter1 =
                match unsafe { factory.EnumAdapterByGpuPreference(i, DXGI_GPU_PREFERENCE_UNSPECIFIED) } {
                    Ok(a) => a,
                    Err(e) if e.code() == DXGI_ERROR_NOT_FOUND => break,
                    Err(e) => return Err(failed("EnumAdapterByGpuPreference")(e)),
                };
            // SAFETY: a live adapter; GetDesc1 fills a plain struct.
            let d = unsafe { adapter.GetDesc1() }.map_err(failed("IDXGIAdapter1::GetDesc1"))?;
            let len = d.Description.iter().position(|&c| c == 0).unwrap_or(d.Description.len());
            let info = AdapterInfo {
                dxgi_index: i,
                name: String::from_utf16_lossy(&d.Description[..len]),
                vendor_id: d.VendorId,
                device_id: d.DeviceId,
                luid: format!("{:08x}:{:08x}", d.AdapterLuid.HighPart as u32, d.AdapterLuid.LowPart),
                dedicated_video_memory_bytes: d.DedicatedVideoMemory as u64,
                shared_system_memory_bytes: d.SharedSystemMemory as u64,
                software: d.Flags & DXGI_ADAPTER_FLAG_SOFTWARE.0 as u32 != 0,
            };
            out.push((adapter, info));
        }
        Ok(out)
    }

    /// The adapters, hardware ones only unless `include_software`.
    pub fn adapters(include_software: bool) -> Result<Vec<AdapterInfo>, D3d12Error> {
        Ok(enumerate()?.into_iter().map(|(_, i)| i).filter(|i| include_software || !i.software).collect())
    }

    /// A Direct3D 12 device on one adapter.
    pub struct D3d12Device {
        // Dropped in this order: the device before the adapter it was made on.
        device: ID3D12Device,
        adapter: IDXGIAdapter3,
        pub info: AdapterInfo,
    }

    impl std::fmt::Debug for D3d12Device {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("D3d12Device").field("info", &self.info).finish_non_exhaustive()
        }
    }

    // SAFETY: ID3D12Device and IDXGIAdapter3 are free-threaded COM objects (Direct3D 12's
    // device and DXGI's adapters may be used from any thread).
    unsafe impl Send for D3d12Device {}
    // SAFETY: as above; every method here takes `&self` and calls thread-safe interfaces.
    unsafe impl Sync for D3d12Device {}

    impl D3d12Device {
        /// A device on the adapter whose DXGI index is `dxgi_index`.
        pub fn open(dxgi_index: u32) -> Result<D3d12Device, D3d12Error> {
            let (adapter, info) = enumerate()?
                .into_iter()
                .find(|(_, i)| i.dxgi_index == dxgi_index)
                .ok_or_else(|| D3d12Error::Unavailable(format!("no DXGI adapter {dxgi_index}")))?;
            let adapter: IDXGIAdapter3 = adapter.cast().map_err(failed("QueryInterface(IDXGIAdapter3)"))?;
            let mut device: Option<ID3D12Device> = None;
            // SAFETY: a live adapter and an out-parameter for the device.
            unsafe { D3D12CreateDevice(&adapter, D3D_FEATURE_LEVEL_11_0, &mut device) }
                .map_err(|e| D3d12Error::Unavailable(format!("D3D12CreateDevice on {}: {}", info.name, e.message())))?;
            let device =
                device.ok_or_else(|| D3d12Error::Unavailable("D3D12CreateDevice returned no device".into()))?;
            Ok(D3d12Device { adapter, device, info })
        }

        fn segment(&self, group: DXGI_MEMORY_SEGMENT_GROUP) -> Result<SegmentInfo, D3d12Error> {
            let mut m = DXGI_QUERY_VIDEO_MEMORY_INFO::default();
            // SAFETY: a live adapter, node 0, and an out-pointer to a local.
            unsafe { self.adapter.QueryVideoMemoryInfo(0, group, &mut m) }.map_err(failed("QueryVideoMemoryInfo"))?;
            Ok(SegmentInfo {
                budget_bytes: m.Budget,
                usage_bytes: m.CurrentUsage,
                available_for_reservation_bytes: m.AvailableForReservation,
                reservation_bytes: m.CurrentReservation,
            })
        }

        /// The process's budget and usage in both segment groups, as DXGI reports them.
        pub fn memory_info(&self) -> Result<MemoryInfo, D3d12Error> {
            Ok(MemoryInfo {
                local: self.segment(DXGI_MEMORY_SEGMENT_GROUP_LOCAL)?,
                non_local: self.segment(DXGI_MEMORY_SEGMENT_GROUP_NON_LOCAL)?,
            })
        }

        /// The device (for the backend's heaps and queues, in the port).
        pub fn device(&self) -> &ID3D12Device {
            &self.device
        }
    }
}

/// Direct3D 12 exists only on Windows.
#[cfg(not(windows))]
pub fn adapters(_include_software: bool) -> Result<Vec<AdapterInfo>, D3d12Error> {
    Err(D3d12Error::Unavailable("Direct3D 12 is a Windows API".into()))
}

/// Under Wine (scripts/test-windows): Direct3D 12 on vkd3d over Mesa's lavapipe, under Xvfb.
#[cfg(all(test, windows))]
mod tests {
    use super::*;

    #[test]
    fn adapters_are_listed_and_a_device_reports_its_budget() {
        let all = adapters(true).expect("DXGI 1.6");
        assert!(!all.is_empty(), "no adapter at all");
        let hardware = adapters(false).expect("DXGI 1.6");
        assert!(hardware.iter().all(|a| !a.software && all.contains(a)), "{hardware:?} within {all:?}");
        for a in &all {
            println!(
                "adapter {}: {} (vendor {:#06x}, LUID {}, {} MiB dedicated, software {})",
                a.dxgi_index,
                a.name,
                a.vendor_id,
                a.luid,
                a.dedicated_video_memory_bytes >> 20,
                a.software
            );
        }
        let dev = D3d12Device::open(all[0].dxgi_index).expect("D3D12CreateDevice");
        let m = dev.memory_info().expect("QueryVideoMemoryInfo");
        println!("budget: local {:?}, non-local {:?}", m.local, m.non_local);
        assert!(m.local.budget_bytes > 0 || m.non_local.budget_bytes > 0, "{m:?}");
        assert!(matches!(D3d12Device::open(u32::MAX), Err(D3d12Error::Unavailable(_))));
        drop(dev); // the device before its adapter: the other order crashes vkd3d under Wine 8
    }
}
