//! Host pressure signals: what the OS says about memory pressure beyond a memory reading. Not
//! part of [`crate::Backend`] (a device's memory and blocks): the pressure monitor gets them on
//! their own, from discovery ([`crate::Discovered::host_signals`]).

use memwarden_core::pressure::PsiReading;

/// A kernel trigger that fires when tasks stall on memory. Owns the registration (the open
/// pressure file): dropping it unregisters.
pub trait StallTrigger: Send {
    /// Waits up to `timeout_ms` for the trigger: `Ok(true)` when it fired, `Ok(false)` on
    /// timeout, `Err` when it can no longer fire (the reason).
    fn wait(&self, timeout_ms: i32) -> Result<bool, String>;
}

/// The host's pressure signals (owned by the host backend's status reader, which they share:
/// whether a cgroup limit applies is what the host's last memory reading found). Owns the
/// stall information (PSI), the cgroup's limit events and the stall trigger; nothing else.
pub trait HostSignals: Send + Sync {
    /// Memory stall information (PSI), where the OS has it.
    fn pressure_stall(&self) -> Option<PsiReading>;

    /// A counter that grows each time the host's memory limit is hit or the OOM killer acts
    /// (this process's cgroup), when a limit applies.
    fn limit_events(&self) -> Option<u64>;

    /// A kernel trigger that fires on memory stall (`spec` as PSI writes it, e.g.
    /// `some 150000 2000000`); `Err`: why the kernel refused.
    fn stall_trigger(&self, spec: &str) -> Result<Box<dyn StallTrigger>, String>;
}

impl StallTrigger for memwarden_sys::PsiTrigger {
    fn wait(&self, timeout_ms: i32) -> Result<bool, String> {
        memwarden_sys::PsiTrigger::wait(self, timeout_ms).map_err(|e| e.to_string())
    }
}
