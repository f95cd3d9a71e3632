//! memwarden: one daemon per ML inference host that owns the truth about host, GPU and model
//! memory. `service` holds the logic, `api` the REST layer over it, `cli` the client commands,
//! `config` the settings, `server` the process that ties them together.

pub mod analytics;
pub mod api;
pub mod cli;
pub mod config;
pub mod optimizer;
pub mod server;
pub mod service;
pub mod supervisor;
