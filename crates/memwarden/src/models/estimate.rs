//! What a model file will take once loaded, from its `.safetensors` header alone (parsed by
//! `weights::file`, with Hugging Face's `safetensors` crate; only its first 8 + N bytes are read).

use memwarden_core::units::MIB;
use memwarden_core::DeviceId;
use std::path::Path;

/// Bytes a model will take once loaded: its tensors, plus 5 % for allocator rounding and, on a
/// GPU, 64 MiB for a first model's allocator state (the CUDA context itself is not counted).
/// An error when the file or its header cannot be read here (the worker then reports why, or,
/// being more lenient about headers, loads it anyway).
pub fn model_bytes(path: &Path, device: DeviceId) -> std::io::Result<u64> {
    Ok(model_bytes_of(tensor_bytes(path)?, device))
}

/// [`model_bytes`] of a model whose header names `tensor_bytes`.
pub fn model_bytes_of(tensor_bytes: u64, device: DeviceId) -> u64 {
    let extra = if device.is_gpu() { 64 * MIB } else { 0 };
    tensor_bytes + tensor_bytes / 20 + extra
}

/// Sum of the tensors' bytes a `.safetensors` header names (the weights store's parser, reading
/// the header alone).
pub fn tensor_bytes(path: &Path) -> std::io::Result<u64> {
    use crate::weights::{file::ModelFile, WeightsError};
    ModelFile::declared(path).map(|f| f.file_bytes()).map_err(|e| match e {
        WeightsError::FileNotFound(m) => std::io::Error::new(std::io::ErrorKind::NotFound, m),
        other => std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, header: &str, data_len: usize) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("mw-est-{}-{name}.safetensors", std::process::id()));
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        std::fs::write(&path, bytes).expect("write");
        path
    }

    #[test]
    fn tensor_bytes_sum_the_header_offsets_and_the_estimate_adds_rounding_and_gpu_state() {
        let path = file(
            "ok",
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]}}"#,
            32,
        );
        assert_eq!(tensor_bytes(&path).expect("parsed"), 32);
        assert_eq!(model_bytes(&path, DeviceId::Cpu).ok(), Some(32 + 1));
        assert_eq!(model_bytes(&path, DeviceId::cuda(0)).ok(), Some(32 + 1 + (64 * MIB)));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn broken_headers_are_invalid_data_and_missing_files_give_no_estimate() {
        let path = file("bad", r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,5]}}"#, 8);
        assert_eq!(tensor_bytes(&path).map_err(|e| e.kind()), Err(std::io::ErrorKind::InvalidData));
        let _ = std::fs::remove_file(path);
        assert!(model_bytes(Path::new("/nonexistent/x.safetensors"), DeviceId::Cpu).is_err());
    }
}
