//! The device's memory status: its device-local heaps, with the budget where the driver has one.

use super::VulkanDevice;
use crate::vulkan::HeapReading;
use ash::vk;

impl VulkanDevice {
    /// The device-local heaps now, with `VK_EXT_memory_budget`'s budget and usage when the
    /// device supports it (`usage` counts this process only).
    pub fn heaps(&self) -> Vec<HeapReading> {
        let raw = self.instance.raw();
        let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
        let mut p2 = vk::PhysicalDeviceMemoryProperties2::default();
        if self.info.memory_budget {
            p2 = p2.push_next(&mut budget);
        }
        // SAFETY: the chain holds only the budget structure, and only when the device supports
        // the extension; both live for the call.
        unsafe { raw.get_physical_device_memory_properties2(self.physical, &mut p2) };
        let heaps: Vec<(usize, u64)> = p2
            .memory_properties
            .memory_heaps_as_slice()
            .iter()
            .enumerate()
            .filter(|(_, h)| h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL))
            .map(|(i, h)| (i, h.size))
            .collect();
        let with_budget = self.info.memory_budget;
        heaps
            .into_iter()
            .map(|(i, size)| HeapReading {
                size_bytes: size,
                budget_bytes: with_budget.then(|| budget.heap_budget[i]),
                usage_bytes: with_budget.then(|| budget.heap_usage[i]),
            })
            .collect()
    }
}
