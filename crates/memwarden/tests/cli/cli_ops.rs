//! The CLI's commands for bytes and the event stream, against a daemon process: `data`,
//! `copy`, `transfer` (a background one followed to its end, with a progress bar on a
//! terminal), `transfer-status`, `export`, `allocation`, `alloc --owner-pid`, `events`,
//! `move`, `recommend --apply`, `reset-peaks`; `load` and `defrag` with a progress bar on a
//! terminal.

use crate::cli_support::{in_terminal, machine_memory, random_bytes, tiny_model, Daemon, Scratch, MIB};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn id_line(out: &str) -> String {
    out.lines().last().expect("id line").trim().to_string()
}

/// Bytes written with `data write` (from a file and from stdin) come back with `data read` (to a
/// file and to stdout), and copies and transfers land them exactly where they were asked to.
#[test]
fn data_copy_and_transfer_move_the_bytes() {
    let dir = Scratch::new("data");
    // Transfers above 1 MiB run in the background.
    let d = Daemon::with_config("[transfer]\nsync_max_bytes = 1048576\n");
    let a = id_line(&d.ok(&["alloc", "cpu", "1MiB"]));
    let b = id_line(&d.ok(&["alloc", "cpu", "1MiB"]));
    let bytes_a = random_bytes(MIB as usize, 1);
    let bytes_b = random_bytes(MIB as usize, 2);
    let file = dir.path("a.bin");
    std::fs::write(&file, &bytes_a).expect("write");
    let out = d.ok(&["data", "write", &a, "--input", file.to_str().expect("path")]);
    assert_eq!(out, format!("wrote 1.00 MiB (1048576 bytes) into {a} at offset 0\n"));
    let out = d.run_with_input(&["data", "write", &b], &bytes_b);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let back = dir.path("a.back");
    d.ok(&["data", "read", &a, "-o", back.to_str().expect("path")]);
    assert!(std::fs::read(&back).expect("read") == bytes_a, "a read back");
    let out = d.run(&["data", "read", &b, "--offset", "1000", "--length", "3000"]);
    assert!(out.stdout == bytes_b[1000..4000], "b's bytes 1000..4000 on stdout");
    let v = d.json(&["data", "read", &b, "--offset", "16", "--length", "4"]);
    assert_eq!(v["length"], 4);
    assert_eq!(v["dataBase64"], base64_of(&bytes_b[16..20]));

    // copy: the first half of a into the second half of b; b's first half stays.
    let out = d.ok(&["copy", &a, &b, "--dest-offset", "512KiB", "--size", "512KiB"]);
    assert!(out.starts_with(&format!("copied 512 KiB from {a} (cpu) to {b} (cpu) at offset 524288 in ")), "{out}");
    let got = d.run(&["data", "read", &b]).stdout;
    assert!(got[..512 * 1024] == bytes_b[..512 * 1024], "b's first half unchanged");
    assert!(got[512 * 1024..] == bytes_a[..512 * 1024], "a's first half in b's second");

    // transfer into a new allocation: its id on the last line, its bytes a's.
    let out = d.ok(&["transfer", &a, "--to", "cpu"]);
    let c = id_line(&out);
    assert_ne!(c, a);
    assert!(d.run(&["data", "read", &c]).stdout == bytes_a, "c is a copy of a");
    // --move frees the source once the bytes are in.
    let t = d.json(&["transfer", &c, "--into", &b, "--move"]);
    assert_eq!((t["status"].as_str(), t["transferType"].as_str()), (Some("completed"), Some("move")));
    assert!(d.fails(&["allocation", &c]).contains("ALLOCATION_NOT_FOUND (404)"));
    assert!(d.run(&["data", "read", &b]).stdout == bytes_a, "b now holds a's bytes");

    // A transfer over sync_max_bytes answers 202: the CLI follows it to the end, silently (no
    // terminal), and prints the finished transfer.
    let big = id_line(&d.ok(&["alloc", "cpu", "6MiB"]));
    let bytes_big = random_bytes(6 * MIB as usize, 3);
    assert!(d.run_with_input(&["data", "write", &big], &bytes_big).status.success());
    let out = d.run(&["--json", "transfer", &big, "--to", "cpu"]);
    assert!(out.stderr.is_empty(), "no progress bar without a terminal: {}", String::from_utf8_lossy(&out.stderr));
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(t["status"], "completed", "followed to its end: {t}");
    assert_eq!(t["bytesDone"], 6 * MIB);
    let dest = t["destinationAllocationId"].as_str().expect("destination");
    let tail = d.run(&["data", "read", dest, "--offset", "5MiB"]).stdout;
    assert!(tail == bytes_big[5 * MIB as usize..], "the last MiB arrived");
    // --no-wait answers with the running transfer; transfer-status --wait follows it.
    let t = d.json(&["transfer", &big, "--to", "cpu", "--no-wait"]);
    assert_eq!(t["status"], "running", "{t}");
    let id = t["transferId"].as_str().expect("id");
    let done = d.json(&["transfer-status", id, "--wait"]);
    assert_eq!((done["status"].as_str(), done["bytesDone"].as_u64()), (Some("completed"), Some(6 * MIB)));
    let out = d.ok(&["transfer-status", id]);
    assert!(out.starts_with(&format!("copied 6.00 MiB from {big} (cpu) to ")), "{out}");
    // On a terminal the bar is drawn, and it ends with the total, the time and the rate.
    let screen = in_terminal(&d, &["transfer", &big, "--to", "cpu"], 20.0);
    let bar = screen.lines().find(|l| l.contains("copy ") && l.contains("[#")).unwrap_or_else(|| panic!("{screen:?}"));
    assert!(bar.contains("6.00 MiB in ") && bar.contains("/s"), "final rate: {bar:?}");
    assert!(screen.contains("copied 6.00 MiB from"), "{screen:?}");
    // Bad arguments are refused before anything is sent.
    assert!(d.fails(&["transfer", &a]).contains("--to"));
    assert!(d.fails(&["transfer", &a, "--to", "cpu", "--into", &b]).contains("cannot be used with"));
    assert!(d.fails(&["copy", &a, &b, "--size", "2MiB"]).contains("INVALID_ARGUMENT (400): sizeBytes"));
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `export` gives the file another process maps (the bytes are there at the offset it names),
/// `allocation` shows the record (now exported and immovable), and an allocation made with
/// `--owner-pid` goes when that process exits.
#[test]
fn export_allocation_and_owner_pid() {
    let d = Daemon::with_config("");
    let a = id_line(&d.ok(&["alloc", "cpu", "64KiB", "--owner", "exporter"]));
    let bytes = random_bytes(64 * 1024, 4);
    assert!(d.run_with_input(&["data", "write", &a], &bytes).status.success());
    let out = d.ok(&["export", &a]);
    assert!(out.starts_with(&format!("exported {a} (64.0 KiB on cpu): map /dev/shm/")), "{out}");
    let e = d.json(&["export", &a]);
    let path = e["path"].as_str().expect("path");
    let offset = e["offset"].as_u64().expect("offset") as usize;
    let mapped = std::fs::read(path).expect("the exported file");
    assert!(mapped[offset..offset + bytes.len()] == bytes[..], "the bytes at the offset");
    let out = d.ok(&["allocation", &a]);
    assert!(out.contains(&format!("allocation   {a}\n")) && out.contains("exported     true\n"), "{out}");
    assert!(out.contains("movable      false\n") && out.contains("owner        exporter\n"), "{out}");

    let mut owner = Command::new("sleep").arg("30").spawn().expect("sleep");
    let pid = owner.id().to_string();
    let v = d.json(&["alloc", "cpu", "1MiB", "--owner-pid", &pid]);
    assert_eq!(v["ownerPid"].to_string(), pid);
    let id = v["allocationId"].as_str().expect("id").to_string();
    assert!(d.ok(&["allocation", &id]).contains(&format!("owner pid    {pid}\n")));
    owner.kill().expect("kill");
    owner.wait().expect("wait");
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.run(&["allocation", &id]).status.success() {
        assert!(Instant::now() < deadline, "freed when its owner exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(d.fails(&["alloc", "cpu", "1MiB", "--owner-pid", "999999999"]).contains("ownerPid"));
}

/// A running `memwarden events` (text and --json) prints the level change an allocation
/// causes, as it happens, and keeps following until it is killed.
#[test]
fn events_follow_the_stream_until_killed() {
    let _alone = machine_memory();
    // Thresholds just above the machine's use now.
    let probe = Daemon::with_config("");
    let p = probe.json(&["pressure", "cpu"]);
    drop(probe);
    let u0 = p["utilizationPercentage"].as_f64().expect("utilization") / 100.0;
    let total = p["totalMemory"].as_u64().expect("total") as f64;
    let margin = 0.03;
    let moderate = u0 + margin;
    let d = Daemon::with_config(&format!(
        "[pressure]\nhost_interval_ms = 20\nmoderate = {moderate}\nhigh = {}\ncritical = {}\nhysteresis = {}\n",
        (u0 + 0.5).min(0.99),
        (u0 + 0.55).min(0.995),
        margin / 4.0
    ));
    let follow = |json: bool| {
        let mut args = vec!["events"];
        if json {
            args.insert(0, "--json");
        }
        let mut child = d.cmd(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("events");
        // It says on stderr once the stream is open.
        let mut line = String::new();
        BufReader::new(child.stderr.take().expect("stderr")).read_line(&mut line).expect("stderr line");
        assert!(line.starts_with(&format!("following {}/api/memory/events", d.url)), "{line}");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        (child, rx)
    };
    let (mut text, text_lines) = follow(false);
    let (mut json, json_lines) = follow(true);
    // Enough to cross the threshold from where the machine is now.
    let now = d.json(&["pressure", "cpu"])["utilizationPercentage"].as_f64().expect("u") / 100.0;
    let take = (((moderate - now).max(0.0) + margin) * total) as u64;
    d.ok(&["alloc", "cpu", &take.to_string(), "--purpose", "pressure"]);
    let wait_for = |rx: &mpsc::Receiver<String>, want: &dyn Fn(&str) -> bool| -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).expect("the event within 10 s");
            if want(&line) {
                return line;
            }
        }
    };
    let line = wait_for(&text_lines, &|l| l.contains(" pressure cpu: low -> moderate at "));
    assert!(line.ends_with(&format!("available of {}", memwarden_core::units::format_bytes(total as u64))), "{line}");
    let line = wait_for(&json_lines, &|l| l.contains("\"newLevel\":\"moderate\""));
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(
        (v["type"].as_str(), v["deviceId"].as_str(), v["oldLevel"].as_str()),
        (Some("pressure"), Some("cpu"), Some("low"))
    );
    assert!(v["utilizationPercentage"].as_f64().expect("u") / 100.0 >= moderate);
    for child in [&mut text, &mut json] {
        assert!(child.try_wait().expect("wait").is_none(), "still following");
        let _ = child.kill();
        let _ = child.wait();
    }
    // The level changes are in the history too.
    let out = d.ok(&["pressure", "--history"]);
    assert!(out.contains(" cpu: low -> moderate at "), "{out}");
}

/// `move`, `recommend --apply`, `reset-peaks`, `usage`, `analytics-events`, `optimize-history`.
#[test]
fn model_move_and_analytics_commands() {
    let dir = Scratch::new("ops");
    let d = Daemon::with_config(
        "[pool]\nblock_size_bytes = 8388608\ndedicated_threshold_bytes = 8388608\nmax_pool_bytes = 16777216\n",
    );
    let model = tiny_model(&dir.0, "tiny");
    d.ok(&["load", model.to_str().expect("path"), "--name", "tiny"]);
    let err = d.fails(&["move", "w-1", "cpu"]);
    assert!(err.contains("INVALID_ARGUMENT (400): targetDeviceId: model w-1 is already on cpu"), "{err}");
    assert!(d.fails(&["move", "w-1", "tpu:0"]).contains("(404)"));
    // Fragment the 16 MiB pool, fail a 4 MiB allocation: a defragment recommendation.
    let ids: Vec<String> = (0..16).map(|_| id_line(&d.ok(&["alloc", "cpu", "1MiB"]))).collect();
    for id in ids.iter().step_by(2) {
        d.ok(&["free", id]);
    }
    assert!(!d.run(&["alloc", "cpu", "4MiB"]).status.success());
    let events = d.json(&["analytics-events", "--device", "cpu", "--limit", "3"]);
    let kinds: Vec<&str> =
        events["events"].as_array().expect("events").iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds, ["freed", "freed", "freed"], "the newest three, oldest first");
    let out = d.ok(&["analytics-events", "--limit", "2"]);
    assert!(out.starts_with("AT") && out.trim_end().ends_with("2 event(s); the log keeps 10000"), "{out}");
    assert!(d.ok(&["recommend"]).contains("defragment on cpu"));
    let out = d.ok(&["recommend", "--apply", "defragment"]);
    assert!(
        out.starts_with("applied 1. defragment on cpu: POST /api/memory/operations/defragment/cpu\nmoved "),
        "{out}"
    );
    assert!(!d.ok(&["recommend"]).contains("defragment on cpu"), "applied: fragmentation is gone");
    assert!(d.fails(&["recommend", "--apply", "7"]).contains("no recommendation 7 now"));
    // Peaks: 16 MiB at the top, 8 MiB live; a reset starts them over from now.
    let peak = |d: &Daemon| d.json(&["usage", "cpu"])["peakAllocatedBytes"].as_u64().expect("peak");
    assert_eq!(peak(&d), 16 * MIB);
    let since = d.json(&["reset-peaks"])["since"].as_str().expect("since").to_string();
    assert_eq!(peak(&d), 8 * MIB);
    let a = d.json(&["analytics", "--window", "5m"]);
    // Analytics keeps milliseconds, the reset nanoseconds; RFC 3339 drops trailing zeros of the
    // fraction, so compare the instants, not the text.
    let analytics_since = a["devices"][0]["peakAllocated"]["since"].as_str().expect("since");
    let ms = |t: &str| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("{t}: {e}"))
            .unix_timestamp_nanos()
            / 1_000_000
    };
    assert_eq!(ms(analytics_since), ms(&since), "{analytics_since} vs {since}");
    assert!(d.ok(&["reset-peaks"]).starts_with("peaks start over from their current values, since "));
    assert_eq!(d.ok(&["optimize-history"]), "no optimizer runs yet\n");
    // No worker: optimize still runs memwarden's rungs and says which it left out.
    let out = d.ok(&["optimize", "cpu", "--force"]);
    assert!(out.contains("skipped trimCache: ") && out.contains("skipped unload: "), "{out}");
    let out = d.ok(&["health"]);
    assert!(out.starts_with(&format!("memwarden {} healthy: pid {}", env!("CARGO_PKG_VERSION"), d.pid())), "{out}");
    assert!(out.contains("workers disabled: 0 ready"), "{out}");
}

/// Frees every other of `ids` (1 MiB each, filling 8 MiB blocks): the pool is fragmented.
fn free_every_other(d: &Daemon, ids: &[String]) {
    for id in ids.iter().step_by(2) {
        d.ok(&["free", id]);
    }
}

/// `load` and `defrag` on a terminal run in the background (202, an operation) and draw a bar
/// that ends with the total, the time and the rate; without one they send the synchronous
/// request, draw nothing and print as before.
#[test]
fn load_and_defrag_draw_a_bar_on_a_terminal_only() {
    let dir = Scratch::new("bars");
    let d = Daemon::with_config(
        "[pool]\nblock_size_bytes = 8388608\ndedicated_threshold_bytes = 8388608\nmax_pool_bytes = 16777216\n",
    );
    let operations = |d: &Daemon| d.api("/api/memory/operations")["operations"].as_array().expect("list").clone();
    let tiny = tiny_model(&dir.0, "tiny");
    let out = d.run(&["load", tiny.to_str().expect("path"), "--name", "tiny"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("loaded w-1 (tiny) on cpu: 2.00 MiB in "), "{text}");
    let ids: Vec<String> = (0..16).map(|_| id_line(&d.ok(&["alloc", "cpu", "1MiB"]))).collect();
    free_every_other(&d, &ids);
    let out = d.run(&["defrag", "cpu"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("cpu (balanced): moved 4 allocation(s), 4.00 MiB;"));
    assert!(operations(&d).is_empty(), "no terminal: synchronous requests, no operations");

    // On a terminal: a bar, ending with the bytes, the time and the rate; then the same text.
    let other = tiny_model(&dir.0, "other");
    let other = other.to_str().expect("path");
    let screen = in_terminal(&d, &["load", other, "--name", "other"], 20.0);
    let bar = screen.lines().find(|l| l.contains("load other [")).unwrap_or_else(|| panic!("{screen:?}"));
    assert!(bar.contains("2.00 MiB in ") && bar.contains("/s"), "final rate: {bar:?}");
    assert!(screen.contains("loaded w-2 (other) on cpu: 2.00 MiB"), "{screen:?}");
    // Fragmented again: the 8 left, 8 more, every other one freed.
    let mut live: Vec<String> = ids.into_iter().skip(1).step_by(2).collect();
    live.extend((0..8).map(|_| id_line(&d.ok(&["alloc", "cpu", "1MiB"]))));
    free_every_other(&d, &live);
    let screen = in_terminal(&d, &["defrag", "cpu"], 20.0);
    let bar = screen.lines().find(|l| l.contains("defrag cpu [")).unwrap_or_else(|| panic!("{screen:?}"));
    assert!(bar.contains("4.00 MiB in ") && bar.contains("/s"), "final rate: {bar:?}");
    assert!(screen.contains("cpu (balanced): moved 4 allocation(s), 4.00 MiB;"), "{screen:?}");
    // --json prints the synchronous answer's data (a second load shares w-2).
    let screen = in_terminal(&d, &["--json", "load", other], 20.0);
    assert!(screen.contains("\"modelId\": \"w-2\""), "{screen:?}");
    let ops = operations(&d);
    let kinds: Vec<(&str, &str)> =
        ops.iter().map(|o| (o["kind"].as_str().unwrap_or(""), o["status"].as_str().unwrap_or(""))).collect();
    assert_eq!(kinds, [("modelLoad", "completed"), ("defragment", "completed"), ("modelLoad", "completed")]);
    assert_eq!(ops[1]["bytesDone"], 4 * MIB, "{ops:?}");
    // A failed load fails the command with the code the synchronous request answers.
    let screen = in_terminal(&d, &["load", "/nonexistent/x.safetensors"], 20.0);
    assert!(screen.contains("FILE_NOT_FOUND: /nonexistent/x.safetensors: no such file"), "{screen:?}");
}
