//! A Vulkan loader with no driver (ICD): `vulkan` is unavailable in `/health` with the reason.
//! The loader's driver list comes from the process environment, so the check runs in a child
//! process of this test binary (the `child` test, ignored otherwise) with that environment set:
//! the other Vulkan tests of this binary keep theirs.

use crate::common::TestServer;
use memwarden::config::Config;

#[test]
fn a_loader_without_a_driver_leaves_vulkan_unavailable_with_the_reason() {
    // The loader's variables for its driver manifests (VK_DRIVER_FILES since loader 1.3.207).
    let out = std::process::Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--ignored", "--exact", "vulkan_no_driver::child", "--nocapture", "--test-threads=1"])
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the child failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("1 passed"), "the child test did not run:\n{stdout}");
}

#[test]
#[ignore = "run as a child process by a_loader_without_a_driver_leaves_vulkan_unavailable_with_the_reason"]
fn child() {
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
