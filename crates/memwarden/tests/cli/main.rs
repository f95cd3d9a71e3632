//! The `memwarden` binary against a daemon process it started, the packaging under `deploy/`
//! against the config loader, and the layout rules on the crates' sources. One binary, a module
//! per area: `cargo test --test cli layout::`.

#[path = "../cli_support/mod.rs"]
mod cli_support;

mod cli;
mod cli_ops;
mod deploy;
mod layout;
