//! Memory a peer allocates over its connection (version 2, peer → daemon): owned by the
//! connection, so it is freed (`reclaimed`) when the connection closes, whether the process
//! closed it or died.

use serde::{Deserialize, Serialize};

fn default_device() -> String {
    "cpu".into()
}

/// `allocate` data: the REST allocate body's fields, without an owner process (the connection
/// is the owner).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAllocate {
    pub size_bytes: u64,
    #[serde(default = "default_device")]
    pub device_id: String,
    /// `host`, `pinned`, `device` or `reservation` (the seed's spellings too); the device's
    /// default when absent.
    #[serde(default)]
    pub memory_type: Option<String>,
    #[serde(default)]
    pub alignment: Option<u64>,
    #[serde(default)]
    pub purpose: Option<String>,
    /// Whose quota it counts against; the peer's name when absent.
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub movable: Option<bool>,
}

/// `free` data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerFree {
    pub allocation_id: String,
}

/// `export` data: any allocation (as the REST route's), not only the connection's own.
pub type PeerExport = PeerFree;
