//! Small helpers every room uses.

use std::sync::{Mutex, MutexGuard};
use time::OffsetDateTime;

/// Locks a mutex, recovering it after a panic elsewhere: the data under memwarden's locks is
/// plain (no invariant is half-applied across the calls made under them), so a poisoned lock
/// is not a reason to fail every later request.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// RFC 3339 UTC, as every timestamp in the API is written.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
