//! Checkpoints from fixtures written here: sharded indexes, model folders, pipeline folders,
//! every dtype, and every bad input refused before anything is allocated.

use super::*;
use crate::weights::file::SHARD_ALIGN_BYTES;

/// A fresh folder for one test (removed by [`Dir`]'s drop).
pub(crate) struct Dir(pub PathBuf);

impl Dir {
    pub(crate) fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("mw-ckpt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One tensor of a fixture: name, dtype, shape, bytes.
pub(crate) type T<'a> = (&'a str, &'a str, Vec<u64>, Vec<u8>);

/// Writes a safetensors file of `tensors`, in that order.
pub(crate) fn write_st(path: &Path, tensors: &[T<'_>]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let at = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, data.len()]}),
        );
    }
    let mut header = serde_json::to_vec(&header).expect("json");
    // Padded to 8 bytes, as the safetensors writers do.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&data);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    std::fs::write(path, bytes).expect("write");
}

/// `n` bytes from `seed`.
pub(crate) fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed)).collect()
}

/// An index naming `map` (tensor → shard file).
pub(crate) fn write_index(path: &Path, map: &[(&str, &str)]) {
    let weight_map: serde_json::Map<String, serde_json::Value> =
        map.iter().map(|(t, f)| (t.to_string(), serde_json::Value::from(*f))).collect();
    let json = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(path, serde_json::to_vec(&json).expect("json")).expect("write index");
}

/// A sharded model in `dir`: three shards (`a`,`b` | `c` | `d`), with an index.
pub(crate) fn sharded(dir: &Path, seed: u8) {
    write_st(
        &dir.join("model-00001-of-00003.safetensors"),
        &[("a", "F32", vec![3, 5], bytes(60, seed)), ("b", "BF16", vec![7], bytes(14, seed + 1))],
    );
    write_st(&dir.join("model-00002-of-00003.safetensors"), &[("c", "I64", vec![2], bytes(16, seed + 2))]);
    write_st(&dir.join("model-00003-of-00003.safetensors"), &[("d", "U8", vec![5], bytes(5, seed + 3))]);
    write_index(
        &dir.join("model.safetensors.index.json"),
        &[
            ("a", "model-00001-of-00003.safetensors"),
            ("b", "model-00001-of-00003.safetensors"),
            ("c", "model-00002-of-00003.safetensors"),
            ("d", "model-00003-of-00003.safetensors"),
        ],
    );
}

fn invalid(r: Result<ModelFile, WeightsError>) -> String {
    match r {
        Err(WeightsError::InvalidFile(m)) => m,
        other => panic!("expected InvalidFile, got {other:?}"),
    }
}

#[test]
fn a_sharded_index_is_one_model_with_every_shard_at_an_aligned_base() {
    let d = Dir::new("sharded");
    sharded(&d.0, 1);
    let m = ModelFile::open(&d.0.join("model.safetensors.index.json")).expect("opened");
    assert_eq!(m.shards.len(), 3);
    assert_eq!(m.identity().0.len(), 3, "identity is the set of files");
    let bases: Vec<u64> = m.shards.iter().map(|s| s.base).collect();
    assert_eq!(bases, vec![0, SHARD_ALIGN_BYTES, 2 * SHARD_ALIGN_BYTES]);
    assert_eq!(m.data_bytes, 2 * SHARD_ALIGN_BYTES + 5);
    let at: Vec<(&str, u64, u64)> = m.tensors.iter().map(|t| (t.name.as_str(), t.offset, t.nbytes)).collect();
    // `b` follows a tensor of 60 bytes: in the block it starts at the next multiple of 256.
    assert_eq!(at, vec![("a", 0, 60), ("b", 256, 14), ("c", SHARD_ALIGN_BYTES, 16), ("d", 2 * SHARD_ALIGN_BYTES, 5)]);
    assert_eq!(m.shards[0].span_bytes, 256 + 14);
    // The first shard's data goes to the block as two pieces: `a`, then the zeros and `b`.
    let pieces: Vec<(u64, u64, u64, u64)> =
        m.shards[0].pieces(0, 74).iter().map(|p| (p.file_offset, p.at, p.pad, p.bytes)).collect();
    assert_eq!(pieces, vec![(0, 0, 0, 60), (60, 60, 196, 14)]);
    // A range that starts inside `b` carries no padding.
    assert_eq!(
        m.shards[0].pieces(62, 12)[0],
        super::super::file::Piece { file_offset: 62, at: 258, pad: 0, bytes: 12 }
    );
    // The folder is the same model (its index is looked for first).
    write_st(&d.0.join("model.safetensors"), &[("x", "U8", vec![1], vec![0])]);
    let folder = ModelFile::open(&d.0).expect("folder");
    assert_eq!(folder.identity(), m.identity());
    assert_eq!(folder.path, std::fs::canonicalize(&d.0).expect("canonical"));
}

#[test]
fn model_folders_are_looked_into_for_their_one_weights_file_in_order() {
    let d = Dir::new("folders");
    write_st(&d.0.join("plain/model.safetensors"), &[("w", "F16", vec![2], bytes(4, 0))]);
    write_st(&d.0.join("unet/diffusion_pytorch_model.safetensors"), &[("w", "F32", vec![1], bytes(4, 0))]);
    let plain = ModelFile::open(&d.0.join("plain")).expect("plain");
    assert!(plain.shards[0].identity.path.ends_with("plain/model.safetensors"));
    let unet = ModelFile::open(&d.0.join("unet")).expect("unet");
    assert!(unet.shards[0].identity.path.ends_with("unet/diffusion_pytorch_model.safetensors"));
    std::fs::create_dir_all(d.0.join("empty")).expect("dir");
    std::fs::write(d.0.join("empty/config.json"), b"{}").expect("config");
    let m = invalid(ModelFile::open(&d.0.join("empty")));
    for looked_for in MODEL_FOLDER_FILES.iter().chain([&PIPELINE_INDEX]) {
        assert!(m.contains(looked_for), "{m} does not say it looked for {looked_for}");
    }
}

#[test]
fn a_pipeline_folder_is_one_model_per_component_with_weights() {
    let d = Dir::new("pipeline");
    let p = d.0.join("tiny-sd");
    std::fs::create_dir_all(&p).expect("dir");
    std::fs::write(
        p.join(PIPELINE_INDEX),
        br#"{"_class_name":"StableDiffusionPipeline","_diffusers_version":"0.30.0",
            "unet":["diffusers","UNet2DConditionModel"],"vae":["diffusers","AutoencoderKL"],
            "text_encoder":["transformers","CLIPTextModel"],"tokenizer":["transformers","CLIPTokenizer"],
            "scheduler":["diffusers","PNDMScheduler"],"safety_checker":[null,null]}"#,
    )
    .expect("model_index");
    sharded(&p.join("unet"), 3);
    std::fs::rename(
        p.join("unet/model.safetensors.index.json"),
        p.join("unet/diffusion_pytorch_model.safetensors.index.json"),
    )
    .expect("rename");
    write_st(&p.join("vae/diffusion_pytorch_model.safetensors"), &[("v", "F16", vec![4], bytes(8, 5))]);
    write_st(&p.join("text_encoder/model.safetensors"), &[("e", "F32", vec![2], bytes(8, 6))]);
    std::fs::create_dir_all(p.join("tokenizer")).expect("tokenizer");
    std::fs::create_dir_all(p.join("scheduler")).expect("scheduler");
    let Checkpoint::Pipeline(pipe) = Checkpoint::open(&p).expect("pipeline") else { panic!("not a pipeline") };
    assert_eq!(pipe.group, "tiny-sd");
    let parts: Vec<(&str, usize)> =
        pipe.components.iter().map(|c| (c.component.as_deref().unwrap_or("?"), c.shards.len())).collect();
    assert_eq!(parts, vec![("text_encoder", 1), ("unet", 3), ("vae", 1)]);
    assert!(pipe.components.iter().all(|c| c.group.as_deref() == Some("tiny-sd")));
    let total = Checkpoint::declared_bytes(&p).expect("declared");
    assert_eq!(total, pipe.components.iter().map(|c| c.data_bytes).sum::<u64>());
    // One model at a time (the socket's loadWeights) is told to name a component.
    match ModelFile::open(&p) {
        Err(WeightsError::NotSupported(m)) => assert!(m.contains("text_encoder, unet, vae"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A component's folder opened on its own knows its pipeline (as the pipeline load names it);
    // a model folder outside any pipeline has neither.
    let unet = ModelFile::open(&p.join("unet")).expect("unet alone");
    assert_eq!((unet.component.as_deref(), unet.group.as_deref()), (Some("unet"), Some("tiny-sd")));
    assert_eq!(unet.shards.len(), 3);
    let lone = ModelFile::open(&d.0.join("lone")).map(|m| (m.component, m.group));
    assert!(matches!(lone, Err(WeightsError::FileNotFound(_)) | Err(WeightsError::InvalidFile(_))), "{lone:?}");
    sharded(&d.0.join("lone"), 4);
    let lone = ModelFile::open(&d.0.join("lone")).expect("lone");
    assert_eq!((lone.component, lone.group), (None, None));
    // A pipeline none of whose components has weights says where it looked.
    for c in ["unet", "vae", "text_encoder"] {
        std::fs::remove_dir_all(p.join(c)).expect("rm");
    }
    match Checkpoint::open(&p) {
        Err(WeightsError::InvalidFile(m)) => {
            assert!(m.contains("no component") && m.contains("model.safetensors"), "{m}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_index_naming_a_missing_shard_names_the_shard_and_a_tensor() {
    let d = Dir::new("missing");
    sharded(&d.0, 1);
    std::fs::remove_file(d.0.join("model-00002-of-00003.safetensors")).expect("rm");
    let m = invalid(ModelFile::open(&d.0));
    assert!(
        m.contains("model-00002-of-00003.safetensors") && m.contains("\"c\"") && m.contains("does not exist"),
        "{m}"
    );
}

#[test]
fn a_shard_whose_header_lies_is_named() {
    let d = Dir::new("lying");
    sharded(&d.0, 1);
    let shard = d.0.join("model-00003-of-00003.safetensors");
    let header = br#"{"d":{"dtype":"U8","shape":[500],"data_offsets":[0,500]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(&[0; 5]);
    std::fs::write(&shard, b).expect("write");
    let m = invalid(ModelFile::open(&d.0));
    assert!(m.contains("model-00003-of-00003.safetensors") && m.contains("truncated"), "{m}");
}

#[test]
fn two_shards_naming_one_tensor_name_both_files_and_the_tensor() {
    let d = Dir::new("twice");
    sharded(&d.0, 1);
    write_st(
        &d.0.join("model-00003-of-00003.safetensors"),
        &[("d", "U8", vec![5], bytes(5, 0)), ("a", "F32", vec![3, 5], bytes(60, 0))],
    );
    let m = invalid(ModelFile::open(&d.0));
    assert!(m.contains("\"a\" is in two shards"), "{m}");
    assert!(m.contains("model-00001-of-00003.safetensors") && m.contains("model-00003-of-00003.safetensors"), "{m}");
}

#[test]
fn a_tensor_the_index_and_its_shard_disagree_on_is_named() {
    let d = Dir::new("disagree");
    sharded(&d.0, 1);
    let index = d.0.join("model.safetensors.index.json");
    // Named in the index, absent from its shard.
    write_index(
        &index,
        &[
            ("a", "model-00001-of-00003.safetensors"),
            ("b", "model-00001-of-00003.safetensors"),
            ("c", "model-00002-of-00003.safetensors"),
            ("d", "model-00003-of-00003.safetensors"),
            ("ghost", "model-00002-of-00003.safetensors"),
        ],
    );
    let m = invalid(ModelFile::open(&index));
    assert!(m.contains("\"ghost\"") && m.contains("model-00002-of-00003.safetensors does not hold it"), "{m}");
    // In a shard, absent from the index.
    write_index(
        &index,
        &[
            ("a", "model-00001-of-00003.safetensors"),
            ("c", "model-00002-of-00003.safetensors"),
            ("d", "model-00003-of-00003.safetensors"),
        ],
    );
    let m = invalid(ModelFile::open(&index));
    assert!(m.contains("\"b\" is in shard model-00001-of-00003.safetensors, the index names it nowhere"), "{m}");
    // In another shard than the index says.
    write_index(
        &index,
        &[
            ("a", "model-00001-of-00003.safetensors"),
            ("b", "model-00001-of-00003.safetensors"),
            ("c", "model-00003-of-00003.safetensors"),
            ("d", "model-00003-of-00003.safetensors"),
        ],
    );
    let m = invalid(ModelFile::open(&index));
    assert!(m.contains("\"c\""), "{m}");
    // Not an index at all, or one reaching outside its folder.
    std::fs::write(&index, b"{\"weight_map\": 3}").expect("write");
    assert!(invalid(ModelFile::open(&index)).contains("weight_map"));
    write_index(&index, &[("a", "../elsewhere.safetensors")]);
    assert!(invalid(ModelFile::open(&index)).contains("not a file in the index's folder"));
}

#[test]
fn every_dtype_the_format_defines_is_accepted_and_an_unknown_one_is_named() {
    let d = Dir::new("dtypes");
    let one = |dtype: &'static str, n: usize| (dtype, dtype, vec![1u64], vec![0u8; n]);
    let mut tensors: Vec<T<'_>> = [
        ("BOOL", 1),
        ("U8", 1),
        ("I8", 1),
        ("F8_E5M2", 1),
        ("F8_E4M3", 1),
        ("F8_E8M0", 1),
        ("I16", 2),
        ("U16", 2),
        ("F16", 2),
        ("BF16", 2),
        ("I32", 4),
        ("U32", 4),
        ("F32", 4),
        ("F64", 8),
        ("I64", 8),
        ("U64", 8),
    ]
    .into_iter()
    .map(|(t, n)| one(t, n))
    .collect();
    // Sub-byte types: whole bytes only (2 × 4 bits, 4 × 6 bits).
    tensors.push(("F4", "F4", vec![2], vec![0u8; 1]));
    tensors.push(("F6_E2M3", "F6_E2M3", vec![4], vec![0u8; 3]));
    tensors.push(("F6_E3M2", "F6_E3M2", vec![4], vec![0u8; 3]));
    let path = d.0.join("dtypes.safetensors");
    write_st(&path, &tensors);
    let m = ModelFile::open(&path).expect("every dtype");
    for t in &m.tensors {
        assert_eq!(t.name, t.dtype, "the dtype is kept by its safetensors name");
    }
    assert_eq!(m.tensors.len(), 19);
    write_st(&path, &[("q", "Q4_K", vec![1], vec![0])]);
    let msg = invalid(ModelFile::open(&path));
    assert!(msg.contains("\"Q4_K\"") && msg.contains("\"q\""), "{msg}");
}
