//! The `memwarden` binary: `serve` as a real process, and the client commands against it.

use crate::cli_support::{in_terminal, machine_memory, tiny_model, Daemon, Scratch, MIB};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

#[test]
fn status_table_and_json_agree_with_the_os() {
    let _quiet = machine_memory();
    let d = Daemon::start(&[]);
    let table = d.ok(&["status"]);
    assert!(table.starts_with("memwarden "), "{table}");
    assert!(table.lines().any(|l| l.starts_with("DEVICE") && l.contains("USAGE") && l.contains("PRESSURE")), "{table}");
    let levels = ["low (", "moderate (", "high (", "critical ("];
    assert!(table.lines().any(|l| l.starts_with("cpu ") && levels.iter().any(|x| l.contains(x))), "{table}");
    if !table.contains("cuda:0") {
        assert!(table.contains("cuda: backend unavailable: "), "no GPU: the table says why: {table}");
    }
    let v = d.json(&["status", "cpu"]);
    assert_eq!(v["deviceId"], "cpu");
    assert!(v["totalMemory"].as_u64().expect("total") > 0);
    // `free -b`, when installed, agrees within 1% (procps 4: available is column 6).
    if v["source"] == "meminfo" {
        if let Ok(out) = Command::new("free").arg("-b").output() {
            let text = String::from_utf8_lossy(&out.stdout);
            let mem: Vec<u64> = text
                .lines()
                .find(|l| l.starts_with("Mem:"))
                .expect("Mem:")
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            assert_eq!(v["totalMemory"].as_u64(), Some(mem[0]));
            // free shows MemAvailable; memwarden adds the per-CPU free lists it leaves out.
            let pcp = memwarden_backends::host::HostStatusReader::default().per_cpu_free_bytes() as f64;
            let avail = v["availableMemory"].as_u64().expect("available") as f64;
            let free_avail = mem[5] as f64;
            assert!(
                (avail - (free_avail + pcp)).abs() / mem[0] as f64 <= 0.01,
                "available {avail} vs free {free_avail} + per-CPU lists {pcp}"
            );
        }
    }
}

#[test]
fn alloc_list_free_clear_through_the_cli() {
    let d = Daemon::start(&[]);
    let out = d.ok(&["alloc", "cpu", "512KiB", "--purpose", "kv-cache", "--owner", "cli-test"]);
    assert!(out.starts_with("allocated 512 KiB (524288) of host memory on cpu at 0x"), "{out}");
    let id = out.lines().nth(1).expect("id line").trim().to_string();
    let pinned = d.json(&["alloc", "cpu:0", "1MiB", "--kind", "pinned", "--alignment", "4096", "--immovable"]);
    assert_eq!(pinned["memoryType"], "pinned");
    assert_eq!(pinned["alignment"], 4096);
    assert_eq!(pinned["movable"], false);
    let reservation = d.json(&["alloc", "cpu", "2GiB", "--kind", "reservation"]);
    assert!(reservation["address"].is_null());

    let table = d.ok(&["allocations"]);
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains(&id) && table.contains("kv-cache") && table.contains("cli-test"), "{table}");
    assert!(table.trim_end().ends_with("3 allocation(s), 2.00 GiB"), "{table}");
    let listed = d.json(&["allocations", "cpu"]);
    assert_eq!(listed["count"], 3);

    assert!(d.ok(&["free", &id]).starts_with(&format!("freed {id} (512 KiB) on cpu")));
    d.ok(&["free", pinned["allocationId"].as_str().expect("id")]);
    d.ok(&["free", reservation["allocationId"].as_str().expect("id")]);
    let out = d.ok(&["clear"]);
    assert!(out.starts_with("cpu: released 128 MiB to the OS; pools still hold 0 B"), "{out}");
    assert_eq!(d.json(&["allocations"])["count"], 0);
}

#[test]
fn failures_exit_non_zero_with_the_server_message() {
    let d = Daemon::start(&[]);
    let out = d.run(&["alloc", "tpu:99", "1MiB"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DEVICE_NOT_FOUND (404)") && err.contains("devices: cpu"), "{err}");
    let out = d.run(&["free", "no-such-allocation"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ALLOCATION_NOT_FOUND"));
    let out = d.run(&["alloc", "cpu", "12 parsecs"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a size"));
    let out = d.run(&["alloc", "cpu", "1MiB", "--kind", "vram"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("INVALID_ARGUMENT (400): memoryType"));
    let out = d.run(&["alloc", "cpu", "1000000TiB"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("INSUFFICIENT_MEMORY (507)"));
    // No daemon at all: a clear message, non-zero exit.
    let out = Command::new(env!("CARGO_BIN_EXE_memwarden"))
        .args(["--url", "http://127.0.0.1:9", "status"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach memwarden"));
}

#[test]
fn serve_refuses_bad_config() {
    let dir = std::env::temp_dir().join(format!("memwarden-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "listen = \"0.0.0.0:0\"\n").expect("write");
    let out =
        Command::new(env!("CARGO_BIN_EXE_memwarden")).args(["serve", "--config"]).arg(&bad).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth_token"));
    std::fs::write(&bad, "[pool]\nblock_size = 5\n").expect("write");
    let out =
        Command::new(env!("CARGO_BIN_EXE_memwarden")).args(["serve", "--config"]).arg(&bad).output().expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `serve --help` lists the daemon's own flags, not the client's (which do nothing there), and
/// every flag `serve` takes is in it.
#[test]
fn serve_help_names_only_the_daemons_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_memwarden")).args(["serve", "--help"]).output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for client in ["--url", "--token", "--json"] {
        assert!(!help.contains(client), "{client} in:\n{help}");
    }
    let cli = <memwarden::cli::Cli as clap::CommandFactory>::command();
    let serve = cli.find_subcommand("serve").expect("serve");
    let own: Vec<String> = serve.get_arguments().filter_map(|a| a.get_long()).map(|l| format!("--{l}")).collect();
    assert!(own.len() >= 2, "{own:?}");
    for flag in own {
        assert!(help.contains(&flag), "{flag} missing from:\n{help}");
    }
    // Client commands keep them.
    let out = Command::new(env!("CARGO_BIN_EXE_memwarden")).args(["status", "--help"]).output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains("--url"));
}

/// The issue's proof: 1 GiB of host memory raises the daemon's RSS by about 1 GiB; freeing and
/// clearing brings it back. Also: shared blocks stay cached after free until `clear`.
#[test]
fn daemon_rss_follows_allocations() {
    let _quiet = machine_memory();
    let d = Daemon::start(&[]);
    let base = d.rss();
    let a = d.json(&["alloc", "cpu", "1GiB", "--purpose", "rss-test"]);
    let with = d.rss();
    assert!(with >= base + GIB - 16 * MIB, "RSS {base} -> {with} after 1 GiB");
    assert!(with <= base + GIB + 64 * MIB, "RSS {base} -> {with}: not much more than 1 GiB");
    d.ok(&["free", a["allocationId"].as_str().expect("id")]);
    d.ok(&["clear", "cpu"]);
    let after = d.rss();
    assert!(after <= base + 32 * MIB, "RSS back: {base} -> {with} -> {after}");

    // Small allocations share a 64 MiB block, which stays cached after free until clear.
    let ids: Vec<String> =
        (0..4).map(|_| d.json(&["alloc", "cpu", "8MiB"])["allocationId"].as_str().expect("id").to_string()).collect();
    let pooled = d.rss();
    assert!(pooled >= after + 60 * MIB, "one 64 MiB block committed: {after} -> {pooled}");
    for id in &ids {
        d.ok(&["free", id]);
    }
    assert!(d.rss() >= after + 60 * MIB, "block cached after free");
    let cleared = d.json(&["clear"]);
    assert_eq!(cleared["clearedBytes"], 64 * MIB);
    assert!(d.rss() <= after + 8 * MIB, "clear returned the block");
}

#[test]
fn pools_and_defrag_through_the_cli() {
    let d = Daemon::start(&[]);
    let ids: Vec<String> =
        (0..8).map(|_| d.json(&["alloc", "cpu", "4MiB"])["allocationId"].as_str().expect("id").to_string()).collect();
    for id in ids.iter().step_by(2) {
        d.ok(&["free", id]);
    }
    let out = d.ok(&["pools", "cpu"]);
    assert!(out.starts_with("cpu host pool: 1 block(s), 64.0 MiB held, 16.0 MiB allocated"), "{out}");
    let bar_line = out.lines().find(|l| l.trim_start().starts_with("block 0")).expect("block line");
    assert!(bar_line.contains("[....####....####....####....####"), "{bar_line}");
    assert!(bar_line.trim_end().ends_with("25% used"), "{bar_line}");
    let out = d.ok(&["defrag", "cpu", "--strategy", "thorough"]);
    assert!(out.starts_with("cpu (thorough): moved "), "{out}");
    let out = d.ok(&["pools", "cpu"]);
    let bar_line = out.lines().find(|l| l.trim_start().starts_with("block 0")).expect("block line");
    assert!(bar_line.contains("[################......"), "compacted to the front: {bar_line}");
    let bad = d.run(&["defrag", "cpu", "--strategy", "tidy"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("INVALID_ARGUMENT (400): strategy"));
}

/// `memwarden serve` with no config starts the default model worker (the embedded package, no
/// install step); `load`, `models` and `unload` drive it.
#[test]
fn default_daemon_runs_a_model_worker_and_the_cli_drives_it() {
    let d = Daemon::start(&[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = d.run(&["models"]);
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && text.contains("worker-0") && text.contains("ready") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ready worker: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // A 2 MiB model of one F32 tensor.
    let dir = std::env::temp_dir().join(format!("mw-cli-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let header = br#"{"w":{"dtype":"F32","shape":[524288],"data_offsets":[0,2097152]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.resize(bytes.len() + 2 * MIB as usize, 7);
    let path = dir.join("tiny.safetensors");
    std::fs::write(&path, bytes).expect("write");
    let loaded =
        d.ok(&["load", path.to_str().expect("path"), "--name", "tiny", "--priority", "80", "--held-by", "worker"]);
    assert!(loaded.starts_with("loaded m-1 (tiny) on cpu: 2.00 MiB"), "{loaded}");
    let listing = d.ok(&["models", "cpu"]);
    assert!(listing.contains("cpu: 1 model(s), 2.00 MiB reported, processes hold"), "{listing}");
    assert!(listing.contains("m-1") && listing.contains("tiny") && listing.contains("80"), "{listing}");
    let data = d.json(&["models"]);
    assert_eq!(data["devices"][0]["modelMemory"]["totalModelMemory"], 2 * MIB);
    // A second, less valuable model; a forced optimize below the target (issue 15: it used to
    // answer "not triggered") releases it, the least valuable, alone and says what it did.
    let spare = dir.join("spare.safetensors");
    std::fs::copy(&path, &spare).expect("copy");
    d.ok(&["load", spare.to_str().expect("path"), "--name", "spare", "--priority", "5", "--held-by", "worker"]);
    let opt = d.ok(&["optimize", "cpu", "--force", "--target", "99"]);
    assert!(opt.contains("unload") && opt.contains("m-2") && opt.contains("cpu (balanced): freed"), "{opt}");
    assert!(!opt.contains("m-1 "), "the valuable model stays: {opt}");
    let unloaded = d.ok(&["unload", "m-1"]);
    assert!(unloaded.starts_with("unloaded m-1 from worker-0 on cpu: 2.00 MiB released"), "{unloaded}");
    let out = d.run(&["unload", "m-1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MODEL_NOT_FOUND (404)"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `memwarden analytics` and `memwarden recommend` print the numbers behind each line.
#[test]
fn analytics_and_recommend_through_the_cli() {
    let dir = std::env::temp_dir().join(format!("mw-cli-an-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("capped.toml");
    std::fs::write(
        &config,
        "[pool]\nblock_size_bytes = 8388608\ndedicated_threshold_bytes = 8388608\nmax_pool_bytes = 16777216\n\
         [workers]\nenabled = false\nsocket = \"none\"\n",
    )
    .expect("config");
    let d = Daemon::start(&["--config", config.to_str().expect("path")]);
    let out = d.ok(&["recommend"]);
    assert!(out.starts_with("no recommendations"), "{out}");
    let ids: Vec<String> =
        (0..16).map(|_| d.json(&["alloc", "cpu", "1MiB"])["allocationId"].as_str().expect("id").to_string()).collect();
    for id in ids.iter().step_by(2) {
        d.ok(&["free", id]);
    }
    assert!(!d.run(&["alloc", "cpu", "4MiB"]).status.success());
    let out = d.ok(&["analytics", "--window", "5m"]);
    assert!(out.contains("16 allocations (16.0 MiB"), "{out}");
    assert!(out.contains("8 frees, 1 failed"), "{out}");
    assert!(out.contains("peak allocated 16.0 MiB"), "{out}");
    let out = d.ok(&["recommend"]);
    assert!(out.contains("defragment on cpu"), "{out}");
    assert!(out.contains("failedAllocationBytes=4194304"), "{out}");
    assert!(out.contains("apply: POST /api/memory/operations/defragment/cpu {\"strategy\":\"thorough\"}"), "{out}");
    let bad = d.run(&["analytics", "--window", "forever"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("INVALID_ARGUMENT (400): window"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `memwarden status` shaped like nvidia-smi: the daemon's line, a device row with name, sizes,
/// a usage bar, pressure and fragmentation, and a process table whose first row is memwarden's
/// own share (its pools and the weights it holds) under the daemon's pid, with its model count.
#[test]
fn status_shows_devices_and_a_process_table_like_nvidia_smi() {
    let dir = Scratch::new("status");
    let d = Daemon::with_config("");
    d.json(&["alloc", "cpu", "8MiB", "--owner", "status-test"]);
    let model = tiny_model(&dir.0, "tiny");
    d.ok(&["load", model.to_str().expect("path"), "--name", "tiny"]);
    let out = d.ok(&["status"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with(&format!("memwarden {} at {}, pid {}, up ", env!("CARGO_PKG_VERSION"), d.url, d.pid())),
        "{out}"
    );
    let st = d.api("/api/memory/status/cpu");
    let cpu = lines.iter().find(|l| l.starts_with("cpu ")).unwrap_or_else(|| panic!("no cpu row: {out}"));
    let name = st["name"].as_str().expect("name");
    assert!(cpu.contains(name), "the CPU's name {name}: {cpu}");
    let total = memwarden_core::units::format_bytes(st["totalMemory"].as_u64().expect("total"));
    assert!(cpu.contains(&total), "total {total}: {cpu}");
    // The usage bar has 20 cells, as many # as the utilization's share of them.
    let bar = &cpu[cpu.find('[').expect("bar")..=cpu.find(']').expect("bar end")];
    assert_eq!(bar.len(), 22, "{cpu}");
    let util = st["memoryUtilization"].as_f64().expect("utilization");
    let hashes = bar.matches('#').count() as f64;
    assert!((hashes - util * 20.0).abs() <= 1.0, "{bar} for {util}");
    let category = d.api("/api/memory/pressure/cpu")["pressureCategory"].as_str().expect("category").to_string();
    assert!(cpu.contains(&format!("{category} (")), "pressure {category}: {cpu}");
    assert!(cpu.contains("64.0 MiB (8.00 MiB used)"), "pools: {cpu}");
    // The process table: its header, then memwarden first with its pid, its pools' 64 MiB
    // block plus the 2 MiB it holds for the model, and that one model.
    let header = lines.iter().position(|l| l.starts_with("DEVICE") && l.contains("PID")).expect("process table");
    for column in ["PROCESS", "MEMORY", "SHARE", "MODELS"] {
        assert!(lines[header].contains(column), "{}", lines[header]);
    }
    let first: Vec<&str> = lines[header + 1].split_whitespace().collect();
    assert_eq!(first[..5], ["cpu", &d.pid().to_string(), "memwarden", "66.0", "MiB"], "{out}");
    assert_eq!(first.last(), Some(&"1"), "memwarden holds one model: {out}");
    // --json: the status route's data as it came.
    let v = d.json(&["status", "cpu"]);
    assert_eq!(v["deviceId"], "cpu");
    assert_eq!(v["reservedBytes"], 64 * MIB);
    assert_eq!(d.json(&["health"])["pid"], d.pid());
    // --can-allocate answers on the device's row.
    let out = d.ok(&["status", "cpu", "--can-allocate", "4MiB"]);
    assert!(out.contains("can allocate 4.00 MiB of host: pool"), "{out}");
}

/// `memwarden ps`, like `ollama ps`: with no model, the header alone and why no worker was
/// asked; with a model memwarden holds, its row with state, size, priority, idle time and the
/// time keep-alive parks it.
#[test]
fn ps_lists_models_with_idle_time_and_keep_alive() {
    let dir = Scratch::new("ps");
    let d = Daemon::with_config("");
    let out = d.ok(&["ps"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "ID", "DEVICE", "STATE", "SIZE", "PRIORITY", "HELD", "BY", "IDLE", "SINCE", "UNTIL"]
    );
    assert_eq!(lines.len(), 2, "no model rows: {out}");
    assert!(
        lines[1].starts_with("(no worker could be asked for its models: ") && lines[1].contains("workers.enabled"),
        "{out}"
    );
    let v = d.json(&["ps"]);
    assert_eq!(v["weights"], serde_json::json!([]));
    assert_eq!(v["coordinationStatus"]["mode"], "fallback");
    let model = tiny_model(&dir.0, "tiny");
    let path = model.to_str().expect("path");
    d.ok(&["load", path, "--name", "tiny", "--priority", "80", "--keep-alive", "10m"]);
    d.ok(&["load", &tiny_model(&dir.0, "kept").to_string_lossy(), "--name", "kept", "--keep-alive", "0", "--pinned"]);
    let out = d.ok(&["ps"]);
    let row = |name: &str| -> Vec<String> {
        let l = out.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}: {out}"));
        l.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect()
    };
    let tiny = row("tiny");
    assert_eq!(tiny[1..7], ["w-1", "cpu", "resident", "2.00 MiB", "80", "memwarden"], "{out}");
    assert!(tiny[7] == "just now" || tiny[7].ends_with("seconds ago") || tiny[7] == "1 second ago", "{out}");
    assert_eq!(tiny[8], "10 minutes from now", "{out}");
    let kept = row("kept");
    assert_eq!(kept[5], "50 pinned", "{out}");
    assert_eq!(kept[8], "forever", "{out}");
    // --json: the model listing as the API gives it.
    let v = d.json(&["ps"]);
    assert_eq!(v["weights"][0]["modelId"], "w-1");
    assert_eq!(v["weights"][0]["keepAliveMs"], 600_000);
    assert_eq!(v["weights"][1]["keepAliveMs"], serde_json::Value::Null);
}

/// `status --watch` redraws only on a terminal: piped, it refuses and says what to run
/// instead; with --json it prints one status per interval; under a pseudo-terminal it clears
/// the screen once and then redraws from the top, frame after frame.
#[test]
fn status_watch_redraws_on_a_terminal_and_refuses_a_pipe() {
    let d = Daemon::with_config("");
    let out = d.run(&["status", "--watch"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing drawn into a pipe");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a terminal") && err.contains("--watch --json"), "{err}");
    // --interval goes with --watch.
    assert!(!d.run(&["status", "--interval", "1"]).status.success());

    let mut child =
        d.cmd(&["--json", "status", "--watch", "--interval", "0.2"]).stdout(Stdio::piped()).spawn().expect("cli");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let t0 = Instant::now();
    for _ in 0..3 {
        let line = lines.next().expect("a line per interval").expect("read");
        let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON document per line");
        assert_eq!(v["devices"][0]["deviceId"], "cpu");
    }
    assert!(t0.elapsed() >= Duration::from_millis(350), "three lines at 0.2 s intervals");
    assert!(child.try_wait().expect("wait").is_none(), "still watching");
    let _ = child.kill();
    let _ = child.wait();

    let screen = in_terminal(&d, &["status", "--watch", "--interval", "0.3"], 2.0);
    assert_eq!(screen.matches("\x1b[2J").count(), 1, "the screen is cleared once: {screen:?}");
    let frames = screen.matches("\x1b[H").count();
    assert!(frames >= 3, "{frames} frames in 2 s: {screen:?}");
    assert!(screen.matches("DEVICE  PID").count() >= 3, "each frame has the process table: {screen:?}");
    assert!(screen.contains("every 0.3 s; Ctrl-C to stop"), "{screen:?}");
}

/// Every read-only command's `--json` is the data its route answers, as the API gives it.
#[test]
fn json_output_is_the_apis_data() {
    let d = Daemon::with_config("");
    let a = d.json(&["alloc", "cpu", "1MiB", "--owner", "json-test", "--purpose", "check"]);
    let id = a["allocationId"].as_str().expect("id");
    let same = [
        (vec!["allocation", id], format!("/api/memory/allocation/{id}")),
        (vec!["owners"], "/api/memory/owners".into()),
        (vec!["pools", "cpu"], "/api/memory/pools/cpu".into()),
        (vec!["optimize-history"], "/api/memory/models/optimize/history".into()),
        (vec!["pressure", "--history"], "/api/memory/pressure/history".into()),
        (vec!["analytics-events", "--limit", "5"], "/api/memory/analytics/events?limit=5".into()),
        (vec!["recommend"], "/api/memory/optimization".into()),
    ];
    for (args, route) in same {
        let mut cli = d.json(&args);
        let mut api = d.api(&route);
        // The recommendations carry the time they were made.
        for v in [&mut cli, &mut api] {
            if let Some(o) = v.as_object_mut() {
                o.remove("generatedAt");
            }
        }
        assert_eq!(cli, api, "{args:?} vs {route}");
    }
    assert_eq!(d.json(&["allocation", id]), a, "the record alloc printed");
    let health = d.json(&["health"]);
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["devices"], d.api("/health")["devices"]);
    let usage = d.json(&["usage", "cpu", "--window", "5m"]);
    assert_eq!(
        (usage["deviceId"].clone(), usage["allocationCount"].clone()),
        (serde_json::json!("cpu"), serde_json::json!(1))
    );
    let all = d.json(&["usage"]);
    assert_eq!(all["window"], "1h");
    assert_eq!(all["devices"][0]["allocatedBytes"], MIB);
}
