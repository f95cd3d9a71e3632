//! What the in-process benchmarks share (`list_bench`, `scale_bench`): a service holding LIVE
//! 4 KiB host allocations (50 owners, 10 purposes), served on a loopback port.

use memwarden::config::Config;
use memwarden::service::{AllocateRequest, Service};
use memwarden_core::MemoryKind;
use std::sync::Arc;

/// A daemon's config without workers or socket, and a service made from it holding `live`
/// 4 KiB host allocations: owner `owner-{i % 50}`, purpose `purpose-{i % 10}`.
pub fn filled_service(live: usize) -> (Config, Arc<Service>) {
    let mut config = Config::default();
    config.workers.enabled = false;
    config.workers.socket = "none".into();
    let service = Arc::new(Service::from_config(&config));
    for i in 0..live {
        service
            .allocate(AllocateRequest {
                purpose: Some(format!("purpose-{}", i % 10)),
                owner: Some(format!("owner-{}", i % 50)),
                kind: Some(MemoryKind::Host),
                ..AllocateRequest::new("cpu", 4096)
            })
            .expect("allocate");
    }
    (config, service)
}

/// Serves `service` on a loopback port from its own thread and runtime: its base URL, and a
/// stop that ends the server and waits for it.
pub fn serve(config: Config, service: Arc<Service>) -> (String, impl FnOnce()) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addr_tx.send(listener.local_addr().expect("addr")).expect("send addr");
            memwarden::server::serve_on(listener, service, &config, async {
                let _ = stop_rx.await;
            })
            .await
            .expect("serve");
        });
    });
    let base = format!("http://{}", addr_rx.recv().expect("address"));
    (base, move || {
        let _ = stop_tx.send(());
        let _ = server.join();
    })
}
