//! Test support for memwarden, used as a dev-dependency only: the [`SimulatedBackend`] that
//! tests and examples build instead of writing a backend of their own, and the backend
//! [`conformance`] suite every backend's tests run.

pub mod conformance;
mod simulated;

pub use simulated::{
    Controls, CopyFault, SimulatedBackend, INJECTED, INJECTED_CREATE_OPERATION, INJECTED_WRITE_OPERATION,
};

#[cfg(test)]
mod tests;
