//! memwarden: one daemon per ML inference host that owns the truth about host, GPU and model
//! memory. The rooms, from the bottom up: `config` (settings), `service` (devices, pools,
//! ledger, transfers, defragmentation), `supervisor` (the Python processes that hold models),
//! `models` (one view of the models they hold), `pressure` (the monitor), `optimizer` (the
//! release ladder, watchdog and admission), `analytics` (history, reports, recommendations,
//! metrics), `operations` (long work run in the background, with its progress), `api` (REST
//! handlers and response types), `server` (the process that ties them together) and `cli` (the
//! client commands).

pub mod analytics;
pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod models;
pub mod operations;
pub mod optimizer;
pub mod placement;
pub mod pressure;
pub mod server;
pub mod service;
pub mod supervisor;
pub mod sync;
#[cfg(test)]
mod test_dirs;
pub mod weights;
