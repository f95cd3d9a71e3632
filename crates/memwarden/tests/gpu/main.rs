//! GPU backends. The Vulkan tests run everywhere on Mesa's lavapipe (a CPU Vulkan driver; CI has
//! it, `scripts/test` installs it), their `vulkan::nvidia` module only with the `hw-tests`
//! feature. `gpu`, `gpu_models` and `gpu_weights` need a real NVIDIA GPU and the `hw-tests`
//! feature: they fail, not skip, without one, and run one at a time (`--test-threads=1`) on
//! the GPU machine (`scripts/device-bundle`, `scripts/device-jobs/`). One binary, a module per
//! area: `cargo test --test gpu --features memwarden/hw-tests gpu_weights:: -- --test-threads=1`.

#[path = "../common/mod.rs"]
mod common;

#[cfg(feature = "hw-tests")]
mod gpu;
#[cfg(feature = "hw-tests")]
mod gpu_models;
#[cfg(feature = "hw-tests")]
mod gpu_weights;
mod vulkan;
mod vulkan_no_driver;
