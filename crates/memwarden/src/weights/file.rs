//! A model as the weights store sees it: its files' identities (path, size, mtime), their
//! tensors (from each safetensors header, checked against the file's real size before anything
//! is allocated) laid out in one block, and the content hash.

use super::WeightsError;
use memwarden_core::units::MIB;
use memwarden_protocol::TensorEntry;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// Headers above this are refused before they are read (the `safetensors` crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The content hash covers the file in chunks of this size: each chunk's BLAKE3 is computed by
/// whichever loader thread read it, and the file's hash is the BLAKE3 of the chunk hashes in
/// order (plus the length), so hashing runs on every loader thread at once.
pub const HASH_CHUNK_BYTES: u64 = 8 * MIB;

/// What makes two loads "the same file": path, size and modification time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub mtime_ns: i128,
}

impl FileIdentity {
    pub fn of(path: &Path) -> Result<FileIdentity, WeightsError> {
        let meta = std::fs::metadata(path).map_err(|e| WeightsError::file(path, e))?;
        if !meta.is_file() {
            return Err(WeightsError::InvalidFile(format!("{} is not a regular file", path.display())));
        }
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Ok(FileIdentity { path: path.to_path_buf(), size_bytes: meta.len(), mtime_ns })
    }
}

/// Each shard's data starts at a multiple of this in the model's block, so a tensor keeps the
/// alignment it has in its file.
pub const SHARD_ALIGN_BYTES: u64 = 4096;

/// Each tensor starts at a multiple of this in the model's block, as a fresh CUDA allocation
/// does. In a safetensors file tensors lie end to end: after a tensor of 6 bytes (a bias of 3
/// channels in f16) every later one would sit 2 bytes off, and torch picks its kernels by a
/// pointer's alignment (cuBLASLt is told up to 256 bytes), so a model on the file's layout may
/// compute other bits than the same model loaded by its framework. The padding costs at most
/// 255 bytes a tensor.
pub const TENSOR_ALIGN_BYTES: u64 = 256;

/// One parsed, checked safetensors file of a checkpoint: where its data starts in the file,
/// where it lies in the model's block (`base`), and its tensors with offsets from the start of
/// its own data in the file.
#[derive(Debug, Clone)]
pub struct Shard {
    pub identity: FileIdentity,
    pub data_start: u64,
    pub data_bytes: u64,
    pub base: u64,
    pub tensors: Vec<TensorEntry>,
    /// Where each tensor (in `tensors`' order) lies in the block, from `base`: its file offset
    /// moved up to [`TENSOR_ALIGN_BYTES`] past the previous tensor.
    pub placed: Vec<u64>,
    /// The zeros before each tensor in the block (0 for an empty tensor, which takes no room).
    pub pads: Vec<u64>,
    /// The shard's bytes in the block: its data with the padding.
    pub span_bytes: u64,
}

impl Shard {
    /// Reads and checks the header. A header that is not JSON, names an unknown dtype, whose
    /// shapes disagree with its offsets, or whose data runs past the end of the file is
    /// `InvalidFile`: nothing has been allocated yet.
    pub fn open(path: &Path) -> Result<Shard, WeightsError> {
        let f = Self::declared(path)?;
        if f.data_start + f.data_bytes > f.identity.size_bytes {
            return Err(WeightsError::InvalidFile(format!(
                "{}: the header names {} bytes of tensors, but only {} follow it (truncated?)",
                f.identity.path.display(),
                f.data_bytes,
                f.identity.size_bytes - f.data_start
            )));
        }
        Ok(f)
    }

    /// What the header declares, read from its first 8 + N bytes alone, without checking that
    /// the data is there (admission estimates a load from this).
    pub fn declared(path: &Path) -> Result<Shard, WeightsError> {
        let path = std::fs::canonicalize(path).map_err(|e| WeightsError::file(path, e))?;
        let identity = FileIdentity::of(&path)?;
        let bad = |m: String| WeightsError::InvalidFile(format!("{}: {m}", path.display()));
        let mut f = std::fs::File::open(&path).map_err(|e| WeightsError::file(&path, e))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(|_| bad("shorter than a safetensors header".into()))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER_BYTES || 8 + n > identity.size_bytes {
            return Err(bad(format!("header length {n} does not fit a file of {} bytes", identity.size_bytes)));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(|e| bad(format!("reading the header: {e}")))?;
        let tensors = parse_header(&header).map_err(bad)?;
        let data_bytes = tensors.iter().map(|t| t.offset + t.nbytes).max().unwrap_or(0);
        let (placed, pads, span_bytes) = place(&tensors);
        Ok(Shard { identity, data_start: 8 + n, data_bytes, base: 0, tensors, placed, pads, span_bytes })
    }

    /// The pieces of this shard's data `[offset, offset + len)` as they go to the block, in
    /// file order. A piece that starts a tensor carries the padding before it (zeros), so the
    /// pieces of a range lie end to end in the block; file neighbours that stay neighbours
    /// there are one piece (a range of tensors whose sizes are multiples of the alignment is
    /// one piece, as in the file).
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let end = offset + len;
        let first = self.tensors.partition_point(|t| t.offset + t.nbytes <= offset);
        let mut out: Vec<Piece> = Vec::new();
        for (i, t) in self.tensors.iter().enumerate().skip(first) {
            if t.offset >= end {
                break;
            }
            let (from, to) = (t.offset.max(offset), (t.offset + t.nbytes).min(end));
            if from >= to {
                continue;
            }
            let at = self.placed[i] + (from - t.offset);
            // The zeros between the previous tensor's end and this one's start in the block.
            let pad = if from == t.offset { self.pads[i] } else { 0 };
            match out.last_mut() {
                Some(p) if pad == 0 && p.file_offset + p.bytes == from && p.end() == at => p.bytes += to - from,
                _ => out.push(Piece { file_offset: from, at: at - pad, pad, bytes: to - from }),
            }
        }
        out
    }

    /// Whether the file on disk still has this identity (size and mtime).
    pub fn unchanged_on_disk(&self) -> Result<(), WeightsError> {
        let now = FileIdentity::of(&self.identity.path)?;
        if now != self.identity {
            return Err(WeightsError::FileChanged(format!(
                "{} changed on disk since it was loaded ({} → {} bytes, mtime {} → {} ns)",
                self.identity.path.display(),
                self.identity.size_bytes,
                now.size_bytes,
                self.identity.mtime_ns,
                now.mtime_ns
            )));
        }
        Ok(())
    }
}

/// Part of a shard's data as it goes to the block: `pad` zeros at `at` (from the shard's
/// base), then `bytes` of the file's data from `file_offset` (from the data's start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub file_offset: u64,
    pub at: u64,
    pub pad: u64,
    pub bytes: u64,
}

impl Piece {
    /// Where it ends in the block, from the shard's base.
    pub fn end(&self) -> u64 {
        self.at + self.pad + self.bytes
    }
}

/// Each tensor's place in the block and the zeros before it (in `tensors`' order: by offset,
/// an empty tensor before the one that starts where it does), and the bytes they span there.
/// An empty tensor gets an aligned offset but takes no room and no padding.
fn place(tensors: &[TensorEntry]) -> (Vec<u64>, Vec<u64>, u64) {
    let (mut at, mut placed, mut pads) = (0u64, Vec::with_capacity(tensors.len()), Vec::with_capacity(tensors.len()));
    for t in tensors {
        let here = at.div_ceil(TENSOR_ALIGN_BYTES) * TENSOR_ALIGN_BYTES;
        placed.push(here);
        if t.nbytes == 0 {
            pads.push(0);
        } else {
            pads.push(here - at);
            at = here + t.nbytes;
        }
    }
    (placed, pads, at)
}

/// The tensors a safetensors header names, sorted by offset. A dtype the format does not define
/// is named; `Metadata`'s deserializer checks that offsets are contiguous and match each shape.
fn parse_header(header: &[u8]) -> Result<Vec<TensorEntry>, String> {
    let raw: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("header: {e}"))?;
    for (name, t) in raw.iter().filter(|(name, _)| name.as_str() != "__metadata__") {
        if let Some(dtype) = t.get("dtype").and_then(|d| d.as_str()) {
            if serde_json::from_value::<safetensors::Dtype>(dtype.into()).is_err() {
                return Err(format!(
                    "header: tensor {name:?} has dtype {dtype:?}, which the safetensors format does not define"
                ));
            }
        }
    }
    let metadata: safetensors::tensor::Metadata = serde_json::from_slice(header).map_err(|e| format!("header: {e}"))?;
    let mut tensors: Vec<TensorEntry> = metadata
        .tensors()
        .into_iter()
        .map(|(name, t)| TensorEntry {
            name,
            dtype: format!("{:?}", t.dtype),
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            offset: t.data_offsets.0 as u64,
            nbytes: (t.data_offsets.1 - t.data_offsets.0) as u64,
        })
        .collect();
    // An empty tensor before the one that starts at its offset: each tensor's end is then in
    // order too, which `Shard::pieces` searches by.
    tensors.sort_by_key(|t| (t.offset, t.nbytes));
    Ok(tensors)
}

/// What makes two loads "the same checkpoint": the same files, each with the same path, size
/// and modification time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckpointIdentity(pub Vec<FileIdentity>);

/// A model as the store holds it: one safetensors file, or the shards of a sharded checkpoint
/// laid end to end in one block (each shard at its `base`, each tensor at its place, see
/// [`TENSOR_ALIGN_BYTES`]), with every tensor's offset from the start of the block.
#[derive(Debug, Clone)]
pub struct ModelFile {
    /// What was asked for (a file, an index or a folder), canonical.
    pub path: PathBuf,
    pub shards: Vec<Shard>,
    /// The block's bytes: the last shard's end (its tensors' bytes with their padding).
    pub data_bytes: u64,
    pub tensors: Vec<TensorEntry>,
    /// A diffusers pipeline's component (its sub-folder's name).
    pub component: Option<String>,
    /// The pipeline a component belongs to.
    pub group: Option<String>,
}

impl ModelFile {
    /// Lays `shards` out in one block, in order; their tensors must have distinct names.
    pub fn from_shards(path: PathBuf, mut shards: Vec<Shard>) -> ModelFile {
        let mut at = 0u64;
        let mut tensors = Vec::new();
        for s in &mut shards {
            s.base = at.div_ceil(SHARD_ALIGN_BYTES) * SHARD_ALIGN_BYTES;
            tensors
                .extend(s.tensors.iter().zip(&s.placed).map(|(t, &p)| TensorEntry { offset: s.base + p, ..t.clone() }));
            at = s.base + s.span_bytes;
        }
        ModelFile { path, shards, data_bytes: at, tensors, component: None, group: None }
    }

    /// The tensors' bytes in the files (what a load reads; the block adds the padding).
    pub fn file_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.data_bytes).sum()
    }

    pub fn identity(&self) -> CheckpointIdentity {
        CheckpointIdentity(self.shards.iter().map(|s| s.identity.clone()).collect())
    }

    /// Whether every file on disk still has its identity (size and mtime); the error names
    /// the first that changed.
    pub fn unchanged_on_disk(&self) -> Result<(), WeightsError> {
        self.shards.iter().try_for_each(Shard::unchanged_on_disk)
    }

    /// The model's hash from its files' hashes: a single file's own hash; several files': the
    /// BLAKE3 of theirs in order.
    pub fn model_hash(file_hashes: &[String]) -> String {
        match file_hashes {
            [one] => one.clone(),
            many => {
                let mut h = blake3::Hasher::new();
                for f in many {
                    h.update(f.as_bytes());
                }
                h.finalize().to_hex().to_string()
            }
        }
    }
}

/// The file hash from its chunk hashes (see [`HASH_CHUNK_BYTES`]).
pub fn combine_hashes(chunks: &[[u8; 32]], data_bytes: u64) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&data_bytes.to_le_bytes());
    for c in chunks {
        h.update(c);
    }
    h.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn write_file(name: &str, header: &str, data: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("mw-wfile-{}-{name}.safetensors", std::process::id()));
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(&path, bytes).expect("write");
        path
    }

    #[test]
    fn a_file_is_parsed_into_tensors_with_offsets_from_the_data_start() {
        let p = write_file(
            "ok",
            r#"{"b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#,
            &[7u8; 32],
        );
        let f = Shard::open(&p).expect("parsed");
        assert_eq!(f.data_bytes, 32);
        assert_eq!(
            f.tensors.iter().map(|t| (t.name.as_str(), t.dtype.as_str(), t.offset)).collect::<Vec<_>>(),
            vec![("a", "F32", 0), ("b", "BF16", 24)]
        );
        assert_eq!(f.tensors[0].shape, vec![2, 3]);
        assert_eq!(f.data_start, 8 + std::fs::metadata(&p).expect("meta").len() - 8 - 32);
        assert!(f.unchanged_on_disk().is_ok());
    }

    /// Each tensor at a multiple of 256 in the block, zeros between; an empty tensor takes no
    /// room, sorts before the tensor that starts where it does, and moves no padding.
    #[test]
    fn tensors_are_placed_aligned_and_a_range_goes_to_the_block_in_pieces() {
        let p = write_file(
            "placed",
            r#"{"c":{"dtype":"U8","shape":[300],"data_offsets":[74,374]},"z":{"dtype":"F32","shape":[0],"data_offsets":[60,60]},
                "b":{"dtype":"U8","shape":[14],"data_offsets":[60,74]},"a":{"dtype":"U8","shape":[60],"data_offsets":[0,60]}}"#,
            &[1u8; 374],
        );
        let f = Shard::open(&p).expect("parsed");
        let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "z", "b", "c"]);
        assert_eq!(
            (f.placed.clone(), f.pads.clone(), f.span_bytes),
            (vec![0, 256, 256, 512], vec![0, 0, 196, 242], 812)
        );
        let all: Vec<(u64, u64, u64, u64)> =
            f.pieces(0, 374).iter().map(|p| (p.file_offset, p.at, p.pad, p.bytes)).collect();
        assert_eq!(all, vec![(0, 0, 0, 60), (60, 60, 196, 14), (74, 270, 242, 300)]);
        assert!(f.pieces(0, 374).windows(2).all(|w| w[0].end() == w[1].at), "end to end in the block");
        // A range that starts where `b` does carries its padding; one inside it, none.
        assert_eq!(f.pieces(60, 14), vec![Piece { file_offset: 60, at: 60, pad: 196, bytes: 14 }]);
        assert_eq!(f.pieces(62, 10), vec![Piece { file_offset: 62, at: 258, pad: 0, bytes: 10 }]);
        // Sizes that are multiples of 256 keep the file's layout: one piece.
        let q = write_file(
            "dense",
            r#"{"x":{"dtype":"U8","shape":[512],"data_offsets":[0,512]},"y":{"dtype":"U8","shape":[256],"data_offsets":[512,768]}}"#,
            &[2u8; 768],
        );
        let g = Shard::open(&q).expect("parsed");
        assert_eq!(g.pieces(0, 768), vec![Piece { file_offset: 0, at: 0, pad: 0, bytes: 768 }]);
    }

    #[test]
    fn truncated_and_lying_headers_are_invalid_files() {
        let header = r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
        let cases = [
            ("truncated", write_file("trunc", header, &[0u8; 10]), "truncated"),
            (
                "lying shape",
                write_file("shape", r#"{"a":{"dtype":"F32","shape":[9],"data_offsets":[0,24]}}"#, &[0; 24]),
                "header",
            ),
            ("not json", write_file("json", "{nope", &[0; 4]), "header"),
            (
                "unknown dtype",
                write_file("dtype", r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#, &[0; 1]),
                "header",
            ),
        ];
        for (what, path, needle) in cases {
            match Shard::open(&path) {
                Err(WeightsError::InvalidFile(m)) => assert!(m.contains(needle), "{what}: {m}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        let p = std::env::temp_dir().join(format!("mw-wfile-{}-huge.safetensors", std::process::id()));
        std::fs::write(&p, huge).expect("write");
        assert!(matches!(Shard::open(&p), Err(WeightsError::InvalidFile(_))));
        assert!(matches!(Shard::open(Path::new("/nonexistent/x.safetensors")), Err(WeightsError::FileNotFound(_))));
    }

    #[test]
    fn a_changed_file_is_detected_by_size_or_mtime() {
        let header = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        let p = write_file("changed", header, &[1, 2, 3, 4]);
        let f = Shard::open(&p).expect("parsed");
        std::fs::write(&p, b"something else entirely").expect("rewrite");
        assert!(matches!(f.unchanged_on_disk(), Err(WeightsError::FileChanged(_))));
    }

    #[test]
    fn the_hash_depends_on_every_chunk_and_the_length() {
        let a = [[1u8; 32], [2u8; 32]];
        let b = [[1u8; 32], [3u8; 32]];
        assert_ne!(combine_hashes(&a, 10), combine_hashes(&b, 10));
        assert_ne!(combine_hashes(&a, 10), combine_hashes(&a, 11));
        assert_eq!(combine_hashes(&a, 10), combine_hashes(&a, 10));
    }
}
