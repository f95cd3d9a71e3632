//! Text output: tables, byte counts, bars, times in words, and the JSON that `--json` prints.

use memwarden_core::units::format_bytes;
use memwarden_protocol::api::RangeDto;
use serde_json::Value;
use std::fmt::Write as _;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

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

/// Every line indented by two spaces.
pub fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// Bytes with a sign.
pub fn signed_bytes(n: i64) -> String {
    if n < 0 {
        format!("-{}", format_bytes(n.unsigned_abs()))
    } else {
        format_bytes(n as u64)
    }
}

/// A 0–1 fraction in percent, one decimal.
pub fn pct(v: f64) -> String {
    format!("{:.1} %", v * 100.0)
}

/// `-` for a missing text.
pub fn or_dash(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

/// The response data as the daemon sent it, pretty-printed.
pub fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// The response data as one line (streams: one JSON document per line).
pub fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A 0–1 fraction as a bar of `cells` cells: `[#####...............]`.
pub fn usage_bar(fraction: f64, cells: usize) -> String {
    let full = ((fraction.clamp(0.0, 1.0) * cells as f64).round() as usize).min(cells);
    format!("[{}{}]", "#".repeat(full), ".".repeat(cells - full))
}

/// A time the API wrote (RFC 3339).
pub fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// A span in words, rounded to its largest unit: `1 second`, `3 minutes`, `2 hours`, `4 days`.
pub fn span_words(seconds: f64) -> String {
    let s = seconds.abs();
    let (n, unit) = match s {
        s if s < 59.5 => (s.round().max(1.0), "second"),
        s if s < 3570.0 => ((s / 60.0).round(), "minute"),
        s if s < 84_600.0 => ((s / 3600.0).round(), "hour"),
        s => ((s / 86_400.0).round(), "day"),
    };
    format!("{n:.0} {unit}{}", if n == 1.0 { "" } else { "s" })
}

/// How long ago `t` was, as `ollama ps` says it: `3 minutes ago` (`just now` under a second;
/// the text itself when it is not a time).
pub fn ago(t: &str, now: OffsetDateTime) -> String {
    let Some(t) = parse_time(t) else { return t.to_string() };
    let secs = (now - t).as_seconds_f64();
    if secs.abs() < 1.0 {
        "just now".into()
    } else if secs < 0.0 {
        // The daemon's clock is ahead of this one's.
        format!("{} from now", span_words(secs))
    } else {
        format!("{} ago", span_words(secs))
    }
}

/// When `t` comes: `4 minutes from now`, or `overdue` once it has passed.
pub fn from_now(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let secs = (t - now).as_seconds_f64();
    if secs < 0.0 {
        "overdue".into()
    } else {
        format!("{} from now", span_words(secs))
    }
}

/// An uptime: `45 s`, `12 min`, `3 h 12 min`, `2 d 4 h`.
pub fn uptime(seconds: u64) -> String {
    let (d, h, m) = (seconds / 86_400, seconds / 3600 % 24, seconds / 60 % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{seconds} s"),
        (0, 0, m) => format!("{m} min"),
        (0, h, m) => format!("{h} h {m} min"),
        (d, h, _) => format!("{d} d {h} h"),
    }
}

/// A rate: `2.31 GiB/s`.
pub fn rate(bytes_per_second: f64) -> String {
    format!("{}/s", format_bytes(bytes_per_second.max(0.0) as u64))
}

/// Width of a block's bar in `memwarden pools`.
pub const BAR_CELLS: usize = 64;

/// One block as a bar: each cell is `#` when at least half its bytes are used, `.` otherwise.
pub fn block_bar(size_bytes: u64, ranges: &[RangeDto]) -> String {
    let cell = size_bytes.div_ceil(BAR_CELLS as u64).max(1);
    let mut used = vec![0u64; BAR_CELLS];
    for r in ranges.iter().filter(|r| !r.free) {
        let (start, end) = (r.offset, r.offset + r.size_bytes);
        for (i, slot) in used.iter_mut().enumerate() {
            let (a, b) = (i as u64 * cell, (i as u64 + 1) * cell);
            *slot += end.min(b).saturating_sub(start.max(a));
        }
    }
    used.iter().map(|&b| if b * 2 >= cell { '#' } else { '.' }).collect()
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
    fn times_read_as_words() {
        let now = parse_time("2026-01-01T12:00:00Z").expect("time");
        assert_eq!(ago("2026-01-01T11:57:00Z", now), "3 minutes ago");
        assert_eq!(ago("2026-01-01T11:59:59Z", now), "1 second ago");
        assert_eq!(ago("2026-01-01T12:00:00.2Z", now), "just now");
        assert_eq!(ago("2026-01-01T10:00:00Z", now), "2 hours ago");
        assert_eq!(ago("2025-12-29T12:00:00Z", now), "3 days ago");
        assert_eq!(ago("not a time", now), "not a time");
        let later = parse_time("2026-01-01T12:04:59.5Z").expect("time");
        assert_eq!(from_now(later, now), "5 minutes from now");
        assert_eq!(from_now(now, later), "overdue");
        assert_eq!(uptime(11_520), "3 h 12 min");
        assert_eq!(uptime(42), "42 s");
        assert_eq!(usage_bar(0.25, 8), "[##......]");
        assert_eq!(usage_bar(1.5, 4), "[####]");
    }

    #[test]
    fn bars_show_used_and_free_cells() {
        let range =
            |offset: u64, size_bytes: u64, free: bool| RangeDto { offset, size_bytes, free, allocation_id: None };
        let ranges = vec![range(0, 32, false), range(32, 32, true), range(64, 64, false)];
        let bar = block_bar(128, &ranges);
        assert_eq!(bar.len(), BAR_CELLS);
        assert_eq!(&bar[..16], "################");
        assert_eq!(&bar[16..32], "................");
        assert_eq!(&bar[32..], "################################");
    }
}
