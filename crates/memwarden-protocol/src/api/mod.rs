//! The REST API's JSON: one type per request body and response, shared by the daemon (which
//! builds and serializes them) and the command-line client (which deserializes them), so that a
//! renamed field breaks the build on both sides. Field names are camelCase, bytes are integers,
//! enums are strings, times are RFC 3339. Every type derives `ToSchema` for the OpenAPI document.
//!
//! Every type's name is its schema's name in the document, so no two types here share a name
//! (`tests/cli/layout.rs` checks); `analytics` is reached by its path.

pub mod allocations;
pub mod analytics;
pub mod envelope;
pub mod models;
pub mod operations;
pub mod optimize;
pub mod owners;
pub mod pools;
pub mod pressure;
pub mod status;
pub mod transfer;
pub mod weights;

pub use allocations::*;
pub use envelope::*;
pub use models::*;
pub use operations::*;
pub use optimize::*;
pub use owners::*;
pub use pools::*;
pub use pressure::*;
pub use status::*;
pub use transfer::*;
pub use weights::*;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// A time as the API writes it: RFC 3339 (empty when it cannot be formatted).
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests;
