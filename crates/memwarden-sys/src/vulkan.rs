//! Vulkan through `ash`, with the loader (`libvulkan.so.1`) opened at run time: the binary has no
//! link-time dependency on it, and a host without a loader, without a driver (ICD) or without a
//! device gets [`VulkanError::Unavailable`] with the reason.
//!
//! [`VulkanInstance`] lists the physical devices ([`PhysicalDeviceInfo`]: name, vendor, driver,
//! UUID, type, device-local heaps). [`VulkanDevice`] is one opened device with a queue that can
//! transfer; its [`DeviceMemory`] blocks are device-local `vkAllocateMemory` allocations with a
//! `VkBuffer` bound over the whole block, so every copy is a `vkCmdCopyBuffer`.

use ash::vk;
use std::ffi::CStr;
use std::path::Path;
use std::sync::Arc;

mod device;
pub(crate) use device::MappingImport;
pub use device::{
    copy, copy_host, DeviceMemory, ExportedMemory, HostCopy, HostPath, VulkanDevice, BLOCK_ALIGNMENT_BYTES,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VulkanError {
    /// No loader, no driver (ICD), or no device: the backend is unavailable.
    #[error("{0}")]
    Unavailable(String),
    #[error("Vulkan out of memory: {operation} of {bytes} bytes")]
    OutOfMemory { operation: &'static str, bytes: u64 },
    /// A range outside its block; nothing was done.
    #[error("range {offset_bytes}+{len_bytes} is outside a block of {block_bytes} bytes")]
    OutOfBounds { offset_bytes: u64, len_bytes: u64, block_bytes: u64 },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{operation} failed: {result}")]
    Driver { operation: &'static str, result: String },
}

impl VulkanError {
    fn from_vk(operation: &'static str, bytes: u64, r: vk::Result) -> Self {
        match r {
            vk::Result::ERROR_OUT_OF_DEVICE_MEMORY | vk::Result::ERROR_OUT_OF_HOST_MEMORY => {
                VulkanError::OutOfMemory { operation, bytes }
            }
            other => VulkanError::Driver { operation, result: format!("{other:?}") },
        }
    }
}

/// What kind of device a physical device is (`VkPhysicalDeviceType`). Software drivers such as
/// Mesa's lavapipe are [`DeviceType::Cpu`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceType {
    Discrete,
    Integrated,
    Virtual,
    Cpu,
    Other,
}

impl DeviceType {
    fn from_vk(t: vk::PhysicalDeviceType) -> Self {
        match t {
            vk::PhysicalDeviceType::DISCRETE_GPU => DeviceType::Discrete,
            vk::PhysicalDeviceType::INTEGRATED_GPU => DeviceType::Integrated,
            vk::PhysicalDeviceType::VIRTUAL_GPU => DeviceType::Virtual,
            vk::PhysicalDeviceType::CPU => DeviceType::Cpu,
            _ => DeviceType::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceType::Discrete => "discrete",
            DeviceType::Integrated => "integrated",
            DeviceType::Virtual => "virtual",
            DeviceType::Cpu => "cpu",
            DeviceType::Other => "other",
        }
    }
}

/// What is fixed about one physical device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhysicalDeviceInfo {
    /// Its place in `vkEnumeratePhysicalDevices`' list.
    pub index: u32,
    pub name: String,
    /// PCI vendor id (0x10de NVIDIA, 0x1002 AMD, 0x8086 Intel; 0x10005 Mesa for lavapipe).
    pub vendor_id: u32,
    pub device_type: DeviceType,
    /// `VkPhysicalDeviceDriverProperties` (Vulkan 1.2 or VK_KHR_driver_properties), when known.
    pub driver_name: Option<String>,
    pub driver_info: Option<String>,
    /// The driver's own version number (its encoding is the vendor's).
    pub driver_version: u32,
    /// `major.minor.patch`.
    pub api_version: String,
    /// `VkPhysicalDeviceIDProperties::deviceUUID` (Vulkan 1.1), all zeroes when unknown; for
    /// NVIDIA it equals CUDA's device UUID.
    pub uuid: [u8; 16],
    /// Whether `VK_EXT_memory_budget` is supported.
    pub memory_budget: bool,
    /// Whether `VK_KHR_external_memory_fd` is supported (blocks can be exported as opaque fds).
    pub external_memory_fd: bool,
    /// Whether `VK_EXT_external_memory_host` is supported (host memory can be imported, so
    /// copies to and from host blocks need no staging buffer).
    pub external_memory_host: bool,
    /// `VK_EXT_pci_bus_info`, as nvidia-smi prints it (`00000000:18:00.0`), when known.
    pub pci_bus_id: Option<String>,
    /// Sizes of the device-local heaps, bytes.
    pub device_local_heaps: Vec<u64>,
}

impl PhysicalDeviceInfo {
    /// The UUID as nvidia-smi prints a GPU's (`GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`).
    pub fn uuid_string(&self) -> String {
        let hex: String = self.uuid.iter().map(|x| format!("{x:02x}")).collect();
        format!("GPU-{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
    }

    /// The vendor's name for the PCI vendor ids of GPU makers, else the id in hex.
    pub fn vendor(&self) -> String {
        match self.vendor_id {
            0x10de => "NVIDIA".into(),
            0x1002 | 0x1022 => "AMD".into(),
            0x8086 => "Intel".into(),
            0x13b5 => "ARM".into(),
            0x5143 => "Qualcomm".into(),
            0x10005 => "Mesa".into(),
            other => format!("0x{other:04x}"),
        }
    }
}

/// The loader and one instance (Vulkan 1.1, for the `…2` property queries).
pub struct VulkanInstance {
    // Kept alive for the instance's function pointers (the loader library stays open).
    _entry: ash::Entry,
    instance: ash::Instance,
}

impl std::fmt::Debug for VulkanInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VulkanInstance").finish_non_exhaustive()
    }
}

const API_VERSION: u32 = vk::API_VERSION_1_1;

fn version_text(v: u32) -> String {
    format!("{}.{}.{}", vk::api_version_major(v), vk::api_version_minor(v), vk::api_version_patch(v))
}

fn c_text(s: Result<&CStr, std::ffi::FromBytesUntilNulError>) -> String {
    s.map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

impl VulkanInstance {
    /// Opens the loader (`loader`: a path to `libvulkan.so.1`; `None`: the system's) and creates
    /// an instance. `Err(Unavailable)` says which of loader, driver or API version is missing.
    pub fn new(loader: Option<&Path>) -> Result<Arc<Self>, VulkanError> {
        // SAFETY: loading the library runs its initialisers; the Vulkan loader is a well-known
        // library whose initialisers are safe to run, and the entry is kept for the instance's life.
        let entry = unsafe {
            match loader {
                Some(path) => ash::Entry::load_from(path),
                None => ash::Entry::load(),
            }
        }
        .map_err(|e| {
            VulkanError::Unavailable(match loader {
                Some(p) => format!("no Vulkan loader at {}: {e}", p.display()),
                None => format!("no Vulkan loader (libvulkan.so.1; Debian/Ubuntu package libvulkan1): {e}"),
            })
        })?;
        // SAFETY: a plain query on a loaded entry.
        let version = unsafe { entry.try_enumerate_instance_version() }
            .map_err(|e| VulkanError::Unavailable(format!("vkEnumerateInstanceVersion: {e:?}")))?
            .unwrap_or(vk::API_VERSION_1_0);
        if version < API_VERSION {
            return Err(VulkanError::Unavailable(format!(
                "the Vulkan loader supports {}; memwarden needs 1.1",
                version_text(version)
            )));
        }
        let app = vk::ApplicationInfo::default()
            .application_name(c"memwarden")
            .engine_name(c"memwarden")
            .api_version(API_VERSION);
        let create = vk::InstanceCreateInfo::default().application_info(&app);
        // SAFETY: the create info and what it points to live for the call; the instance is
        // destroyed in Drop.
        let instance = unsafe { entry.create_instance(&create, None) }.map_err(|e| match e {
            vk::Result::ERROR_INCOMPATIBLE_DRIVER => VulkanError::Unavailable(
                "no Vulkan driver (ICD) for this loader: vkCreateInstance returned ERROR_INCOMPATIBLE_DRIVER \
                 (check VK_ICD_FILENAMES / /usr/share/vulkan/icd.d)"
                    .into(),
            ),
            other => VulkanError::Unavailable(format!("vkCreateInstance: {other:?}")),
        })?;
        Ok(Arc::new(VulkanInstance { _entry: entry, instance }))
    }

    pub(crate) fn raw(&self) -> &ash::Instance {
        &self.instance
    }

    fn handles(&self) -> Result<Vec<vk::PhysicalDevice>, VulkanError> {
        // SAFETY: the instance is live for self's lifetime.
        unsafe { self.instance.enumerate_physical_devices() }
            .map_err(|e| VulkanError::from_vk("vkEnumeratePhysicalDevices", 0, e))
    }

    pub(crate) fn handle(&self, index: u32) -> Result<vk::PhysicalDevice, VulkanError> {
        self.handles()?
            .get(index as usize)
            .copied()
            .ok_or_else(|| VulkanError::InvalidArgument(format!("no physical device {index}")))
    }

    /// Every physical device, in the loader's order.
    pub fn physical_devices(&self) -> Result<Vec<PhysicalDeviceInfo>, VulkanError> {
        self.handles()?.into_iter().enumerate().map(|(i, pd)| self.describe(i as u32, pd)).collect()
    }

    pub(crate) fn extensions(&self, pd: vk::PhysicalDevice) -> Result<Vec<String>, VulkanError> {
        // SAFETY: pd came from this instance.
        let list = unsafe { self.instance.enumerate_device_extension_properties(pd) }
            .map_err(|e| VulkanError::from_vk("vkEnumerateDeviceExtensionProperties", 0, e))?;
        Ok(list.iter().map(|e| c_text(e.extension_name_as_c_str())).collect())
    }

    fn describe(&self, index: u32, pd: vk::PhysicalDevice) -> Result<PhysicalDeviceInfo, VulkanError> {
        let extensions = self.extensions(pd)?;
        let has = |name: &CStr| extensions.iter().any(|e| e.as_bytes() == name.to_bytes());
        // SAFETY: pd came from this instance; the out-structures are plain data.
        let props = unsafe { self.instance.get_physical_device_properties(pd) };
        let api = props.api_version;
        let with_driver = api >= vk::API_VERSION_1_2 || has(vk::KHR_DRIVER_PROPERTIES_NAME);
        let with_pci = has(vk::EXT_PCI_BUS_INFO_NAME);
        let mut id = vk::PhysicalDeviceIDProperties::default();
        let mut driver = vk::PhysicalDeviceDriverProperties::default();
        let mut pci = vk::PhysicalDevicePCIBusInfoPropertiesEXT::default();
        let (mut uuid, mut driver_name, mut driver_info, mut pci_bus_id) = ([0u8; 16], None, None, None);
        if api >= vk::API_VERSION_1_1 {
            let mut p2 = vk::PhysicalDeviceProperties2::default().push_next(&mut id);
            if with_driver {
                p2 = p2.push_next(&mut driver);
            }
            if with_pci {
                p2 = p2.push_next(&mut pci);
            }
            // SAFETY: p2's chain holds only structures this device's API version (or its
            // driver-properties and PCI-bus-info extensions) defines, each living for the call.
            unsafe { self.instance.get_physical_device_properties2(pd, &mut p2) };
            uuid = id.device_uuid;
            if with_driver {
                driver_name = Some(c_text(driver.driver_name_as_c_str()));
                driver_info = Some(c_text(driver.driver_info_as_c_str()));
            }
            if with_pci {
                pci_bus_id = Some(format!(
                    "{:08X}:{:02X}:{:02X}.{:X}",
                    pci.pci_domain, pci.pci_bus, pci.pci_device, pci.pci_function
                ));
            }
        }
        // SAFETY: as above.
        let memory = unsafe { self.instance.get_physical_device_memory_properties(pd) };
        let device_local_heaps = memory
            .memory_heaps_as_slice()
            .iter()
            .filter(|h| h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL))
            .map(|h| h.size)
            .collect();
        Ok(PhysicalDeviceInfo {
            index,
            name: c_text(props.device_name_as_c_str()),
            vendor_id: props.vendor_id,
            device_type: DeviceType::from_vk(props.device_type),
            driver_name,
            driver_info,
            driver_version: props.driver_version,
            api_version: version_text(api),
            uuid,
            memory_budget: api >= vk::API_VERSION_1_1 && has(vk::EXT_MEMORY_BUDGET_NAME),
            external_memory_fd: api >= vk::API_VERSION_1_1 && has(vk::KHR_EXTERNAL_MEMORY_FD_NAME),
            external_memory_host: api >= vk::API_VERSION_1_1 && has(vk::EXT_EXTERNAL_MEMORY_HOST_NAME),
            pci_bus_id,
            device_local_heaps,
        })
    }
}

impl Drop for VulkanInstance {
    fn drop(&mut self) {
        // SAFETY: every device opened on this instance holds an Arc to it, so none is left; the
        // instance is destroyed once.
        unsafe { self.instance.destroy_instance(None) };
    }
}

/// How the host reads and writes blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostAccess {
    /// Through a mapping where the block memory is host-visible, else through staging.
    #[default]
    Auto,
    /// Always through the staging buffer and the queue, as on a discrete GPU (tests use it to
    /// take NVIDIA's path on lavapipe, whose device memory is host-visible).
    Staged,
}

/// One device-local heap now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapReading {
    pub size_bytes: u64,
    /// `VK_EXT_memory_budget`: what this process may use of the heap, and what it uses.
    pub budget_bytes: Option<u64>,
    pub usage_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_loader_is_unavailable_with_its_path() {
        let e = VulkanInstance::new(Some(Path::new("/nonexistent/libvulkan.so.1"))).expect_err("no loader there");
        assert!(matches!(&e, VulkanError::Unavailable(r) if r.contains("/nonexistent/libvulkan.so.1")), "{e:?}");
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// On lavapipe (CI installs it; `scripts/test` does too): blocks written, read and copied,
    /// through the mapping and through staging, and an overlapping move within one block.
    #[test]
    fn blocks_on_the_first_device_hold_data_through_mapping_and_staging() {
        let instance = VulkanInstance::new(None).expect("a Vulkan loader and driver (lavapipe) are installed");
        let devices = instance.physical_devices().expect("devices");
        assert!(!devices.is_empty(), "at least one Vulkan device (lavapipe)");
        assert!(!devices[0].device_local_heaps.is_empty(), "a device-local heap");
        const MIB: u64 = 1 << 20;
        for access in [HostAccess::Auto, HostAccess::Staged] {
            let dev = VulkanDevice::open(&instance, 0, access).expect("open");
            if access == HostAccess::Staged {
                assert!(!dev.blocks_mapped(), "staging forced");
            }
            let a = dev.alloc(40 * MIB + 5).expect("alloc a");
            let b = dev.alloc(40 * MIB).expect("alloc b");
            assert_eq!(a.address() % BLOCK_ALIGNMENT_BYTES, 0);
            assert!(dev.own_bytes() >= 80 * MIB);
            // More than one staging step.
            let data = pattern(20 * MIB as usize + 3, 9);
            a.write(MIB, &data).expect("write");
            let mut back = vec![0; data.len()];
            a.read(MIB, &mut back).expect("read");
            assert!(back == data, "{access:?}: read returns what was written");
            copy(&b, 7, &a, MIB, data.len() as u64).expect("copy");
            b.read(7, &mut back).expect("read b");
            assert!(back == data, "{access:?}: copied bytes match");
            let e = copy(&b, 40 * MIB - 1, &a, 0, 2).expect_err("past the end");
            assert!(matches!(e, VulkanError::OutOfBounds { .. }), "{e:?}");
            assert!(a.write(40 * MIB + 4, &[1, 2]).is_err(), "write past the end");
            // Overlapping moves within one block, both ways, over several scratch steps.
            for (from, to) in [(MIB, 3 * MIB), (3 * MIB, MIB)] {
                a.write(from, &data).expect("write");
                copy(&a, to, &a, from, data.len() as u64).expect("move");
                a.read(to, &mut back).expect("read");
                assert!(back == data, "{access:?}: {from} -> {to} moved like memmove");
            }
            drop((a, b));
            assert_eq!(dev.own_bytes(), 0, "freed blocks are no longer counted");
            let heaps = dev.heaps();
            assert!(!heaps.is_empty() && heaps.iter().all(|h| h.size_bytes > 0), "{heaps:?}");
        }
    }

    /// Host mappings copied to and from blocks: through the block's mapping (lavapipe's device
    /// memory is host-visible), and with staging forced (a discrete GPU's case) by importing
    /// the host pages where the driver has `VK_EXT_external_memory_host`, else by staging.
    #[test]
    fn host_mappings_copy_to_and_from_blocks_by_mapping_import_or_staging() {
        const MIB: u64 = 1 << 20;
        let instance = VulkanInstance::new(None).expect("a Vulkan loader and driver (lavapipe) are installed");
        for access in [HostAccess::Auto, HostAccess::Staged] {
            let dev = VulkanDevice::open(&instance, 0, access).expect("open");
            let want = match (dev.blocks_mapped(), dev.imports_host_memory()) {
                (true, _) => HostPath::Mapped,
                (false, true) => HostPath::Imported,
                (false, false) => HostPath::Staged,
            };
            let host = crate::HostMapping::new(24 * MIB, 4096, false).expect("host mapping");
            let block = dev.alloc(24 * MIB).expect("block");
            // An unaligned host range over more than one staging step.
            let len = 20 * MIB + 5;
            let data = pattern(len as usize, 5);
            host.write(4097, &data).expect("host write");
            let path = copy_host(&block, 100, &host, 4097, len, HostCopy::ToDevice).expect("to device");
            eprintln!("{access:?}: {path:?}");
            assert_eq!(path, want, "{access:?}");
            let mut back = vec![0; len as usize];
            block.read(100, &mut back).expect("read");
            assert!(back == data, "{access:?}: the block holds the host bytes");
            host.fill(0, 24 * MIB, 0).expect("clear");
            let path = copy_host(&block, 100, &host, 8191, len, HostCopy::ToHost).expect("to host");
            assert_eq!(path, want, "{access:?}");
            host.read(8191, &mut back).expect("host read");
            assert!(back == data, "{access:?}: the host holds the block's bytes");
            let e = copy_host(&block, 0, &host, 24 * MIB - 1, 2, HostCopy::ToHost).expect_err("past the host end");
            assert!(matches!(e, VulkanError::OutOfBounds { .. }), "{e:?}");
            let e = copy_host(&block, 24 * MIB - 1, &host, 0, 2, HostCopy::ToDevice).expect_err("past the block end");
            assert!(matches!(e, VulkanError::OutOfBounds { .. }), "{e:?}");
            // A locked (pinned) mapping is imported whole on its first copy, and the import is
            // kept by the mapping for the next ones.
            let locked = crate::HostMapping::new(2 * MIB, 4096, true).expect("a 2 MiB locked mapping");
            locked.write(0, &data[..2 * MIB as usize]).expect("write");
            for round in 0..2 {
                let path = copy_host(&block, 0, &locked, 0, 2 * MIB, HostCopy::ToDevice).expect("to device");
                assert_eq!(path, want, "{access:?}");
                let imports = locked.vulkan_imports.lock().expect("lock").len();
                assert_eq!(imports, usize::from(want == HostPath::Imported), "{access:?} round {round}");
            }
            block.read(0, &mut back[..2 * MIB as usize]).expect("read");
            assert!(back[..2 * MIB as usize] == data[..2 * MIB as usize], "{access:?}: bytes of the locked mapping");
            locked.fill(0, 2 * MIB, 0).expect("clear");
            copy_host(&block, 0, &locked, 0, 2 * MIB, HostCopy::ToHost).expect("to host");
            locked.read(0, &mut back[..2 * MIB as usize]).expect("read");
            assert!(back[..2 * MIB as usize] == data[..2 * MIB as usize], "{access:?}: back in the locked mapping");
        }
    }

    /// A block exported as an opaque fd and imported by a second device object (as another
    /// process would): both see the same bytes, written on either side.
    #[test]
    fn blocks_export_as_opaque_fds_that_another_device_imports() {
        const MIB: u64 = 1 << 20;
        let instance = VulkanInstance::new(None).expect("a Vulkan loader and driver (lavapipe) are installed");
        let owner = VulkanDevice::open(&instance, 0, HostAccess::Staged).expect("open");
        owner.export_support().expect("lavapipe exports opaque fds");
        let other = VulkanDevice::open(&instance, 0, HostAccess::Staged).expect("open a second device object");
        let block = owner.alloc(3 * MIB).expect("block");
        let data = pattern(MIB as usize, 11);
        block.write(MIB, &data).expect("write");
        let exported = block.export().expect("export");
        assert!(exported.allocation_bytes >= 3 * MIB);
        let before = owner.own_bytes();
        let imported = other.import_fd(exported, 3 * MIB).expect("import");
        let mut back = vec![0; data.len()];
        imported.read(MIB, &mut back).expect("read the import");
        assert!(back == data, "the import sees the owner's bytes");
        imported.write(0, &data[..4096]).expect("write through the import");
        block.read(0, &mut back[..4096]).expect("read the owner");
        assert!(back[..4096] == data[..4096], "the owner sees the import's bytes");
        assert_eq!(other.own_bytes(), 0, "an import is not counted as the importer's own");
        assert_eq!(owner.own_bytes(), before);
        let e = other.import_fd(block.export().expect("export"), 4 * MIB).expect_err("larger than the allocation");
        assert!(matches!(e, VulkanError::InvalidArgument(_)), "{e:?}");
        // What another process sends is checked before the driver sees it.
        let mut bad = block.export().expect("export");
        bad.memory_type_index = 31;
        let e = other.import_fd(bad, MIB).expect_err("no such memory type");
        assert!(matches!(e, VulkanError::InvalidArgument(ref m) if m.contains("memory type 31")), "{e:?}");
        let mut bad = block.export().expect("export");
        bad.allocation_bytes = 4096;
        let e = other.import_fd(bad, 8192).expect_err("a buffer larger than the allocation");
        assert!(matches!(e, VulkanError::InvalidArgument(_)), "{e:?}");
        let e = imported.export().expect_err("an import is not exported again");
        assert!(matches!(e, VulkanError::InvalidArgument(_)), "{e:?}");
    }

    #[test]
    fn uuids_print_like_nvidia_smi() {
        let info = PhysicalDeviceInfo {
            index: 0,
            name: String::new(),
            vendor_id: 0x10de,
            device_type: DeviceType::Discrete,
            driver_name: None,
            driver_info: None,
            driver_version: 0,
            api_version: "1.3.0".into(),
            uuid: [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8],
            memory_budget: false,
            external_memory_fd: false,
            external_memory_host: false,
            pci_bus_id: None,
            device_local_heaps: vec![],
        };
        assert_eq!(info.uuid_string(), "GPU-12345678-9abc-def0-0102-030405060708");
        assert_eq!(info.vendor(), "NVIDIA");
    }
}
