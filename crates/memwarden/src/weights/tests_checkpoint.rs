//! Sharded checkpoints in the store: one block holding every shard, shared by identity (the
//! set of files), parked and resumed as one, and a shard changed on disk named.

use super::checkpoint::tests::{bytes, sharded, Dir};
use super::tests::{holder, mapped_bytes, req, store, GPU};
use super::*;
use crate::config::WeightsSection;

/// The fixture's tensors by name: (shard, bytes).
fn expected(seed: u8) -> Vec<(&'static str, Vec<u8>)> {
    vec![("a", bytes(60, seed)), ("b", bytes(14, seed + 1)), ("c", bytes(16, seed + 2)), ("d", bytes(5, seed + 3))]
}

fn check_tensors(grant: &WeightsGrant, mapped: &[u8], seed: u8) {
    for (name, want) in expected(seed) {
        let t = grant.tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"));
        let got = &mapped[t.offset as usize..(t.offset + t.nbytes) as usize];
        assert_eq!(got, want.as_slice(), "tensor {name}'s bytes at its rebased offset");
    }
}

#[tokio::test]
async fn a_sharded_checkpoint_loads_as_one_block_and_the_index_shares_the_folders_copy() {
    let d = Dir::new("store-sharded");
    sharded(&d.0, 11);
    let s = store(WeightsSection { load_threads: 3, ..Default::default() });
    let a = s.load(req(&d.0, DeviceId::Cpu), Some(Arc::new(holder("p1")))).await.expect("load");
    let (grant, fds) = a.grant.expect("grant");
    assert_eq!(grant.tensors.len(), 4);
    check_tensors(&grant, &mapped_bytes(fds, grant.data_bytes as usize), 11);
    let listed = &s.list()[0];
    assert_eq!(listed.files.len(), 3);
    assert!(listed.files[1].path.ends_with("model-00002-of-00003.safetensors"));
    assert_eq!(
        listed.files[1].bytes,
        std::fs::metadata(d.0.join("model-00002-of-00003.safetensors")).expect("m").len()
    );
    assert_eq!(listed.size_bytes, grant.data_bytes);
    assert_eq!(listed.name, d.0.file_name().expect("name").to_string_lossy());
    let hashes = a.model.with_held(|h| h.file_hashes.clone());
    assert_eq!(hashes.len(), 3);
    assert_eq!(grant.hash, file::ModelFile::model_hash(&hashes));
    // The index is the same set of files: shared, not read again.
    let b = s.load(req(&d.0.join("model.safetensors.index.json"), DeviceId::Cpu), None).await.expect("again");
    assert!(b.reused);
    assert_eq!(b.model.id, a.model.id);
}

#[tokio::test]
async fn a_sharded_checkpoint_parks_and_resumes_as_one_model() {
    let d = Dir::new("store-park");
    sharded(&d.0, 21);
    let s = store(WeightsSection::default());
    let h = holder("w");
    let m = s.load(req(&d.0, GPU), Some(Arc::new(h.clone()))).await.expect("load").model;
    s.park(&m.id).await.expect("park");
    assert_eq!(m.state(), WeightState::Parked);
    s.resume(&m.id, None).await.expect("resume");
    let remaps = lock(&h.remaps);
    let (grant, mapped) = remaps.last().expect("remapped");
    check_tensors(grant, mapped, 21);
}

#[tokio::test]
async fn a_shard_changed_on_disk_while_dropped_is_named_and_nothing_stale_loads() {
    let d = Dir::new("store-changed");
    sharded(&d.0, 31);
    let s = store(WeightsSection::default());
    let m = s.load(req(&d.0, DeviceId::Cpu), None).await.expect("load").model;
    s.drop_copy(&m.id).await.expect("drop");
    // In place: same size, same mtime, other bytes: the file's hash tells.
    let shard = d.0.join("model-00002-of-00003.safetensors");
    let mtime = std::fs::metadata(&shard).expect("meta").modified().expect("mtime");
    let mut b = std::fs::read(&shard).expect("read");
    let last = b.len() - 1;
    b[last] ^= 0xff;
    std::fs::write(&shard, &b).expect("write");
    std::fs::File::options().write(true).open(&shard).expect("open").set_modified(mtime).expect("set mtime");
    match s.resume(&m.id, None).await {
        Err(WeightsError::FileChanged(msg)) => {
            assert!(msg.contains("model-00002-of-00003.safetensors") && msg.contains("in place"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.state(), WeightState::Dropped);
    // Its size changed: told before anything is read.
    b.push(0);
    std::fs::write(&shard, &b).expect("grow");
    match s.resume(&m.id, None).await {
        Err(WeightsError::FileChanged(msg)) => assert!(msg.contains("model-00002-of-00003.safetensors"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(m.state(), WeightState::Dropped);
    assert_eq!(s.list()[0].resident_bytes, 0, "nothing stale was loaded");
}

#[tokio::test]
async fn a_bad_index_allocates_nothing() {
    let d = Dir::new("store-bad");
    sharded(&d.0, 41);
    std::fs::remove_file(d.0.join("model-00003-of-00003.safetensors")).expect("rm");
    assert!(matches!(s_load(&d.0).await, Err(WeightsError::InvalidFile(_))));
}

async fn s_load(path: &std::path::Path) -> Result<Attached, WeightsError> {
    let s = store(WeightsSection::default());
    let r = s.load(req(path, GPU), None).await;
    assert!(s.models().is_empty(), "nothing held");
    r
}
