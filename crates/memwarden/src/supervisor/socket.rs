//! Attached clients: inference processes that connect to the daemon's local socket (a Unix
//! socket; `memwarden_sys::local`, which answers "unsupported" on Windows for now) with
//! `memwarden.client` and speak the same protocol. A client's slot lives as long as its
//! connection; its pid comes from the kernel (SO_PEERCRED), not from its hello.

use super::conn::{line_reader, read_hello, read_loop, Conn, Writer};
use super::{python, Slot, Supervisor, WorkerState};
use crate::sync::lock;
use memwarden_protocol::Role;
use memwarden_sys::local::{LocalListener, LocalStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

fn socket_path(cfg: &crate::config::WorkersSection) -> Option<PathBuf> {
    match cfg.socket.as_str() {
        "none" => None,
        "" => Some(python::runtime_dir(&cfg.runtime_dir).join("memwarden.sock")),
        p => Some(PathBuf::from(p)),
    }
}

pub(super) async fn start(sup: &Arc<Supervisor>) -> Result<(), String> {
    let Some(path) = socket_path(sup.config()) else { return Ok(()) };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            memwarden_sys::fs::create_dir_with_mode(dir, 0o700).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    if path.exists() {
        // A socket nobody answers on is left over from a daemon that died: replace it. One that
        // answers belongs to a running daemon: leave it alone.
        if LocalStream::connect(&path).await.is_ok() {
            return Err(format!("{} is in use by another daemon", path.display()));
        }
        std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let listener = LocalListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    // Only this user may attach (the protocol can unload models), unless the allow-list names
    // others: then anyone may connect and each peer's credentials decide (`peer_allowed`).
    let others = !sup.config().allowed_uids.is_empty() || !sup.config().allowed_gids.is_empty();
    memwarden_sys::fs::set_mode(&path, if others { 0o666 } else { 0o600 })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if others {
        // Our own directory (made 0700 above) must let the others reach the socket.
        if let Some(dir) = path.parent().filter(|d| d.starts_with(python::runtime_dir(&sup.config().runtime_dir))) {
            let _ = memwarden_sys::fs::set_mode(dir, 0o711);
        }
    }
    tracing::info!(socket = %path.display(), "accepting attached clients");
    *lock(&sup.socket_path) = Some(path);
    let sup = sup.clone();
    tokio::spawn(async move {
        let stop = sup.stopping();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(stream) => {
                        let sup = sup.clone();
                        tokio::spawn(async move { serve_client(sup, stream).await });
                    }
                    Err(e) => {
                        tracing::warn!("accept on the client socket failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = super::stopped(stop.clone()) => break,
            }
        }
    });
    Ok(())
}

/// Whether a peer may attach: the daemon's own user, or a user or primary group on the
/// allow-list (`workers.allowed_uids`, `workers.allowed_gids`).
fn peer_allowed(cfg: &crate::config::WorkersSection, own_uid: u32, uid: u32, gid: u32) -> bool {
    uid == own_uid || cfg.allowed_uids.contains(&uid) || cfg.allowed_gids.contains(&gid)
}

/// Tells a refused peer why (an `error` notice) and closes its connection.
async fn refuse(mut stream: LocalStream, code: &str, message: String) {
    use tokio::io::AsyncWriteExt;
    let notice = memwarden_protocol::ErrorNotice { code: code.into(), message, model_id: None };
    let data = serde_json::to_value(&notice).unwrap_or_default();
    let line =
        memwarden_protocol::encode(&memwarden_protocol::Message::Notification(memwarden_protocol::Notification {
            event: memwarden_protocol::Event::Error,
            data,
        }));
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(line.as_bytes())).await;
}

async fn serve_client(sup: Arc<Supervisor>, stream: LocalStream) {
    let cred = stream.peer_cred().ok();
    let own_uid = memwarden_sys::process::current_uid();
    let (uid, gid) = cred.map(|c| (c.uid, c.gid)).unwrap_or((u32::MAX, u32::MAX));
    if !peer_allowed(sup.config(), own_uid, uid, gid) {
        tracing::warn!(uid, gid, pid = ?cred.and_then(|c| c.pid), "client refused: not on the socket's allow-list");
        let message = format!(
            "uid {uid} (gid {gid}) may not attach: only the daemon's user and workers.allowed_uids / allowed_gids may"
        );
        // Its hello is read first (bounded), so the refusal is what it reads next rather than a
        // broken pipe under its hello.
        let (read, write) = stream.into_split();
        let mut reader = line_reader(read);
        let _ = tokio::time::timeout(Duration::from_secs(2), read_hello(&mut reader)).await;
        let stream = reader.into_inner().reunite(write);
        if let Ok(stream) = stream {
            refuse(stream, memwarden_protocol::codes::PERMISSION_DENIED, message).await;
        }
        return;
    }
    let pid = cred.and_then(|c| c.pid);
    let (read, write) = stream.into_split();
    let mut reader = line_reader(read);
    let timeout = Duration::from_millis(sup.config().start_timeout_ms);
    let hello = match tokio::time::timeout(timeout, read_hello(&mut reader)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::warn!(?pid, "client refused: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!(?pid, "client sent no hello within {} ms", timeout.as_millis());
            return;
        }
    };
    // Ids are unique among slots: a second client with the same name gets a suffix.
    let mut id = hello.worker_id.clone();
    let taken: Vec<String> = sup.slots().iter().map(|s| s.id.clone()).collect();
    let mut n = 2;
    while taken.contains(&id) {
        id = format!("{}#{n}", hello.worker_id);
        n += 1;
    }
    let pid = pid.unwrap_or(hello.pid);
    let mut conn = Conn::new(hello, pid, Writer::Socket(write), sup.catalog().clone());
    conn.worker_id = id.clone();
    conn.role = Role::Client;
    let conn = Arc::new(conn);
    if let Some(p) = sup.conn_requests() {
        p.opened(&conn);
    }
    let slot = Arc::new(Slot::new(id.clone(), Role::Client, None));
    {
        let mut s = lock(&slot.state);
        s.conn = Some(conn.clone());
        s.pid = Some(pid);
    }
    slot.set_state(WorkerState::Ready);
    sup.add_slot(slot.clone());
    tracing::info!(client = %id, pid, "client attached");
    let stop = sup.stopping();
    let reason = tokio::select! {
        r = read_loop(&conn, &mut reader, sup.conn_requests()) => r,
        _ = super::stopped(stop.clone()) => "daemon stopping".into(),
    };
    conn.close();
    if let Some(p) = sup.conn_requests() {
        p.closed(&conn);
    }
    sup.remove_slot(&slot);
    tracing::info!(client = %id, pid, "client detached: {reason}");
}
