//! Faults survived: signals, resource limits, a full tmpfs and misbehaving workers against the
//! real daemon, a device that fails on demand, and a defragmentation pass whose copies are held
//! at a gate (both the testkit's `SimulatedBackend`). One binary, a module per area:
//! `cargo test --test faults defrag_concurrency::`.

#[path = "../common/mod.rs"]
mod common;

mod defrag_concurrency;
mod faults;
