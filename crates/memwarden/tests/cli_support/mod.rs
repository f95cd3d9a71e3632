//! The `memwarden` binary against a daemon it started itself (`serve` as a real process), for
//! the CLI tests (`tests/cli/cli.rs`, `tests/cli/cli_ops.rs`).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub const MIB: u64 = 1 << 20;

/// Tests that compare the machine's memory with `free -b`, commit a GiB, or move the machine's
/// memory past a pressure threshold run one at a time: they share one test binary.
static MACHINE_MEMORY: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn machine_memory() -> std::sync::MutexGuard<'static, ()> {
    MACHINE_MEMORY.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Daemon {
    pub child: Child,
    pub url: String,
    /// The config file it was started with, removed when it stops.
    config: Option<PathBuf>,
}

/// The CLI binary.
pub fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_memwarden"))
}

impl Daemon {
    pub fn start(extra: &[&str]) -> Daemon {
        let mut child = cli()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn memwarden serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read announce line");
        let url = line.trim().strip_prefix("memwarden listening on ").expect("announce line").to_string();
        Daemon { child, url, config: None }
    }

    /// A daemon with this TOML config (and without model workers unless it names them).
    pub fn with_config(toml: &str) -> Daemon {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("mw-cli-{}-{n}.toml", std::process::id()));
        let mut text = toml.to_string();
        if !text.contains("[workers]") {
            text.push_str("\n[workers]\nenabled = false\nsocket = \"none\"\n");
        }
        std::fs::write(&path, text).expect("config");
        let mut d = Daemon::start(&["--config", path.to_str().expect("path")]);
        d.config = Some(path);
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The CLI, pointed at this daemon.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = cli();
        c.arg("--url").arg(&self.url).args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run cli")
    }

    /// Runs with `input` on stdin.
    pub fn run_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child =
            self.cmd(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("cli");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input).expect("write stdin");
        drop(stdin);
        child.wait_with_output().expect("wait")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf8")
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let text = self.ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?} --json is not JSON ({e}): {text}"))
    }

    /// A command that must fail: its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "{args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `GET path` straight from the API: the envelope's `data`.
    pub fn api(&self, path: &str) -> serde_json::Value {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut resp = agent.get(format!("{}{path}", self.url)).call().expect("request");
        let v: serde_json::Value = resp.body_mut().read_json().expect("json");
        assert_eq!(v["success"], true, "{path}: {v}");
        v["data"].clone()
    }

    pub fn rss(&self) -> u64 {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.pid())).expect("statm");
        let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("rss pages");
        pages * 4096
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = &self.config {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A scratch directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("mw-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Scratch(d)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pseudo-random bytes (xorshift): a wrong offset or a partial copy cannot match by accident.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A safetensors file of one F32 tensor of 2 MiB, every byte 7.
pub fn tiny_model(dir: &Path, name: &str) -> PathBuf {
    let header = br#"{"w":{"dtype":"F32","shape":[524288],"data_offsets":[0,2097152]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.resize(bytes.len() + 2 * MIB as usize, 7);
    let path = dir.join(format!("{name}.safetensors"));
    std::fs::write(&path, bytes).expect("write model");
    path
}

/// Runs `args` (the CLI against `d`) under a pseudo-terminal (`script`), for `secs`, then ends
/// it; returns everything it wrote to the terminal.
pub fn in_terminal(d: &Daemon, args: &[&str], secs: f64) -> String {
    let mut line = format!("{} --url {}", env!("CARGO_BIN_EXE_memwarden"), d.url);
    for a in args {
        line.push(' ');
        line.push_str(a);
    }
    let mut child = Command::new("script")
        .args(["-qfec", &line, "/dev/null"])
        .env("TERM", "xterm")
        .env("COLUMNS", "160")
        .env("LINES", "50")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("script (util-linux) runs the CLI in a pseudo-terminal");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut all);
        all
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
    while std::time::Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    String::from_utf8_lossy(&reader.join().expect("reader")).into_owned()
}
