//! Shared-memory export on Windows: not yet (a section object, `CreateFileMappingW`, handed
//! over with `DuplicateHandle` in the port).

use crate::SysError;
use std::os::windows::io::{BorrowedHandle as WinBorrowedHandle, OwnedHandle};
use std::path::Path;

/// A handle another process can map memory through: a Windows handle.
pub type SharedHandle = OwnedHandle;
/// A borrowed [`SharedHandle`].
pub type BorrowedHandle<'a> = WinBorrowedHandle<'a>;

#[derive(Debug)]
pub(crate) struct ShmFile {
    /// Never made: [`ShmFile::create`] answers unsupported.
    never: std::convert::Infallible,
}

impl ShmFile {
    pub(crate) fn create(_dir: &Path, _len: u64) -> Result<Self, SysError> {
        Err(SysError::Unsupported("shared host memory"))
    }

    pub(crate) fn path(&self) -> &Path {
        match self.never {}
    }

    pub(crate) fn share(&self) -> std::io::Result<SharedHandle> {
        match self.never {}
    }
}
