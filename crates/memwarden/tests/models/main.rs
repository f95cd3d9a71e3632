//! Models, weights and the processes around them, on cpu: supervised Python workers loading
//! real `.safetensors` files, memwarden-held weights, processes mapping them, and memory a
//! client allocates over its connection. The helper scripts these tests run are in `helpers/`.
//! One binary, a module per area: `cargo test --test models workers::`.

#[path = "../common/mod.rs"]
mod common;

mod checkpoints;
mod client_memory;
mod weights;
mod weights_clients;
mod workers;
