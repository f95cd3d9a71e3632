//! File modes, ownership and positioned reads on Windows.

use std::fs::File;
use std::os::windows::fs::FileExt;
use std::path::Path;

/// Creates `dir` and its missing parents. Unix modes have no meaning here: a directory under
/// the user's profile is private by its inherited ACL.
pub fn create_dir_with_mode(dir: &Path, _mode: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// Unix modes do not apply (ACLs in the port).
pub fn set_mode(_path: &Path, _mode: u32) -> std::io::Result<()> {
    Err(crate::unsupported_io("setting a Unix file mode"))
}

/// Unix groups do not apply (ACLs in the port).
pub fn set_group(_path: &Path, _gid: u32) -> std::io::Result<()> {
    Err(crate::unsupported_io("giving a file a Unix group"))
}

/// Reads exactly `buf.len()` bytes at `offset` of `file` (`seek_read` until full).
pub fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
