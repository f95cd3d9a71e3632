//! What a load's `path` names: a `.safetensors` file, a sharded checkpoint's
//! `*.safetensors.index.json`, a model folder (its index, else its one weights file), or a
//! diffusers pipeline folder (`model_index.json`: one model per component that has weights).
//! Every header is read and every index checked against its shards here, before anything is
//! allocated.

use super::file::{ModelFile, Shard};
use super::WeightsError;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The names a model folder is looked into for, in order (transformers', then diffusers').
pub const MODEL_FOLDER_FILES: [&str; 4] = [
    "model.safetensors.index.json",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
];

/// A diffusers pipeline folder names its components in this file.
pub const PIPELINE_INDEX: &str = "model_index.json";

/// Index files are refused above this size before they are read.
const MAX_INDEX_BYTES: u64 = 64 * 1024 * 1024;

/// What a path holds: one model, or a pipeline's components.
#[derive(Debug, Clone)]
pub enum Checkpoint {
    Model(ModelFile),
    Pipeline(Pipeline),
}

/// A diffusers pipeline: its folder, its name (the group of its components) and each component
/// that has weights, in name order.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub path: PathBuf,
    pub group: String,
    pub components: Vec<ModelFile>,
}

impl Checkpoint {
    /// Reads what `path` names, every header checked against its file's size.
    pub fn open(path: &Path) -> Result<Checkpoint, WeightsError> {
        open(path, true)
    }

    /// The tensor bytes of every model it holds, from the headers alone.
    pub fn declared_bytes(path: &Path) -> Result<u64, WeightsError> {
        Ok(match open(path, false)? {
            Checkpoint::Model(m) => m.data_bytes,
            Checkpoint::Pipeline(p) => p.components.iter().map(|c| c.data_bytes).sum(),
        })
    }
}

impl ModelFile {
    /// A model of one path: a `.safetensors` file, a `*.safetensors.index.json` or a model
    /// folder, its headers checked against the files' sizes.
    pub fn open(path: &Path) -> Result<ModelFile, WeightsError> {
        open_model(path, true)
    }

    /// What the headers declare, without checking that the data is there.
    pub fn declared(path: &Path) -> Result<ModelFile, WeightsError> {
        open_model(path, false)
    }
}

fn open(path: &Path, check: bool) -> Result<Checkpoint, WeightsError> {
    let canonical = std::fs::canonicalize(path).map_err(|e| WeightsError::file(path, e))?;
    if canonical.is_dir() && canonical.join(PIPELINE_INDEX).is_file() {
        return open_pipeline(&canonical, check).map(Checkpoint::Pipeline);
    }
    open_model(&canonical, check).map(Checkpoint::Model)
}

/// One model: a file, an index, or a model folder. A pipeline folder is refused here, naming
/// its components (each is a model folder of its own).
pub fn open_model(path: &Path, check: bool) -> Result<ModelFile, WeightsError> {
    let path = std::fs::canonicalize(path).map_err(|e| WeightsError::file(path, e))?;
    if path.is_dir() {
        if path.join(PIPELINE_INDEX).is_file() {
            let names = weighted_components(&path)?.into_iter().map(|(name, _)| name).collect::<Vec<_>>();
            return Err(WeightsError::NotSupported(format!(
                "{} is a diffusers pipeline ({PIPELINE_INDEX}): load it over HTTP (POST /api/memory/models/load), \
                 or load each component's folder ({})",
                path.display(),
                names.join(", ")
            )));
        }
        let file = model_folder_file(&path)?;
        let (component, group) = pipeline_part(&path).unzip();
        return open_model(&file, check).map(|m| ModelFile { path, component, group, ..m });
    }
    if path.to_string_lossy().ends_with(".index.json") {
        return open_index(&path, check);
    }
    let shard = if check { Shard::open(&path)? } else { Shard::declared(&path)? };
    Ok(ModelFile::from_shards(path, vec![shard]))
}

/// The index or weights file of a model folder, looked for in [`MODEL_FOLDER_FILES`]'s order.
fn model_folder_file(dir: &Path) -> Result<PathBuf, WeightsError> {
    MODEL_FOLDER_FILES.iter().map(|n| dir.join(n)).find(|p| p.is_file()).ok_or_else(|| {
        WeightsError::InvalidFile(format!(
            "{} holds no model: it has none of {}, nor a diffusers pipeline's {PIPELINE_INDEX}",
            dir.display(),
            MODEL_FOLDER_FILES.join(", ")
        ))
    })
}

/// Reads a small JSON file (an index), refusing one too large to be an index.
fn read_json(path: &Path) -> Result<serde_json::Value, WeightsError> {
    let len = std::fs::metadata(path).map_err(|e| WeightsError::file(path, e))?.len();
    if len > MAX_INDEX_BYTES {
        return Err(WeightsError::InvalidFile(format!("{}: {len} bytes is too large for an index", path.display())));
    }
    let bytes = std::fs::read(path).map_err(|e| WeightsError::file(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| WeightsError::InvalidFile(format!("{}: not a JSON index: {e}", path.display())))
}

/// A sharded checkpoint: the shards its `weight_map` names (in name order), each checked, and
/// every tensor in exactly the shard the index names for it.
fn open_index(index: &Path, check: bool) -> Result<ModelFile, WeightsError> {
    let bad = |m: String| WeightsError::InvalidFile(format!("{}: {m}", index.display()));
    let json = read_json(index)?;
    let map =
        json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("/"));
    // tensor → shard file name, and each shard file with one tensor the index puts in it.
    let mut wanted: BTreeMap<&str, &str> = BTreeMap::new();
    let mut files: BTreeMap<&str, &str> = BTreeMap::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("tensor {tensor:?}: its shard is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file == ".." || file.is_empty() {
            return Err(bad(format!("tensor {tensor:?}: shard {file:?} is not a file in the index's folder")));
        }
        wanted.insert(tensor, file);
        files.entry(file).or_insert(tensor);
    }
    if files.is_empty() {
        return Err(bad("its weight_map names no tensor".into()));
    }
    let mut shards = Vec::with_capacity(files.len());
    for (file, tensor) in &files {
        let path = dir.join(file);
        let opened = if check { Shard::open(&path) } else { Shard::declared(&path) };
        shards.push(opened.map_err(|e| match e {
            WeightsError::FileNotFound(_) => bad(format!("shard {file} (of tensor {tensor:?}) does not exist")),
            other => other,
        })?);
    }
    check_index(index, &wanted, &files, &shards)?;
    Ok(ModelFile::from_shards(index.to_path_buf(), shards))
}

/// Every tensor of every shard is in that shard alone and the index says so; every tensor the
/// index names is in its shard.
fn check_index(
    index: &Path,
    wanted: &BTreeMap<&str, &str>,
    files: &BTreeMap<&str, &str>,
    shards: &[Shard],
) -> Result<(), WeightsError> {
    let bad = |m: String| WeightsError::InvalidFile(format!("{}: {m}", index.display()));
    let mut found: HashMap<&str, &Path> = HashMap::new();
    for shard in shards {
        for t in &shard.tensors {
            if let Some(other) = found.insert(&t.name, &shard.identity.path) {
                return Err(bad(format!(
                    "tensor {:?} is in two shards: {} and {}",
                    t.name,
                    other.display(),
                    shard.identity.path.display()
                )));
            }
        }
    }
    for (shard, file) in shards.iter().zip(files.keys()) {
        for t in &shard.tensors {
            match wanted.get(t.name.as_str()) {
                Some(f) if f == file => {}
                Some(f) => return Err(bad(format!("tensor {:?} is in shard {file}, the index says {f}", t.name))),
                None => return Err(bad(format!("tensor {:?} is in shard {file}, the index names it nowhere", t.name))),
            }
        }
    }
    for (tensor, file) in wanted {
        if !found.contains_key(tensor) {
            return Err(bad(format!("tensor {tensor:?} is named in the index, but shard {file} does not hold it")));
        }
    }
    Ok(())
}

/// The components `model_index.json` names (its keys that are not `_…` and whose value is a
/// `[library, class]` pair), with their folders.
fn pipeline_components(dir: &Path) -> Result<Vec<(String, PathBuf)>, WeightsError> {
    let index = dir.join(PIPELINE_INDEX);
    let json = read_json(&index)?;
    let map =
        json.as_object().ok_or_else(|| WeightsError::InvalidFile(format!("{}: not a JSON object", index.display())))?;
    Ok(map
        .iter()
        .filter(|(name, v)| !name.starts_with('_') && v.as_array().is_some_and(|a| a.len() == 2 && !a[0].is_null()))
        .map(|(name, _)| (name.clone(), dir.join(name)))
        .collect())
}

/// The components whose folders have weights (a tokenizer or a scheduler has none).
fn weighted_components(dir: &Path) -> Result<Vec<(String, PathBuf)>, WeightsError> {
    let all = pipeline_components(dir)?;
    Ok(all.into_iter().filter(|(_, folder)| folder.is_dir() && model_folder_file(folder).is_ok()).collect())
}

/// A pipeline's name by default: its folder's.
fn group_name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into())
}

/// When a model folder is a component of the pipeline in its parent folder (whose
/// `model_index.json` names it): (its component name, the pipeline's group), so a component
/// loaded on its own (the socket's `loadWeights`, as `memwarden.hf.pipeline` does) is listed
/// under its pipeline as a pipeline load lists it. An unreadable parent index: not a component.
fn pipeline_part(dir: &Path) -> Option<(String, String)> {
    let parent = dir.parent()?;
    if !parent.join(PIPELINE_INDEX).is_file() {
        return None;
    }
    let name = dir.file_name()?.to_str()?.to_string();
    let named = pipeline_components(parent).ok()?.into_iter().any(|(n, _)| n == name);
    named.then(|| (name, group_name(parent)))
}

/// A pipeline's components that have weights, each a model of its own.
fn open_pipeline(dir: &Path, check: bool) -> Result<Pipeline, WeightsError> {
    let group = group_name(dir);
    let mut components = Vec::new();
    for (name, folder) in weighted_components(dir)? {
        let mut m = open_model(&folder, check)?;
        m.component = Some(name);
        m.group = Some(group.clone());
        components.push(m);
    }
    if components.is_empty() {
        return Err(WeightsError::InvalidFile(format!(
            "{}: no component of this pipeline has weights (looked in each component folder for {})",
            dir.join(PIPELINE_INDEX).display(),
            MODEL_FOLDER_FILES.join(", ")
        )));
    }
    Ok(Pipeline { path: dir.to_path_buf(), group, components })
}

#[cfg(test)]
#[path = "checkpoint_tests.rs"]
pub(super) mod tests;
