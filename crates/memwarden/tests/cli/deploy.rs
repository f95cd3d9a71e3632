//! The packaging under `deploy/` (deploy/README.md) against the daemon's own config loader:
//! every config shipped there, the TOML files and the one inside the Kubernetes ConfigMap,
//! parses and validates, and places the client socket and the embedded Python package in the
//! service's own directories (`/run/memwarden`, `/var/lib/memwarden`), since a service has no
//! `$XDG_RUNTIME_DIR` and no shared `/tmp`. Also: `workers.runtime_dir` places both.
//! (`scripts/check-deploy` runs systemd-analyze, hadolint and kubernetes-validate on the rest.)

use memwarden::config::{Config, WorkerSpec, WorkersSection};
use memwarden::supervisor::Supervisor;
use std::path::{Path, PathBuf};

const SERVICE_DIRS: &[&str] = &["/run/memwarden/", "/var/lib/memwarden/"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn files_under(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read deploy dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, ext, out);
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
}

/// The block scalar under `memwarden.toml: |` of a ConfigMap, its indentation removed (the
/// manifests are plain YAML: no anchors, no other block styles there).
fn configmap_toml(yaml: &str) -> Option<String> {
    let indent_of = |l: &str| l.len() - l.trim_start().len();
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "memwarden.toml: |");
    let key_indent = indent_of(lines.next()?);
    let mut body: Vec<&str> = lines.take_while(|l| l.trim().is_empty() || indent_of(l) > key_indent).collect();
    while body.last().is_some_and(|l| l.trim().is_empty()) {
        body.pop();
    }
    let indent = body.iter().filter(|l| !l.trim().is_empty()).map(|l| indent_of(l)).min()?;
    Some(body.iter().map(|l| l.get(indent..).unwrap_or("")).collect::<Vec<_>>().join("\n") + "\n")
}

/// Parses and validates like `Config::load`, without reading `auth_token_file` (the secret is
/// not here); a config without one also goes through `Config::load` itself.
fn check(name: &str, text: &str, file: Option<&Path>) -> Config {
    let config: Config = toml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
    config.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
    if let (None, Some(file)) = (&config.auth_token_file, file) {
        assert_eq!(Config::load(file).unwrap_or_else(|e| panic!("{name}: {e}")), config, "{name}");
    }
    let w = &config.workers;
    let in_service_dirs = |p: &str| SERVICE_DIRS.iter().any(|d| p.starts_with(d) || format!("{p}/") == *d);
    assert!(in_service_dirs(&w.socket), "{name}: workers.socket {:?} is not in {SERVICE_DIRS:?}", w.socket);
    // The package: a directory given (python_path), or the embedded copy written to runtime_dir.
    let package = if w.python_path.as_os_str().is_empty() { &w.runtime_dir } else { &w.python_path };
    let package = package.display().to_string();
    assert!(in_service_dirs(&package), "{name}: the Python package's directory {package:?} is not in {SERVICE_DIRS:?}");
    config
}

#[test]
fn every_shipped_config_loads_and_places_socket_and_python_in_the_service_dirs() {
    let mut tomls = Vec::new();
    files_under(&deploy_dir(), "toml", &mut tomls);
    let mut checked = Vec::new();
    for path in &tomls {
        let text = std::fs::read_to_string(path).expect("read");
        check(&path.display().to_string(), &text, Some(path));
        checked.push(path.display().to_string());
    }
    let mut yamls = Vec::new();
    files_under(&deploy_dir().join("kubernetes"), "yaml", &mut yamls);
    for path in &yamls {
        let yaml = std::fs::read_to_string(path).expect("read");
        if !yaml.lines().any(|l| l.trim() == "kind: ConfigMap") {
            continue;
        }
        let name = format!("{} (memwarden.toml)", path.display());
        let toml = configmap_toml(&yaml).unwrap_or_else(|| panic!("{name}: no `memwarden.toml: |` block"));
        let config = check(&name, &toml, None);
        assert!(
            config.auth_token_file.is_some(),
            "{name}: a pod listens on its network: the token comes from a Secret"
        );
        checked.push(name);
    }
    for expected in ["systemd/memwarden.toml", "container/memwarden.toml", "configmap.yaml (memwarden.toml)"] {
        assert!(checked.iter().any(|c| c.ends_with(expected)), "{expected} not found among {checked:?}");
    }
}

#[test]
fn the_unit_and_the_image_use_the_shipped_configs() {
    let unit = std::fs::read_to_string(deploy_dir().join("systemd/memwarden.service")).expect("unit");
    for line in [
        "ExecStart=/usr/local/bin/memwarden serve --config /etc/memwarden/memwarden.toml",
        "RuntimeDirectory=memwarden",
        "StateDirectory=memwarden",
        "LimitMEMLOCK=infinity",
        "ProtectSystem=strict",
        "ReadWritePaths=/dev/shm",
    ] {
        assert!(unit.lines().any(|l| l == line), "memwarden.service lacks {line:?}");
    }
    let image = std::fs::read_to_string(deploy_dir().join("container/Containerfile")).expect("Containerfile");
    assert!(image.contains("COPY deploy/container/memwarden.toml /etc/memwarden/memwarden.toml"));
    assert!(image.contains(r#"CMD ["serve", "--config", "/etc/memwarden/memwarden.toml"]"#));
}

#[test]
fn configmap_extraction_strips_the_block_indentation() {
    let yaml = "data:\n  memwarden.toml: |\n    a = 1\n\n    [b]\n      c = 2\nother: x\n";
    assert_eq!(configmap_toml(yaml).as_deref(), Some("a = 1\n\n[b]\n  c = 2\n"));
}

#[test]
fn runtime_dir_places_the_embedded_package_and_the_default_socket() {
    let dir = std::env::temp_dir().join(format!("mw-deploy-runtime-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = WorkersSection {
        runtime_dir: dir.clone(),
        health_interval_ms: 0,
        // A worker that never says hello: only where things are written matters here.
        worker: vec![WorkerSpec {
            id: "w".into(),
            devices: vec!["cpu".into()],
            command: vec!["sleep".into(), "30".into()],
            env: Default::default(),
        }],
        ..WorkersSection::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let sup = Supervisor::new(
            cfg,
            vec!["cpu".into()],
            memwarden::models::process::ProcessMeter::new("/proc".into(), None),
        );
        sup.start().await;
        let package = sup.python_dir().expect("the embedded package was written");
        assert!(package.starts_with(&dir) && package.join("memwarden/worker.py").is_file(), "{}", package.display());
        assert_eq!(sup.socket_path(), Some(dir.join("memwarden.sock")));
        assert!(dir.join("memwarden.sock").exists());
        sup.shutdown().await;
        assert!(!package.exists() && !dir.join("memwarden.sock").exists(), "removed at shutdown");
    });
    let _ = std::fs::remove_dir_all(&dir);
}
