//! Descriptors over a Unix stream socket (`SCM_RIGHTS`), for the protocol's version 2 lines.

/// Sends `data` on a (non-blocking) Unix stream socket with `fds` as one `SCM_RIGHTS` control
/// message; returns how many bytes went (the rest is sent without descriptors). `WouldBlock`
/// when the socket is full, so an async caller retries when it is writable. Hand-written: the
/// standard library's `send_vectored_with_ancillary` is unstable, and this is one `sendmsg`.
pub fn send_with_fds(
    socket: std::os::fd::BorrowedFd<'_>,
    data: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    if data.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "descriptors need at least one byte"));
    }
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)]; // u64: aligned for cmsghdr
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: zeroed msghdr is a valid empty header; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds CMSG_SPACE(payload) bytes, so the first header and
        // its data fit; the descriptors are copied into it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr() as *const u8, libc::CMSG_DATA(cmsg), payload);
        }
    }
    // SAFETY: msg points at live buffers; MSG_NOSIGNAL turns a closed peer into EPIPE.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Receives into `buf` from a Unix stream socket, with the descriptors of any `SCM_RIGHTS`
/// control message (at most 16) that arrives on it, each closed on exec: the bytes read (0 at
/// end of stream) and the descriptors. The counterpart of [`send_with_fds`], for Rust peers of
/// the daemon's socket (protocol version 2); blocking or not as the socket is. More than 16
/// descriptors at once is an error after the bytes were consumed: the caller must then close
/// the connection (its stream is out of step).
pub fn recv_with_fds(
    socket: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
) -> std::io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const MAX_FDS: usize = 16;
    let payload = MAX_FDS * std::mem::size_of::<libc::c_int>();
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)]; // u64: aligned for cmsghdr
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: zeroed msghdr is a valid empty header; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: msg points at live buffers of the lengths it states.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg.msg_control` with well-formed headers within
    // `msg_controllen`; CMSG_NXTHDR stays inside it. Each descriptor received is new and ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let count =
                    ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned((data as *const libc::c_int).add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other(format!("more than {MAX_FDS} descriptors arrived at once")));
    }
    Ok((n as usize, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Descriptors sent with a line arrive with its first bytes and name the same files.
    #[test]
    fn descriptors_sent_with_a_line_are_received_with_it() {
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let dir = std::env::temp_dir();
        let files: Vec<std::fs::File> = (0..2).map(|_| std::fs::File::open(&dir).expect("open")).collect();
        let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        let sent = send_with_fds(a.as_fd(), b"line\n", &borrowed).expect("send");
        assert_eq!(sent, 5);
        let mut buf = [0u8; 64];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).expect("recv");
        assert_eq!(&buf[..n], b"line\n");
        assert_eq!(fds.len(), 2);
        let inode = std::fs::metadata(&dir).expect("stat").ino();
        for fd in fds {
            assert_eq!(std::fs::File::from(fd).metadata().expect("fstat").ino(), inode);
        }
        // Plain bytes: no descriptors.
        std::io::Write::write_all(&mut &a, b"x").expect("write");
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).expect("recv");
        assert_eq!((n, fds.len()), (1, 0));
    }
}
