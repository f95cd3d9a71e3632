//! The API over real loopback HTTP, the daemon in-process (`common::TestServer`): every route and
//! its bad inputs, the contract, the dashboard, analytics and `/metrics`, defragmentation,
//! paged listings, background operations, host pressure, quotas and transfers. One binary, a
//! module per area: `cargo test --test http pressure::`.

#[path = "../common/mod.rs"]
mod common;

mod analytics;
mod contract;
mod dashboard;
mod defrag;
mod http;
mod listing;
mod operations;
mod pressure;
mod quotas;
mod transfer;
