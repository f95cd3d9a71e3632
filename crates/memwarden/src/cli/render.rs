//! Text output: tables, byte counts, pool bars, and the JSON that `--json` prints.

use memwarden_core::units::format_bytes;
use memwarden_protocol::api::RangeDto;
use serde_json::Value;
use std::fmt::Write as _;

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
