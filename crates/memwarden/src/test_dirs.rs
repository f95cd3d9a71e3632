//! Scratch folders for the crate's unit tests: one per test process, `<prefix>-<pid>` under the
//! temp dir. A test process cannot remove its own when it ends (the harness exits without
//! dropping statics), so each call first removes the folders of that prefix whose process is
//! gone: what a run leaves behind lasts until the next run, not forever (the model files these
//! tests write reach a gigabyte and once filled the disk).

use std::path::PathBuf;

/// `<temp>/<prefix>-<this pid>`, created; stale `<prefix>-<pid>` folders of dead processes removed.
pub(crate) fn scratch_dir(prefix: &str) -> PathBuf {
    let tmp = std::env::temp_dir();
    let me = std::process::id();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)?.strip_prefix('-')) else { continue };
            let Ok(pid) = pid.parse::<u32>() else { continue };
            if pid != me && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let d = tmp.join(format!("{prefix}-{me}"));
    std::fs::create_dir_all(&d).expect("create a scratch folder");
    d
}

#[cfg(test)]
mod tests {
    /// A dead process's folder goes, this process's stays.
    #[test]
    fn a_dead_processs_folder_is_removed_and_ours_kept() {
        let tmp = std::env::temp_dir();
        // pid_max is at most 2^22 on Linux: this pid never runs.
        let stale = tmp.join("mw-scratch-test-4999999");
        std::fs::create_dir_all(stale.join("inner")).expect("stale");
        let ours = super::scratch_dir("mw-scratch-test");
        assert!(!stale.exists(), "the dead process's folder was left");
        assert!(ours.is_dir());
        assert_eq!(super::scratch_dir("mw-scratch-test"), ours);
        std::fs::remove_dir_all(ours).expect("clean up");
    }
}
