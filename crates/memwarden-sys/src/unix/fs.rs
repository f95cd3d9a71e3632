//! File modes, ownership and positioned reads on Unix.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, FileExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` and its missing parents with `mode` (e.g. 0700: this user's alone).
pub fn create_dir_with_mode(dir: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(mode).create(dir)
}

/// Sets `path`'s permission bits to `mode`.
pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Gives `path` to group `gid` (its owner unchanged).
pub fn set_group(path: &Path, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, None, Some(gid))
}

/// Reads exactly `buf.len()` bytes at `offset` of `file`, without moving its cursor (`pread`),
/// so threads can read one file at once.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    file.read_exact_at(buf, offset)
}
