//! Long work followed with a progress bar: on a terminal, `load` and `defrag` ask the daemon to
//! run in the background (`"async": true`, answered 202 with an operation), then read
//! `GET /api/memory/operations/{id}` until it ends, drawing bytes done against bytes to do (ETA
//! while it runs; total, time and rate at the end). Without a terminal they send the synchronous
//! request and draw nothing.

use super::http::{path_segment, Answer, CliError, Client};
use super::render::rate;
use super::transfers::{done_style, progress_bar};
use indicatif::ProgressBar;
use memwarden_core::units::format_bytes;
use memwarden_protocol::api::{OperationDto, OperationStatus};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::IsTerminal as _;
use std::time::Duration;

/// How often a running operation is read.
const POLL: Duration = Duration::from_millis(100);

/// Whether to run long work in the background with a bar: stdout is a terminal.
pub fn with_bar() -> bool {
    std::io::stdout().is_terminal()
}

/// Sends `body` (asking for the background run) to `route`, follows the operation it starts to
/// its end with a bar labelled `label`, and returns its `result` as the synchronous request's
/// answer (`raw`: what `--json` prints).
pub fn run<T: DeserializeOwned, B: Serialize>(
    client: &Client,
    route: &str,
    body: &B,
    label: &str,
) -> Result<Answer<T>, CliError> {
    let started = client.call::<OperationDto, _>("POST", route, Some(body))?;
    let op = follow(client, started.data, label)?;
    let raw = op.raw.get("result").cloned().unwrap_or_default();
    let data = T::deserialize(&raw)
        .map_err(|e| CliError(format!("operation {} ended with unexpected data: {e}", op.data.operation_id)))?;
    Ok(Answer { data, raw })
}

/// Reads a running operation until it ends, drawing its progress; a failed one is an error with
/// the code and message the synchronous request would have answered.
pub fn follow(client: &Client, first: OperationDto, label: &str) -> Result<Answer<OperationDto>, CliError> {
    let bar = progress_bar(known_total(&first), label);
    bar.set_position(first.bytes_done);
    let path = format!("/api/memory/operations/{}", path_segment(&first.operation_id));
    loop {
        // The 202 itself may already tell the end: the operation is read again all the same.
        std::thread::sleep(POLL);
        let a = match client.get::<OperationDto>(&path) {
            Ok(a) => a,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        let current = &a.data;
        show(&bar, current);
        match current.status {
            OperationStatus::Running => continue,
            OperationStatus::Completed => {
                bar.set_style(done_style());
                bar.finish_with_message(format!(
                    "{} in {:.2} s, {}",
                    format_bytes(current.bytes_done),
                    current.duration_ms / 1000.0,
                    rate(current.bytes_per_second)
                ));
                return Ok(a);
            }
            OperationStatus::Failed => {
                bar.set_style(done_style());
                bar.abandon_with_message(format!(
                    "failed after {} of {}",
                    format_bytes(current.bytes_done),
                    format_bytes(current.bytes_total)
                ));
                return Err(CliError(format!(
                    "{}: {} (operation {})",
                    current.error_code.as_deref().unwrap_or("FAILED"),
                    current.error.as_deref().unwrap_or("no reason given"),
                    current.operation_id
                )));
            }
        }
    }
}

/// The bytes to do, once known: 0 is "not known yet" unless the operation completed (with
/// nothing to do).
fn known_total(op: &OperationDto) -> Option<u64> {
    (op.bytes_total > 0 || op.status == OperationStatus::Completed).then_some(op.bytes_total)
}

/// Draws bytes done against bytes to do (an empty bar while the total is not known).
fn show(bar: &ProgressBar, op: &OperationDto) {
    match known_total(op) {
        Some(total) => bar.set_length(total),
        None => bar.unset_length(),
    }
    bar.set_position(op.bytes_done);
}
