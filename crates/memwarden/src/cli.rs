//! The client commands: talk to a running daemon over its REST API and print tables (or the
//! raw JSON envelope's `data` with `--json`). Failures print the server's code and message and
//! exit non-zero.

use memwarden_core::units::{format_bytes, parse_size};
use serde_json::{json, Value};
use std::fmt::Write as _;

pub const DEFAULT_URL: &str = "http://127.0.0.1:5000";

pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// A failed command: what to print on stderr.
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        Client { base: base.trim_end_matches('/').to_string(), token, agent }
    }

    /// Sends a request and returns the envelope's `data`, or the envelope's error as a CliError.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match (method, body) {
            ("GET", _) => with_auth(self.agent.get(&url), &auth).call(),
            ("DELETE", _) => with_auth(self.agent.delete(&url), &auth).call(),
            ("POST", Some(b)) => with_auth(self.agent.post(&url), &auth).send_json(&b),
            ("POST", None) => with_auth(self.agent.post(&url), &auth).send_empty(),
            _ => return Err(CliError(format!("unsupported method {method}"))),
        };
        let mut response = result.map_err(|e| {
            CliError(format!("cannot reach memwarden at {}: {e} (is `memwarden serve` running?)", self.base))
        })?;
        let status = response.status();
        let envelope: Value = response
            .body_mut()
            .read_json()
            .map_err(|e| CliError(format!("{url} answered {status} without a JSON envelope: {e}")))?;
        if envelope["success"].as_bool() == Some(true) {
            Ok(envelope["data"].clone())
        } else {
            let code = envelope["error"]["code"].as_str().unwrap_or("UNKNOWN");
            let message = envelope["error"]["message"].as_str().unwrap_or("no message");
            Err(CliError(format!("{code} ({}): {message}", status.as_u16())))
        }
    }
}

impl Client {
    /// Follows `/api/memory/events`, calling `on_event` with each event's JSON until it returns
    /// false or the stream ends.
    pub fn follow_events(&self, mut on_event: impl FnMut(&Value) -> bool) -> Result<(), CliError> {
        use std::io::BufRead;
        let url = format!("{}/api/memory/events", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let resp = with_auth(self.agent.get(&url), &auth)
            .call()
            .map_err(|e| CliError(format!("cannot reach memwarden at {}: {e}", self.base)))?;
        if !resp.status().is_success() {
            return Err(CliError(format!("{url} answered {}", resp.status())));
        }
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        for line in reader.lines() {
            let line = line.map_err(|e| CliError(format!("event stream broke: {e}")))?;
            if let Some(data) = line.strip_prefix("data:") {
                if let Ok(v) = serde_json::from_str::<Value>(data.trim()) {
                    if !on_event(&v) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

fn with_auth<B>(req: ureq::RequestBuilder<B>, auth: &Option<String>) -> ureq::RequestBuilder<B> {
    match auth {
        Some(a) => req.header("Authorization", a),
        None => req,
    }
}

fn path_segment(s: &str) -> String {
    // Device ids and allocation ids are [a-z0-9:_-]; escape anything else rather than trust it.
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b':' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Calls `{route}/{device}` for one device or `{route}` for all; `route_one` overrides the
/// per-device prefix where the API spells it differently.
fn one_or_all(
    client: &Client,
    method: &str,
    route: &str,
    route_one: Option<&str>,
    device: Option<&str>,
    body: Option<Value>,
) -> Result<Value, CliError> {
    match device {
        Some(d) => client.call(method, &format!("{}/{}", route_one.unwrap_or(route), path_segment(d)), body),
        None => client.call(method, route, body),
    }
}

/// The per-device objects of a one-or-all answer (all-device answers list them in `devices`).
fn per_device(device: Option<&str>, data: Value) -> Vec<Value> {
    match device {
        Some(_) => vec![data],
        None => data["devices"].as_array().cloned().unwrap_or_default(),
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// Formats rows as a left-aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(header.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

pub fn status(client: &Client, device: Option<&str>, as_json: bool) -> Result<String, CliError> {
    let data = one_or_all(client, "GET", "/api/memory/status", None, device, None)?;
    if as_json {
        return Ok(pretty(&data));
    }
    let data_backends = data["backends"].as_array().cloned().unwrap_or_default();
    let devices = per_device(device, data);
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            vec![
                s(&d["deviceId"]).to_string(),
                s(&d["memoryType"]).to_string(),
                format_bytes(u(&d["totalMemory"])),
                format_bytes(u(&d["usedMemory"])),
                format_bytes(u(&d["availableMemory"])),
                format!("{:.1}%", d["memoryUtilization"].as_f64().unwrap_or(0.0) * 100.0),
                format_bytes(u(&d["reservedBytes"])),
                format_bytes(u(&d["allocatedBytes"])),
                s(&d["source"]).to_string(),
            ]
        })
        .collect();
    let mut out = table(
        &["DEVICE", "MEMORY", "TOTAL", "USED", "AVAILABLE", "UTIL", "POOL HELD", "POOL ALLOCATED", "SOURCE"],
        &rows,
    );
    // Backends that could not start, and why (only in the all-device answer).
    for b in data_backends.iter().filter(|b| b["available"] == false) {
        let _ = writeln!(out, "{}: {}", s(&b["name"]), s(&b["reason"]));
    }
    Ok(out)
}

pub struct AllocArgs<'a> {
    pub device: &'a str,
    pub size: &'a str,
    pub kind: Option<&'a str>,
    pub purpose: Option<&'a str>,
    pub owner: Option<&'a str>,
    pub alignment: Option<&'a str>,
    pub persistent: bool,
    pub immovable: bool,
}

pub fn alloc(client: &Client, args: AllocArgs<'_>, as_json: bool) -> Result<String, CliError> {
    let size = parse_size(args.size).map_err(|e| CliError(e.to_string()))?;
    let mut body = json!({ "sizeBytes": size, "persistent": args.persistent, "movable": !args.immovable });
    if let Some(k) = args.kind {
        body["memoryType"] = json!(k);
    }
    if let Some(p) = args.purpose {
        body["purpose"] = json!(p);
    }
    if let Some(o) = args.owner {
        body["owner"] = json!(o);
    }
    if let Some(a) = args.alignment {
        body["alignment"] = json!(parse_size(a).map_err(|e| CliError(format!("alignment: {e}")))?);
    }
    let data =
        client.call("POST", &format!("/api/memory/allocations/allocate/{}", path_segment(args.device)), Some(body))?;
    if as_json {
        return Ok(pretty(&data));
    }
    Ok(format!(
        "allocated {} ({}) of {} memory on {} at {}\n{}\n",
        format_bytes(u(&data["sizeBytes"])),
        u(&data["sizeBytes"]),
        s(&data["memoryType"]),
        s(&data["deviceId"]),
        data["address"].as_str().unwrap_or("(no memory: reservation)"),
        s(&data["allocationId"]),
    ))
}

pub fn free(client: &Client, id: &str, as_json: bool) -> Result<String, CliError> {
    let data = client.call("DELETE", &format!("/api/memory/allocations/{}", path_segment(id)), None)?;
    if as_json {
        return Ok(pretty(&data));
    }
    Ok(format!(
        "freed {} ({}) on {}\n",
        s(&data["allocationId"]),
        format_bytes(u(&data["freedBytes"])),
        s(&data["deviceId"])
    ))
}

pub fn allocations(client: &Client, device: Option<&str>, as_json: bool) -> Result<String, CliError> {
    let data =
        one_or_all(client, "GET", "/api/memory/allocations", Some("/api/memory/allocations/device"), device, None)?;
    if as_json {
        return Ok(pretty(&data));
    }
    let rows: Vec<Vec<String>> = data["allocations"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|a| {
                    vec![
                        s(&a["allocationId"]).to_string(),
                        s(&a["deviceId"]).to_string(),
                        s(&a["memoryType"]).to_string(),
                        format_bytes(u(&a["sizeBytes"])),
                        a["address"].as_str().unwrap_or("-").to_string(),
                        a["purpose"].as_str().unwrap_or("-").to_string(),
                        a["owner"].as_str().unwrap_or("-").to_string(),
                        s(&a["allocatedAt"]).to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = table(&["ID", "DEVICE", "KIND", "SIZE", "ADDRESS", "PURPOSE", "OWNER", "ALLOCATED AT"], &rows);
    let _ = writeln!(out, "{} allocation(s), {}", u(&data["count"]), format_bytes(u(&data["totalBytes"])));
    Ok(out)
}

pub fn clear(client: &Client, device: Option<&str>, as_json: bool) -> Result<String, CliError> {
    let data = one_or_all(client, "POST", "/api/memory/operations/clear", None, device, None)?;
    if as_json {
        return Ok(pretty(&data));
    }
    let mut out = String::new();
    for d in data["devices"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{}: released {} to the OS; pools still hold {}",
            s(&d["deviceId"]),
            format_bytes(u(&d["clearedBytes"])),
            format_bytes(u(&d["reservedBytes"]))
        );
    }
    Ok(out)
}

/// Runs a defragmentation pass and prints what it did.
pub fn defrag(
    client: &Client,
    device: Option<&str>,
    strategy: Option<&str>,
    as_json: bool,
) -> Result<String, CliError> {
    let body = match strategy {
        Some(s) => json!({ "strategy": s }),
        None => json!({}),
    };
    let data = one_or_all(client, "POST", "/api/memory/operations/defragment", None, device, Some(body))?;
    if as_json {
        return Ok(pretty(&data));
    }
    let reports = per_device(device, data);
    let mut out = String::new();
    for r in reports {
        let _ = writeln!(
            out,
            "{} ({}): moved {} allocation(s), {}; released {} block(s), {}; fragmentation {:.2} -> {:.2}; largest free {} -> {}; {:.1} ms",
            s(&r["deviceId"]),
            s(&r["strategy"]),
            u(&r["allocationsMoved"]),
            format_bytes(u(&r["bytesMoved"])),
            u(&r["blocksReleased"]),
            format_bytes(u(&r["bytesReleased"])),
            r["fragmentationBefore"].as_f64().unwrap_or(0.0),
            r["fragmentationAfter"].as_f64().unwrap_or(0.0),
            format_bytes(u(&r["largestFreeBlockBefore"])),
            format_bytes(u(&r["largestFreeBlockAfter"])),
            r["durationMs"].as_f64().unwrap_or(0.0),
        );
        if let Some(e) = r["error"].as_str() {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    Ok(out)
}

/// Width of a block's bar in `memwarden pools`.
const BAR_CELLS: usize = 64;

/// One block as a bar: each cell is `#` when at least half its bytes are used, `.` otherwise.
pub fn block_bar(size_bytes: u64, ranges: &[Value]) -> String {
    let cell = size_bytes.div_ceil(BAR_CELLS as u64).max(1);
    let mut used = vec![0u64; BAR_CELLS];
    for r in ranges.iter().filter(|r| r["free"] == false) {
        let (start, end) = (u(&r["offset"]), u(&r["offset"]) + u(&r["sizeBytes"]));
        for (i, slot) in used.iter_mut().enumerate() {
            let (a, b) = (i as u64 * cell, (i as u64 + 1) * cell);
            *slot += end.min(b).saturating_sub(start.max(a));
        }
    }
    used.iter().map(|&b| if b * 2 >= cell { '#' } else { '.' }).collect()
}

/// Draws every pool block of every device (or one) as a bar of used and free ranges.
/// `memwarden models`: per device the loaded models, then every worker with its state.
pub fn models(client: &Client, device: Option<&str>, as_json: bool) -> Result<String, CliError> {
    let path = match device {
        Some(d) => format!("/api/memory/models?deviceId={}", path_segment(d)),
        None => "/api/memory/models".to_string(),
    };
    let data = client.call("GET", &path, None)?;
    if as_json {
        return Ok(pretty(&data));
    }
    let mut out = String::new();
    for d in data["devices"].as_array().into_iter().flatten() {
        let m = &d["modelMemory"];
        let measured = match m["processBytes"].as_u64() {
            Some(p) => format!(
                ", processes hold {} ({} unattributed)",
                format_bytes(p),
                signed_bytes(m["unattributedBytes"].as_i64().unwrap_or(0))
            ),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "{}: {} model(s), {} reported{}; {} available for models of {}",
            s(&d["deviceId"]),
            u(&m["loadedModelCount"]),
            format_bytes(u(&m["totalModelMemory"])),
            measured,
            format_bytes(u(&m["availableForModels"])),
            format_bytes(u(&d["systemMemory"]["totalBytes"])),
        );
        let rows: Vec<Vec<String>> = m["loadedModels"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| {
                vec![
                    s(&x["modelId"]).to_string(),
                    s(&x["modelName"]).to_string(),
                    format_bytes(u(&x["sizeBytes"])),
                    u(&x["priority"]).to_string(),
                    if x["pinned"] == true { "yes".into() } else { "no".into() },
                    format!("{} ({})", s(&x["workerId"]), u(&x["pid"])),
                    s(&x["lastAccess"]).to_string(),
                ]
            })
            .collect();
        if !rows.is_empty() {
            out.push_str(&indent(&table(
                &["MODEL", "NAME", "SIZE", "PRIORITY", "PINNED", "WORKER (PID)", "LAST USE"],
                &rows,
            )));
        }
    }
    let c = &data["coordinationStatus"];
    let _ = writeln!(
        out,
        "workers ({}synchronized, socket {}):",
        if c["synchronized"] == true { "" } else { "not " },
        s(&c["socket"])
    );
    let rows: Vec<Vec<String>> = c["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            vec![
                s(&w["workerId"]).to_string(),
                s(&w["role"]).to_string(),
                s(&w["state"]).to_string(),
                w["pid"].as_u64().map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                u(&w["modelCount"]).to_string(),
                u(&w["restarts"]).to_string(),
                w["lastError"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    out.push_str(&indent(&table(&["WORKER", "ROLE", "STATE", "PID", "MODELS", "RESTARTS", "LAST ERROR"], &rows)));
    Ok(out)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn signed_bytes(n: i64) -> String {
    if n < 0 {
        format!("-{}", format_bytes(n.unsigned_abs()))
    } else {
        format_bytes(n as u64)
    }
}

/// `memwarden load PATH`.
pub fn load(client: &Client, body: Value, as_json: bool) -> Result<String, CliError> {
    let m = client.call("POST", "/api/memory/models/load", Some(body))?;
    if as_json {
        return Ok(pretty(&m));
    }
    Ok(format!(
        "loaded {} ({}) on {}: {} in {:.0} ms, worker {} (pid {})\n",
        s(&m["modelId"]),
        s(&m["modelName"]),
        s(&m["deviceId"]),
        format_bytes(u(&m["sizeBytes"])),
        m["loadTimeMs"].as_f64().unwrap_or(0.0),
        s(&m["workerId"]),
        u(&m["pid"]),
    ))
}

/// `memwarden unload ID`.
pub fn unload(client: &Client, id: &str, as_json: bool) -> Result<String, CliError> {
    let r = client.call("DELETE", &format!("/api/memory/models/{}", path_segment(id)), None)?;
    if as_json {
        return Ok(pretty(&r));
    }
    let measured = match (r["processBytesBefore"].as_u64(), r["processBytesAfter"].as_u64()) {
        (Some(b), Some(a)) => {
            format!("; its process went from {} to {}", format_bytes(b), format_bytes(a))
        }
        _ => String::new(),
    };
    Ok(format!(
        "unloaded {} from {} on {}: {} released (claimed){measured}\n",
        s(&r["modelId"]),
        s(&r["workerId"]),
        s(&r["deviceId"]),
        format_bytes(u(&r["freedBytes"])),
    ))
}

/// `memwarden optimize DEVICE`: one ladder run, each step with its claimed and measured bytes.
#[allow(clippy::too_many_arguments)]
pub fn optimize(
    client: &Client,
    device: &str,
    strategy: Option<&str>,
    min_free: Option<&str>,
    target: Option<f64>,
    force: bool,
    exclude: &[String],
    as_json: bool,
) -> Result<String, CliError> {
    let min = min_free.map(parse_size).transpose().map_err(|e| CliError(format!("--min-free: {e}")))?;
    let body = json!({
        "deviceId": device, "strategy": strategy, "minMemoryToFree": min, "targetPressureLevel": target,
        "forceOptimization": force, "excludeModels": exclude,
    });
    let r = client.call("POST", "/api/memory/models/optimize", Some(body))?;
    if as_json {
        return Ok(pretty(&r));
    }
    let mut out = String::new();
    if r["optimizationTriggered"] != true {
        let _ = writeln!(out, "not triggered: {}", s(&r["message"]));
        return Ok(out);
    }
    let rows: Vec<Vec<String>> = r["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|st| {
            vec![
                s(&st["action"]).to_string(),
                s(&st["target"]).to_string(),
                format_bytes(u(&st["claimedBytes"])),
                signed_bytes(st["measuredBytes"].as_i64().unwrap_or(0)),
                format!("{:.1} ms", st["durationMs"].as_f64().unwrap_or(0.0)),
                if st["verified"] == true { "yes".into() } else { "NO".into() },
                st["error"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&["STEP", "TARGET", "CLAIMED", "MEASURED", "TIME", "VERIFIED", "ERROR"], &rows));
    let _ = writeln!(
        out,
        "{} ({}): freed {} measured ({} claimed) of {} wanted in {:.0} ms; pressure {} → {} ({})",
        s(&r["deviceId"]),
        s(&r["optimizationStrategy"]),
        signed_bytes(r["memoryFreed"].as_i64().unwrap_or(0)),
        format_bytes(u(&r["memoryClaimed"])),
        format_bytes(u(&r["targetBytes"])),
        r["optimizationTimeMs"].as_f64().unwrap_or(0.0),
        u(&r["previousPressureLevel"]),
        u(&r["newPressureLevel"]),
        s(&r["newPressureCategory"]),
    );
    Ok(out)
}

fn pct(v: &Value) -> String {
    format!("{:.1} %", v.as_f64().unwrap_or(0.0) * 100.0)
}

/// `memwarden analytics`: per device, then the top holders and leak suspects.
pub fn analytics(client: &Client, window: &str, as_json: bool) -> Result<String, CliError> {
    let a = client.call("GET", &format!("/api/memory/analytics?window={}", path_segment(window)), None)?;
    if as_json {
        return Ok(pretty(&a));
    }
    let mut out = String::new();
    let _ = writeln!(out, "window {} ({} → {})", s(&a["window"]), s(&a["windowStart"]), s(&a["windowEnd"]));
    if a["recording"] != true {
        let _ = writeln!(out, "recording is off (analytics.enabled = false): current figures only");
    }
    for d in a["devices"].as_array().into_iter().flatten() {
        let act = &d["activity"];
        let p = &d["usagePercentiles"];
        let t = &d["pressureTime"];
        let _ = writeln!(
            out,
            "\n{}: used {} of {} ({} samples at {} ms), pressure {}",
            s(&d["deviceId"]),
            format_bytes(u(&d["usedBytes"])),
            format_bytes(u(&d["totalBytes"])),
            u(&d["samples"]),
            u(&d["resolutionMs"]),
            s(&d["pressureLevel"]),
        );
        let _ = writeln!(
            out,
            "  peak used {} at {} (window peak {}); peak allocated {} at {}",
            format_bytes(u(&d["peakUsed"]["valueBytes"])),
            s(&d["peakUsed"]["at"]),
            format_bytes(u(&d["windowPeakUsedBytes"])),
            format_bytes(u(&d["peakAllocated"]["valueBytes"])),
            s(&d["peakAllocated"]["at"]),
        );
        if !p.is_null() {
            let _ = writeln!(
                out,
                "  used p50 {}  p90 {}  p99 {}  max {}",
                format_bytes(u(&p["p50Bytes"])),
                format_bytes(u(&p["p90Bytes"])),
                format_bytes(u(&p["p99Bytes"])),
                format_bytes(u(&p["maxBytes"])),
            );
        }
        let _ = writeln!(
            out,
            "  {} allocations ({}, {:.2}/s, average {}), {} frees, {} failed, {} moved, {} exported",
            u(&act["allocations"]),
            format_bytes(u(&act["allocatedBytes"])),
            act["allocationsPerSecond"].as_f64().unwrap_or(0.0),
            format_bytes(u(&act["averageAllocationSizeBytes"])),
            u(&act["frees"]),
            u(&act["failedAllocations"]),
            u(&act["moves"]),
            u(&act["exports"]),
        );
        let _ = writeln!(
            out,
            "  pools {} reserved, {} allocated; fragmentation {} ({}); models {}",
            format_bytes(u(&d["poolReservedBytes"])),
            format_bytes(u(&d["poolAllocatedBytes"])),
            pct(&d["fragmentation"]),
            s(&d["fragmentationTrend"]["trend"]),
            format_bytes(u(&d["modelBytes"])),
        );
        let _ = writeln!(
            out,
            "  transfers {} out, {} in; defragmentation {} runs, {} moved, {} released",
            format_bytes(u(&d["transfers"]["outBytes"])),
            format_bytes(u(&d["transfers"]["inBytes"])),
            u(&d["defragmentation"]["runs"]),
            format_bytes(u(&d["defragmentation"]["movedBytes"])),
            format_bytes(u(&d["defragmentation"]["releasedBytes"])),
        );
        let secs = |k: &str| t[k].as_f64().unwrap_or(0.0);
        let _ = writeln!(
            out,
            "  time at pressure: low {:.0} s, moderate {:.0} s, high {:.0} s, critical {:.0} s",
            secs("lowSeconds"),
            secs("moderateSeconds"),
            secs("highSeconds"),
            secs("criticalSeconds"),
        );
    }
    let holders = |v: &Value| -> Vec<Vec<String>> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                vec![
                    s(&h["name"]).to_string(),
                    format_bytes(u(&h["liveBytes"])),
                    u(&h["liveCount"]).to_string(),
                    format_bytes(u(&h["allocatedBytesInWindow"])),
                    u(&h["allocationsInWindow"]).to_string(),
                ]
            })
            .collect()
    };
    for (title, key) in [("owners", "topOwners"), ("purposes", "topPurposes")] {
        let rows = holders(&a[key]);
        if !rows.is_empty() {
            let _ = writeln!(out, "\ntop {title}");
            out.push_str(&table(&["NAME", "LIVE", "COUNT", "ALLOCATED IN WINDOW", "ALLOCATIONS"], &rows));
        }
    }
    let models: Vec<Vec<String>> = a["topModels"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            vec![
                s(&m["modelName"]).to_string(),
                s(&m["modelId"]).to_string(),
                s(&m["deviceId"]).to_string(),
                format_bytes(u(&m["currentBytes"])),
                format_bytes(u(&m["peakBytesInWindow"])),
                if m["loaded"] == true { "loaded".into() } else { "gone".into() },
            ]
        })
        .collect();
    if !models.is_empty() {
        let _ = writeln!(out, "\ntop models");
        out.push_str(&table(&["NAME", "ID", "DEVICE", "NOW", "PEAK", "STATE"], &models));
    }
    let leaks: Vec<Vec<String>> = a["leakSuspects"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            vec![
                s(&l["allocationId"]).to_string(),
                s(&l["deviceId"]).to_string(),
                format_bytes(u(&l["sizeBytes"])),
                l["owner"].as_str().unwrap_or("(none)").to_string(),
                format!("{:.0} s", l["ageSeconds"].as_f64().unwrap_or(0.0)),
                s(&l["reason"]).to_string(),
            ]
        })
        .collect();
    if !leaks.is_empty() {
        let _ = writeln!(out, "\nleak suspects");
        out.push_str(&table(&["ALLOCATION", "DEVICE", "SIZE", "OWNER", "AGE", "REASON"], &leaks));
    }
    if a["eventLog"]["coversWindow"] != true {
        let _ = writeln!(out, "\n(the event log no longer reaches the window's start: histograms are partial)");
    }
    Ok(out)
}

/// `memwarden recommend`: each recommendation with its evidence and the request that applies it.
pub fn recommend(client: &Client, as_json: bool) -> Result<String, CliError> {
    let r = client.call("GET", "/api/memory/optimization", None)?;
    if as_json {
        return Ok(pretty(&r));
    }
    let recs = r["recommendations"].as_array().cloned().unwrap_or_default();
    if recs.is_empty() {
        return Ok("no recommendations: no rule found its evidence in the measured state\n".into());
    }
    let mut out = String::new();
    for (i, rec) in recs.iter().enumerate() {
        let _ = writeln!(
            out,
            "{}. [{}] {} on {}: saves about {}",
            i + 1,
            s(&rec["priority"]),
            s(&rec["type"]),
            s(&rec["deviceId"]),
            format_bytes(u(&rec["estimatedSavingsBytes"])),
        );
        let _ = writeln!(out, "   {}", s(&rec["message"]));
        if let Some(ev) = rec["evidence"].as_object() {
            let parts: Vec<String> = ev.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(out, "   evidence: {}", parts.join(", "));
        }
        let a = &rec["action"];
        let body = if a["body"].is_null() { String::new() } else { format!(" {}", a["body"]) };
        let _ = writeln!(out, "   apply: {} {}{}", s(&a["method"]), s(&a["path"]), body);
    }
    let _ = writeln!(out, "total estimated savings: {}", format_bytes(u(&r["totalEstimatedSavingsBytes"])));
    Ok(out)
}

pub fn pools(client: &Client, device: Option<&str>, as_json: bool) -> Result<String, CliError> {
    let data = one_or_all(client, "GET", "/api/memory/pools", None, device, None)?;
    if as_json {
        return Ok(pretty(&data));
    }
    let devices = per_device(device, data);
    let mut out = String::new();
    for d in devices {
        for p in d["pools"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "{} {} pool: {} block(s), {} held, {} allocated, {} free in {} range(s), largest {}, fragmentation {:.2}",
                s(&d["deviceId"]),
                s(&p["memoryType"]),
                u(&p["blockCount"]),
                format_bytes(u(&p["reservedBytes"])),
                format_bytes(u(&p["allocatedBytes"])),
                format_bytes(u(&p["freeInPoolBytes"])),
                u(&p["freeRangeCount"]),
                format_bytes(u(&p["largestFreeBlock"])),
                p["fragmentation"].as_f64().unwrap_or(0.0),
            );
            for b in p["blocks"].as_array().into_iter().flatten() {
                let ranges = b["ranges"].as_array().cloned().unwrap_or_default();
                let size = u(&b["sizeBytes"]);
                let used: u64 = ranges.iter().filter(|r| r["free"] == false).map(|r| u(&r["sizeBytes"])).sum();
                let _ = writeln!(
                    out,
                    "  block {:<4} {:>10} [{}] {:>3}% used{}",
                    u(&b["blockId"]),
                    format_bytes(size),
                    block_bar(size, &ranges),
                    used * 100 / size.max(1),
                    if b["dedicated"] == true { ", dedicated" } else { "" },
                );
            }
        }
    }
    Ok(out)
}

/// Pressure of every device (or one); with `watch`, then every level change as it happens.
pub fn pressure(client: &Client, device: Option<&str>, watch: bool, as_json: bool) -> Result<String, CliError> {
    let data = one_or_all(client, "GET", "/api/memory/pressure", None, device, None)?;
    let mut out = if as_json {
        pretty(&data)
    } else {
        let devices = per_device(device, data);
        let rows: Vec<Vec<String>> = devices
            .iter()
            .map(|d| {
                vec![
                    s(&d["deviceId"]).to_string(),
                    s(&d["pressureCategory"]).to_string(),
                    u(&d["pressureLevel"]).to_string(),
                    format!("{:.1}%", d["utilizationPercentage"].as_f64().unwrap_or(0.0)),
                    format_bytes(u(&d["availableMemory"])),
                    d["psiSome10"].as_f64().map(|p| format!("{p:.2}")).unwrap_or_else(|| "-".into()),
                    d["timeToCritical"].as_f64().map(|t| format!("{t:.0} s")).unwrap_or_else(|| "-".into()),
                    d["recommendedActions"].as_array().map(|a| a.len().to_string()).unwrap_or_default(),
                ]
            })
            .collect();
        table(&["DEVICE", "LEVEL", "PRESSURE", "USED", "AVAILABLE", "PSI SOME10", "TO CRITICAL", "ACTIONS"], &rows)
    };
    if watch {
        print!("{out}");
        out.clear();
        let wanted = device.map(|d| d.to_string());
        client.follow_events(|e| {
            let dev = s(&e["deviceId"]);
            if wanted
                .as_deref()
                .is_none_or(|w| w == dev || w.parse::<memwarden_core::DeviceId>().is_ok_and(|id| id.to_string() == dev))
            {
                if as_json {
                    println!("{e}");
                } else {
                    println!(
                        "{} {}: {} -> {} at {:.1}% used, {} available",
                        s(&e["timestamp"]),
                        dev,
                        s(&e["oldLevel"]),
                        s(&e["newLevel"]),
                        e["utilizationPercentage"].as_f64().unwrap_or(0.0),
                        format_bytes(u(&e["availableMemory"])),
                    );
                }
            }
            true
        })?;
    }
    Ok(out)
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }

    #[test]
    fn bars_show_used_and_free_cells() {
        let ranges = vec![
            json!({"offset": 0, "sizeBytes": 32, "free": false}),
            json!({"offset": 32, "sizeBytes": 32, "free": true}),
            json!({"offset": 64, "sizeBytes": 64, "free": false}),
        ];
        let bar = block_bar(128, &ranges);
        assert_eq!(bar.len(), BAR_CELLS);
        assert_eq!(&bar[..16], "################");
        assert_eq!(&bar[16..32], "................");
        assert_eq!(&bar[32..], "################################");
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(path_segment("cuda:0"), "cuda:0");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }
}
