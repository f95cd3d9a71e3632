//! The Windows side of the seam, run under Wine in CI (`scripts/test-windows`): host memory is
//! really reserved, committed, aligned, writable and locked; a commit the machine cannot give
//! is an error, not a crash at first touch; host status comes from `GlobalMemoryStatusEx`.

use crate::{status, HostMapping, SysError};

const MIB: u64 = 1 << 20;

#[test]
fn host_memory_is_committed_aligned_and_holds_its_bytes() {
    let m = HostMapping::new(3 * MIB + 5, 2 * MIB, false).expect("VirtualAlloc");
    assert_eq!(m.address() % (2 * MIB), 0, "aligned beyond the 64 KiB allocation granularity");
    assert_eq!(m.len_bytes(), (3 * MIB + 5).next_multiple_of(super::mem::page_size_bytes()));
    let data: Vec<u8> = (0..MIB as usize).map(|i| (i * 7 + 3) as u8).collect();
    m.write(2 * MIB, &data).expect("write");
    let mut back = vec![0u8; data.len()];
    m.read(2 * MIB, &mut back).expect("read");
    assert_eq!(back, data);
    m.fill(0, MIB, 0xAB).expect("fill");
    let mut first = [0u8; 16];
    m.read(MIB - 16, &mut first).expect("read");
    assert_eq!(first, [0xAB; 16]);
    assert!(matches!(m.write(m.len_bytes() - 1, &[1, 2]), Err(SysError::OutOfBounds { .. })));
}

#[test]
fn pinned_host_memory_is_locked_after_raising_the_working_set() {
    let m = HostMapping::new(16 * MIB, 64 << 10, true).expect("VirtualLock");
    assert!(m.is_locked());
    m.fill(0, 16 * MIB, 1).expect("fill");
}

#[test]
fn a_commit_the_machine_cannot_give_is_an_error_with_the_os_words() {
    match HostMapping::new(1 << 46, 64 << 10, false) {
        Err(SysError::Map { errno, message, .. }) => assert!(errno != 0 && !message.is_empty(), "{errno} {message}"),
        other => panic!("64 TiB committed? {other:?}"),
    }
}

#[test]
fn shared_host_memory_is_not_there_yet_and_says_so() {
    let e = HostMapping::new_shared(MIB, 4096, false, std::path::Path::new("C:\\")).expect_err("unsupported");
    assert!(matches!(e, SysError::Unsupported(_)), "{e:?}");
}

#[test]
fn host_status_comes_from_global_memory_status_ex() {
    let m = status::os_memory().expect("GlobalMemoryStatusEx");
    assert_eq!(m.source, "GlobalMemoryStatusEx");
    assert!(m.total_bytes >= 256 * MIB, "{m:?}");
    assert!(m.available_bytes <= m.total_bytes && m.available_bytes > 0, "{m:?}");
}

#[test]
fn a_process_is_watched_through_its_handle_until_it_exits() {
    use crate::process::{alive, command_name, ProcessWatch, WatchError};
    let me = std::process::id();
    assert!(alive(me));
    assert!(!ProcessWatch::open(me).expect("open self").exited());
    let name = command_name(me).expect("own name");
    assert!(name.starts_with("memwarden_sys"), "{name}");
    let mut child =
        std::process::Command::new("cmd.exe").args(["/c", "ping -n 3 127.0.0.1 >NUL"]).spawn().expect("cmd.exe");
    let watch = ProcessWatch::open(child.id()).expect("open the child");
    assert!(!watch.exited() && alive(child.id()));
    child.wait().expect("wait");
    assert!(watch.exited(), "the handle is signalled once the process is gone");
    assert_eq!(ProcessWatch::open(0x7fff_fff0).err(), Some(WatchError::NoSuchProcess));
    assert!(!alive(0x7fff_fff0));
}
