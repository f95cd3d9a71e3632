//! The `memwarden` Python package, embedded in the binary so `memwarden serve` starts workers on
//! a fresh checkout or a bare host with no install step, always the version this daemon speaks.

use std::path::{Path, PathBuf};

const FILES: &[(&str, &str)] = &[
    ("__init__.py", include_str!("../../../../python/memwarden/__init__.py")),
    ("__main__.py", include_str!("../../../../python/memwarden/__main__.py")),
    ("errors.py", include_str!("../../../../python/memwarden/errors.py")),
    ("dtypes.py", include_str!("../../../../python/memwarden/dtypes.py")),
    ("runtime.py", include_str!("../../../../python/memwarden/runtime.py")),
    ("protocol.py", include_str!("../../../../python/memwarden/protocol.py")),
    ("safetensors_io.py", include_str!("../../../../python/memwarden/safetensors_io.py")),
    ("models.py", include_str!("../../../../python/memwarden/models.py")),
    ("endpoint.py", include_str!("../../../../python/memwarden/endpoint.py")),
    ("worker.py", include_str!("../../../../python/memwarden/worker.py")),
    ("client.py", include_str!("../../../../python/memwarden/client.py")),
    ("weights.py", include_str!("../../../../python/memwarden/weights.py")),
    ("hf.py", include_str!("../../../../python/memwarden/hf.py")),
];

/// The embedded package written under `dir/memwarden/`; `dir` goes on `PYTHONPATH`.
pub struct Extracted {
    pub dir: PathBuf,
}

impl Extracted {
    /// Writes into a fresh directory private to this user and process (removed on drop).
    pub fn write(runtime_dir: &Path) -> std::io::Result<Extracted> {
        // One directory per supervisor (tests run several daemons in one process).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = runtime_dir.join(format!("memwarden-python-{}-{n}", std::process::id()));
        let removed = remove_stale(runtime_dir);
        if removed > 0 {
            tracing::warn!(dir = %runtime_dir.display(), removed, "removed worker packages left by daemons that died");
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        memwarden_sys::fs::create_dir_with_mode(&dir.join("memwarden"), 0o700)?;
        for (name, text) in FILES {
            std::fs::write(dir.join("memwarden").join(name), text)?;
        }
        Ok(Extracted { dir })
    }
}

impl Drop for Extracted {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes the `memwarden-python-<pid>-<n>` directories of daemons that are gone (killed before
/// they could remove their own); returns how many. Those of live daemons stay.
pub fn remove_stale(runtime_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(runtime_dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("memwarden-python-")) else { continue };
        let Some(pid) = rest.split_once('-').and_then(|(p, _)| p.parse::<u32>().ok()) else { continue };
        if !memwarden_backends::host::process_alive(pid) && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// `workers.runtime_dir` when configured, else `$XDG_RUNTIME_DIR` when set, else
/// `/tmp/memwarden-<uid>` (created 0700).
pub fn runtime_dir(configured: &Path) -> PathBuf {
    if !configured.as_os_str().is_empty() {
        return configured.to_path_buf();
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let uid = memwarden_sys::process::effective_uid();
    PathBuf::from(format!("/tmp/memwarden-{uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_package_is_complete_and_written_privately() {
        let root = std::env::temp_dir().join(format!("mw-embed-test-{}", std::process::id()));
        let x = Extracted::write(&root).expect("write");
        let on_disk: std::collections::BTreeSet<String> =
            std::fs::read_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python/memwarden"))
                .expect("python/memwarden")
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".py"))
                .collect();
        let embedded: std::collections::BTreeSet<String> = FILES.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(embedded, on_disk, "every module of python/memwarden must be embedded");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&x.dir).expect("dir").permissions());
        assert_eq!(mode & 0o777, 0o700);
        assert!(x.dir.join("memwarden/worker.py").is_file());
        let dir = x.dir.clone();
        drop(x);
        assert!(!dir.exists(), "removed on drop");
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn packages_of_daemons_that_died_are_removed_and_live_ones_kept() {
        let root = std::env::temp_dir().join(format!("mw-embed-stale-{}", std::process::id()));
        let dead = root.join("memwarden-python-4194999-0"); // above PID_MAX_LIMIT (2^22): never alive
        let mine = root.join(format!("memwarden-python-{}-7", std::process::id()));
        let other = root.join("memwarden-python-junk");
        for d in [&dead, &mine, &other] {
            std::fs::create_dir_all(d.join("memwarden")).expect("mkdir");
        }
        let x = Extracted::write(&root).expect("write");
        assert!(!dead.exists() && mine.exists() && other.exists() && x.dir.exists());
        assert_eq!(remove_stale(&root), 0, "nothing else is stale");
        drop(x);
        let _ = std::fs::remove_dir_all(root);
    }
}
