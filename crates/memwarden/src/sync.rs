//! Locking: the poison-tolerant lock every room uses.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, recovering it after a panic elsewhere: the data under memwarden's locks is
/// plain (no invariant is half-applied across the calls made under them), so a poisoned lock
/// is not a reason to fail every later request.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
