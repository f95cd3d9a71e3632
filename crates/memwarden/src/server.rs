//! Running the daemon: bind, serve the router, shut down on SIGINT/SIGTERM.

use crate::api::{router, AppState};
use crate::config::Config;
use crate::service::Service;
use axum::serve::ListenerExt;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve_on(
    listener: TcpListener,
    service: Arc<Service>,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let pressure =
        crate::pressure::PressureMonitor::new(service.clone(), service.host_signals(), config.pressure.clone());
    pressure.start();
    let supervisor = crate::supervisor::Supervisor::new(
        config.workers.clone(),
        service.device_ids().iter().map(|d| d.to_string()).collect(),
        crate::models::process::ProcessMeter::new(
            config.host.proc_root.clone(),
            (!config.host.shared_memory_dir.as_os_str().is_empty()).then(|| config.host.shared_memory_dir.clone()),
        ),
    );
    let weights = crate::weights::WeightStore::for_service(&service, config);
    let optimizer = crate::optimizer::Optimizer::new(
        service.clone(),
        supervisor.clone(),
        Some(weights.clone()),
        config.optimizer.clone(),
        pressure.thresholds(),
    );
    // The one setter left: a real cycle at run time. The supervisor carries the peers'
    // requests, which the weights store and the optimizer answer, and the optimizer asks the
    // supervisor's workers to release models; registered before any worker starts.
    supervisor.set_peer_requests(Arc::new(crate::peers::WeightsPeer(
        weights.clone(),
        optimizer.clone(),
        service.clone(),
    )));
    weights.start_policy();
    supervisor.start().await;
    start_reaper(&service);
    optimizer.start_watchdog(pressure.subscribe());
    let analytics = crate::analytics::Analytics::new(
        service.clone(),
        supervisor.clone(),
        pressure.clone(),
        config.analytics.clone(),
        config.advice_thresholds(),
    );
    analytics.start();
    // One shutdown signal for the server and every open event stream: graceful shutdown waits
    // for open connections, and an event stream never ends on its own.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let state = AppState {
        service,
        supervisor: supervisor.clone(),
        pressure,
        optimizer,
        analytics,
        weights,
        operations: crate::operations::Operations::new(),
        http_metrics: Default::default(),
        auth_token: config.auth_token.as_deref().map(Arc::from),
        max_body_bytes: config.api.max_body_bytes,
        shutdown: stop_rx.clone(),
    };
    // Small request/response pairs: without TCP_NODELAY, Nagle delays the replies.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut stop = stop_rx;
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|v| *v).await;
        })
        .await;
    supervisor.shutdown().await;
    served
}

/// Frees, every [`Service::REAP_INTERVAL`], what owner processes that exited held (`ownerPid`),
/// on a thread of its own: frees can unmap memory (milliseconds per GiB). Not `spawn_blocking`
/// per round: that wakes tokio's idle blocking threads in turn (a condvar wakes its oldest
/// waiter), so none of them ever stayed idle for the 10 s after which it exits, and every thread
/// that `block_in_place` or a burst of blocking work started stayed for the daemon's lifetime.
/// It ends with the service.
fn start_reaper(service: &Arc<Service>) {
    let weak = Arc::downgrade(service);
    let spawned = std::thread::Builder::new().name("owner-reaper".into()).spawn(move || loop {
        std::thread::sleep(Service::REAP_INTERVAL);
        let Some(service) = weak.upgrade() else { return };
        service.reap_dead_owners();
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "no owner reaper: the memory of owner processes that exit is not reclaimed");
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// `memwarden serve`: bind the configured address, announce it on stdout, serve until a signal.
pub fn run(config: Config) -> Result<(), String> {
    config.validate().map_err(|e| e.to_string())?;
    memwarden_sys::tune_heap();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        builder.worker_threads(config.worker_threads);
    }
    let runtime = builder.enable_all().build().map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async move {
        let listener =
            TcpListener::bind(config.listen).await.map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let service = Arc::new(Service::from_config(&config));
        for b in service.backends() {
            match &b.reason {
                None => tracing::info!(backend = b.name, devices = ?b.devices, "backend available"),
                Some(r) => tracing::warn!(backend = b.name, "backend unavailable: {r}"),
            }
        }
        // Tests and scripts read this line to find the port when listening on port 0.
        println!("memwarden listening on http://{addr}");
        tracing::info!(%addr, "serving the API; Swagger UI at /swagger-ui");
        serve_on(listener, service.clone(), &config, shutdown_signal()).await.map_err(|e| e.to_string())?;
        let live = service.allocations(None);
        if !live.is_empty() {
            tracing::warn!(
                count = live.len(),
                bytes = live.iter().map(|r| r.size_bytes).sum::<u64>(),
                "exiting with live allocations; their memory is released"
            );
        }
        // The pools' tmpfs files would outlive the process (the service is still shared with
        // background tasks, so its blocks are not dropped): unlink them; the mappings go at exit.
        let removed =
            memwarden_backends::host::remove_shared_files_of(&config.host.shared_memory_dir, std::process::id());
        tracing::info!(removed, "shared memory files removed");
        Ok(())
    })
}
