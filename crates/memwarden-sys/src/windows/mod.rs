//! The Windows side of the platform seam: the same API as `../unix/`. Host memory
//! (`VirtualAlloc`, `VirtualLock`), host status (`GlobalMemoryStatusEx`) and process watch
//! (process handles) are real; the rest answers "unsupported" (`SysError::Unsupported`,
//! `io::ErrorKind::Unsupported`) until the Windows port (Direct3D 12, named file mappings,
//! named pipes with `DuplicateHandle`). CI builds it and runs memwarden-sys's tests under Wine
//! (`scripts/test-windows`).

pub mod fs;
pub mod local;
pub(crate) mod mem;
pub mod process;
pub(crate) mod shm;
pub mod status;

#[cfg(test)]
mod tests;
