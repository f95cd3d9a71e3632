//! A Vulkan loader with no driver (ICD): `vulkan` is unavailable in `/health` with the reason.
//! Its own test binary, because the loader's driver list comes from the process environment.

mod common;

use common::TestServer;
use memwarden::config::Config;

#[test]
fn a_loader_without_a_driver_leaves_vulkan_unavailable_with_the_reason() {
    // The loader's variables for its driver manifests (VK_DRIVER_FILES since loader 1.3.207).
    std::env::set_var("VK_ICD_FILENAMES", "/nonexistent/icd.json");
    std::env::set_var("VK_DRIVER_FILES", "/nonexistent/icd.json");
    let mut config = Config::default();
    config.vulkan.include_software = true;
    let s = TestServer::start_with(config);
    let (status, h) = s.call("GET", "/health", None);
    assert_eq!(status, 200, "{h}");
    let backends = h["data"]["backends"].as_array().expect("backends");
    let vk = backends.iter().find(|b| b["name"] == "vulkan").expect("vulkan listed");
    assert_eq!(vk["available"], false, "{vk}");
    assert!(vk["reason"].as_str().is_some_and(|r| r.contains("no Vulkan driver")), "{vk}");
    assert!(backends.iter().any(|b| b["name"] == "host" && b["available"] == true));
}
