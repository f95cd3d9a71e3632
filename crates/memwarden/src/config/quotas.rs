//! `[[quotas]]`: per-owner byte limits per device and memory kind, as written in the file and in
//! the canonical form the service enforces (`service::quota`).

use memwarden_core::{DeviceId, MemoryKind};
use serde::Deserialize;
use std::fmt;

/// `device` or `memory_type` of a quota that covers every device, or every kind, together.
pub const ANY: &str = "*";

fn any() -> String {
    ANY.into()
}

/// One `[[quotas]]` entry as written: allocations whose `owner` is `owner` may hold at most
/// `max_bytes` on `device` in `memory_type`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuotaEntry {
    /// The allocations' `owner`, matched exactly (case-sensitive).
    pub owner: String,
    /// A device id or alias (`cpu`, `cuda:0`, `gpu-0`, …), or `*` (the default): the owner's
    /// bytes on every device together.
    #[serde(default = "any")]
    pub device: String,
    /// `host` | `pinned` | `device` | `reservation`, or `*` (the default): the owner's bytes of
    /// every kind together.
    #[serde(default = "any")]
    pub memory_type: String,
    /// The limit, in bytes as the pools count them (an allocation's `allocatedSize`: the request
    /// rounded up to 256 bytes; a reservation's own size). Above 0.
    pub max_bytes: u64,
}

/// A quota in canonical form: the device id canonical, `None` for `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaRule {
    pub owner: String,
    pub device: Option<DeviceId>,
    pub kind: Option<MemoryKind>,
    pub max_bytes: u64,
}

impl QuotaRule {
    /// Whether bytes on `device` of `kind` count against this quota (whoever holds them).
    pub fn covers(&self, device: DeviceId, kind: MemoryKind) -> bool {
        self.device.is_none_or(|d| d == device) && self.kind.is_none_or(|k| k == kind)
    }

    /// The quota's device as the API writes it: the canonical id, or `*`.
    pub fn device_text(&self) -> String {
        self.device.map_or_else(any, |d| d.to_string())
    }

    /// The quota's kind as the API writes it: the kind, or `*`.
    pub fn kind_text(&self) -> &'static str {
        self.kind.map_or(ANY, MemoryKind::as_str)
    }
}

/// What a quota covers, in words: `pinned memory on cpu`, `memory of all kinds on all devices`.
pub struct Scope(pub Option<DeviceId>, pub Option<MemoryKind>);

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(k) => write!(f, "{k} memory")?,
            None => f.write_str("memory of all kinds")?,
        }
        match self.0 {
            Some(d) => write!(f, " on {d}"),
            None => f.write_str(" on all devices"),
        }
    }
}

/// The entries in canonical form, or what is wrong with the first bad one: an empty owner, an
/// unknown device id or memory type, a zero limit, or a second entry for the same owner,
/// device and kind (aliases count as their canonical id).
pub fn rules(entries: &[QuotaEntry]) -> Result<Vec<QuotaRule>, String> {
    let mut out: Vec<QuotaRule> = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let at = format!("quotas[{i}] (owner {:?})", e.owner);
        if e.owner.trim().is_empty() {
            return Err(format!("quotas[{i}]: owner must not be empty"));
        }
        let device = match e.device.trim() {
            ANY => None,
            text => Some(text.parse::<DeviceId>().map_err(|err| format!("{at}: device {text:?}: {err}; or \"*\""))?),
        };
        let kind = match e.memory_type.trim() {
            ANY => None,
            text => Some(text.parse::<MemoryKind>().map_err(|err| format!("{at}: memory_type: {err}; or \"*\""))?),
        };
        if e.max_bytes == 0 {
            return Err(format!("{at}: max_bytes must be above 0"));
        }
        let rule = QuotaRule { owner: e.owner.clone(), device, kind, max_bytes: e.max_bytes };
        if let Some(j) =
            out.iter().position(|r| r.owner == rule.owner && r.device == rule.device && r.kind == rule.kind)
        {
            return Err(format!(
                "{at}: a second quota for {} (first: quotas[{j}]); give each owner, device and memory type one",
                Scope(device, kind)
            ));
        }
        out.push(rule);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use memwarden_core::units::GIB;

    fn entry(owner: &str, device: &str, memory_type: &str, max_bytes: u64) -> QuotaEntry {
        QuotaEntry { owner: owner.into(), device: device.into(), memory_type: memory_type.into(), max_bytes }
    }

    #[test]
    fn entries_become_canonical_rules() {
        let rules = rules(&[entry("a", "CPU_0", "pinned", 10), entry("a", "*", "*", 20), entry("b", "gpu-1", "*", 5)])
            .expect("valid");
        assert_eq!(
            rules[0],
            QuotaRule { owner: "a".into(), device: Some(DeviceId::Cpu), kind: Some(MemoryKind::Pinned), max_bytes: 10 }
        );
        assert_eq!((rules[1].device, rules[1].kind), (None, None));
        assert_eq!(rules[2].device, Some(DeviceId::cuda(1)));
        assert!(rules[1].covers(DeviceId::cuda(3), MemoryKind::Reservation));
        assert!(!rules[0].covers(DeviceId::Cpu, MemoryKind::Host));
        assert_eq!(
            (rules[0].device_text(), rules[1].device_text(), rules[1].kind_text()),
            ("cpu".into(), "*".into(), "*")
        );
        assert_eq!(Scope(None, Some(MemoryKind::Pinned)).to_string(), "pinned memory on all devices");
    }

    #[test]
    fn bad_entries_are_named() {
        for (entries, says) in [
            (vec![entry("", "cpu", "host", 1)], "quotas[0]: owner must not be empty"),
            (vec![entry("a", "tpu:7", "host", 1)], "quotas[0] (owner \"a\"): device \"tpu:7\""),
            (vec![entry("a", "cpu", "hbm", 1)], "memory_type: 'hbm' is not a memory kind"),
            (vec![entry("a", "cpu", "host", 0)], "max_bytes must be above 0"),
            (
                vec![entry("a", "cpu", "host", 1), entry("a", "cpu:0", "host", 2)],
                "quotas[1] (owner \"a\"): a second quota",
            ),
            (vec![entry("a", "*", "*", 1), entry("b", "*", "*", 1), entry("a", "*", "*", 2)], "first: quotas[0]"),
        ] {
            let e = rules(&entries).expect_err(says);
            assert!(e.contains(says), "{e}");
        }
        assert!(rules(&[entry("a", "cpu", "host", 1), entry("b", "cpu", "host", 1), entry("a", "cpu", "pinned", 1)])
            .is_ok());
    }

    #[test]
    fn config_validate_refuses_bad_quotas() {
        let validate = |text: &str| {
            let c: crate::config::Config = toml::from_str(text).map_err(|e| e.to_string())?;
            c.validate().map_err(|e| e.to_string()).map(|()| c)
        };
        let one =
            "[[quotas]]\nowner = \"vllm-a\"\ndevice = \"gpu-0\"\nmemory_type = \"pinned\"\nmax_bytes = 1073741824\n";
        let c = validate(one).expect("valid");
        assert_eq!(c.quotas, vec![entry("vllm-a", "gpu-0", "pinned", GIB)]);
        let c = validate("[[quotas]]\nowner = \"b\"\nmax_bytes = 5\n").expect("device and kind default to *");
        assert_eq!((c.quotas[0].device.as_str(), c.quotas[0].memory_type.as_str()), (ANY, ANY));
        for (text, says) in [
            (
                one.replace("pinned", "hbm"),
                "config: quotas[0] (owner \"vllm-a\"): memory_type: 'hbm' is not a memory kind",
            ),
            (one.replace("1073741824", "0"), "max_bytes must be above 0"),
            (
                format!("{one}{}", one.replace("gpu-0", "cuda:0")),
                "quotas[1] (owner \"vllm-a\"): a second quota for pinned memory on cuda:0",
            ),
            (one.replace("gpu-0", "tpu:7"), "device \"tpu:7\""),
            (one.replace("max_bytes", "limit"), "unknown field `limit`"),
        ] {
            let e = validate(&text).expect_err(says);
            assert!(e.contains(says), "{e}");
        }
    }
}
