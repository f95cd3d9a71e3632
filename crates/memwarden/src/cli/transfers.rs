//! `transfer`, `copy` and `transfer-status`: bytes between allocations. A transfer the daemon
//! runs in the background (answered 202, over `transfer.sync_max_bytes`) is followed through
//! `GET /api/memory/transfer/{id}` until it ends, with a progress bar (ETA, then the final
//! rate) on a terminal and silently otherwise; `--no-wait` answers at once.

use super::http::{path_segment, Answer, CliError, Client};
use super::render::{pretty, rate};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use memwarden_core::units::{format_bytes, parse_size};
use memwarden_protocol::api::{TransferBody, TransferDto};
use std::io::IsTerminal as _;
use std::time::Duration;

/// `memwarden transfer SOURCE (--to DEVICE | --into DESTINATION)`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("destination").required(true).args(["to", "into"])))]
pub struct TransferArgs {
    /// Source allocation id.
    pub source: String,
    /// Into a new allocation on this device (it belongs to the source's owner).
    #[arg(long)]
    pub to: Option<String>,
    /// Memory kind of the new allocation (with --to): host | pinned | device.
    #[arg(long, requires = "to")]
    pub kind: Option<String>,
    /// Into this existing allocation.
    #[arg(long)]
    pub into: Option<String>,
    /// Bytes into the source to start at (default 0).
    #[arg(long)]
    pub offset: Option<String>,
    /// Bytes into the destination to write at (with --into; default 0).
    #[arg(long, requires = "into")]
    pub dest_offset: Option<String>,
    /// How much, e.g. 64MiB (default: the rest of the source).
    #[arg(long)]
    pub size: Option<String>,
    /// Free the source once the bytes have arrived.
    #[arg(long = "move")]
    pub move_source: bool,
    /// Do not follow a transfer that runs in the background: print its id at once.
    #[arg(long)]
    pub no_wait: bool,
}

/// `memwarden copy SOURCE DESTINATION`.
#[derive(clap::Args)]
pub struct CopyArgs {
    /// Source allocation id.
    pub source: String,
    /// Destination allocation id.
    pub destination: String,
    /// Bytes into the source to start at (default 0).
    #[arg(long)]
    pub offset: Option<String>,
    /// Bytes into the destination to write at (default 0).
    #[arg(long)]
    pub dest_offset: Option<String>,
    /// How much (default: the rest of the source).
    #[arg(long)]
    pub size: Option<String>,
    /// Do not follow a copy that runs in the background: print its id at once.
    #[arg(long)]
    pub no_wait: bool,
}

fn bytes(v: &Option<String>, flag: &str) -> Result<Option<i64>, CliError> {
    v.as_deref()
        .map(|s| {
            let n = parse_size(s).map_err(|e| CliError(format!("--{flag}: {e}")))?;
            i64::try_from(n).map_err(|_| CliError(format!("--{flag}: {n} is too large")))
        })
        .transpose()
}

pub fn transfer(client: &Client, a: &TransferArgs, as_json: bool) -> Result<String, CliError> {
    let body = TransferBody {
        source_allocation_id: Some(a.source.clone()),
        source_offset: bytes(&a.offset, "offset")?,
        destination_allocation_id: a.into.clone(),
        destination_offset: bytes(&a.dest_offset, "dest-offset")?,
        target_device_id: a.to.clone(),
        target_memory_type: a.kind.clone(),
        size_bytes: bytes(&a.size, "size")?,
        transfer_type: a.move_source.then(|| "move".to_string()),
    };
    run(client, "/api/memory/transfer", &body, a.no_wait, as_json)
}

pub fn copy(client: &Client, a: &CopyArgs, as_json: bool) -> Result<String, CliError> {
    let body = TransferBody {
        source_allocation_id: Some(a.source.clone()),
        source_offset: bytes(&a.offset, "offset")?,
        destination_allocation_id: Some(a.destination.clone()),
        destination_offset: bytes(&a.dest_offset, "dest-offset")?,
        size_bytes: bytes(&a.size, "size")?,
        ..TransferBody::default()
    };
    run(client, "/api/memory/copy", &body, a.no_wait, as_json)
}

fn run(client: &Client, route: &str, body: &TransferBody, no_wait: bool, as_json: bool) -> Result<String, CliError> {
    let answer = client.call::<TransferDto, _>("POST", route, Some(body))?;
    let answer = if answer.data.status == "running" && !no_wait { follow(client, answer.data)? } else { answer };
    finished(answer, as_json)
}

/// `memwarden transfer-status ID [--wait]`.
pub fn status(client: &Client, id: &str, wait: bool, as_json: bool) -> Result<String, CliError> {
    let answer = client.get::<TransferDto>(&status_path(id))?;
    let answer = if answer.data.status == "running" && wait { follow(client, answer.data)? } else { answer };
    finished(answer, as_json)
}

fn status_path(id: &str) -> String {
    format!("/api/memory/transfer/{}", path_segment(id))
}

/// What a transfer came to: JSON as the daemon gave it, or a line; a failed one is an error.
fn finished(a: Answer<TransferDto>, as_json: bool) -> Result<String, CliError> {
    let t = a.data;
    if t.status == "failed" {
        return Err(CliError(format!(
            "transfer {} failed after {} of {}: {}",
            t.transfer_id,
            format_bytes(t.bytes_done),
            format_bytes(t.size_bytes),
            t.error.as_deref().unwrap_or("no reason given")
        )));
    }
    if as_json {
        return Ok(pretty(&a.raw));
    }
    Ok(line(&t))
}

/// `copied 1.00 MiB from A (cpu) to B (cpu) in 0.4 ms, 2.40 GiB/s; transfer T`, then the
/// destination's id on a line of its own (the new allocation, for `--to`).
pub fn line(t: &TransferDto) -> String {
    let verb = if t.transfer_type == "move" { "moved" } else { "copied" };
    let end = |id: &str, device: &str, offset: u64| match offset {
        0 => format!("{id} ({device})"),
        o => format!("{id} ({device}) at offset {o}"),
    };
    let span = format!(
        "{} from {} to {}",
        format_bytes(t.size_bytes),
        end(&t.source_allocation_id, &t.source_device_id, t.source_offset),
        end(&t.destination_allocation_id, &t.destination_device_id, t.destination_offset),
    );
    if t.status == "running" {
        return format!(
            "transfer {} runs in the background: {span}, {} done; follow it with `memwarden transfer-status {} --wait`\n{}\n",
            t.transfer_id,
            format_bytes(t.bytes_done),
            t.transfer_id,
            t.destination_allocation_id,
        );
    }
    format!(
        "{verb} {span} in {:.1} ms, {}; transfer {}\n{}\n",
        t.duration_ms,
        rate(t.bytes_per_second),
        t.transfer_id,
        t.destination_allocation_id,
    )
}

/// How often a background transfer's status is read.
const POLL: Duration = Duration::from_millis(100);

/// Reads a running transfer's status until it is no longer running, drawing its progress.
pub fn follow(client: &Client, first: TransferDto) -> Result<Answer<TransferDto>, CliError> {
    let short: String = first.transfer_id.chars().take(8).collect();
    let bar = progress_bar(Some(first.size_bytes), &format!("{} {short}", first.transfer_type));
    bar.set_position(first.bytes_done);
    loop {
        std::thread::sleep(POLL);
        let a = match client.get::<TransferDto>(&status_path(&first.transfer_id)) {
            Ok(a) => a,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        bar.set_position(a.data.bytes_done);
        if a.data.status != "running" {
            if a.data.status == "completed" {
                bar.set_style(done_style());
                bar.finish_with_message(format!(
                    "{} in {:.2} s, {}",
                    format_bytes(a.data.bytes_done),
                    a.data.duration_ms / 1000.0,
                    rate(a.data.bytes_per_second)
                ));
            } else {
                bar.abandon_with_message(a.data.status.clone());
            }
            return Ok(a);
        }
    }
}

/// A byte progress bar on stderr, drawn only when stdout is a terminal (so that a script that
/// reads the answer sees no bar); `None`: the total is not known yet (an empty bar).
pub fn progress_bar(total: Option<u64>, label: &str) -> ProgressBar {
    let target =
        if std::io::stdout().is_terminal() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
    let bar = ProgressBar::with_draw_target(total, target);
    let style = ProgressStyle::with_template(
        "{prefix} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}, ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("#>.");
    bar.set_style(style);
    bar.set_prefix(label.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The bar once done: full, with the total, time and rate.
pub fn done_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} [{wide_bar}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("#>.")
}
