//! `data read` and `data write`: an allocation's bytes to a file or stdout, and from a file or
//! stdin (`GET`/`PUT /api/memory/allocations/{id}/data`), in chunks the routes take.

use super::http::{path_segment, CliError, Client};
use super::render::pretty;
use base64::Engine as _;
use memwarden_core::units::MIB;
use memwarden_core::units::{format_bytes, parse_size};
use memwarden_protocol::api::{AllocationDto, DataDto, WrittenDto};
use serde_json::json;
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::PathBuf;

/// Bytes per request (the routes take up to 64 MiB; base64 makes a read a third larger).
const CHUNK: u64 = 16 * MIB;

#[derive(clap::Subcommand)]
pub enum DataCommand {
    /// Read an allocation's bytes (all of them by default) to --output or stdout.
    Read {
        id: String,
        /// Bytes into the allocation to start at (default 0).
        #[arg(long)]
        offset: Option<String>,
        /// How much (default: the rest of the allocation).
        #[arg(long)]
        length: Option<String>,
        /// File to write (default stdout, which must then not be a terminal).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Write bytes from --input or stdin into an allocation.
    Write {
        id: String,
        /// Bytes into the allocation to write at (default 0).
        #[arg(long)]
        offset: Option<String>,
        /// File to read (default stdin).
        #[arg(long, short)]
        input: Option<PathBuf>,
    },
}

fn size(v: &Option<String>, flag: &str) -> Result<Option<u64>, CliError> {
    v.as_deref().map(|s| parse_size(s).map_err(|e| CliError(format!("--{flag}: {e}")))).transpose()
}

fn data_path(id: &str) -> String {
    format!("/api/memory/allocations/{}/data", path_segment(id))
}

pub fn data(client: &Client, command: &DataCommand, as_json: bool) -> Result<String, CliError> {
    match command {
        DataCommand::Read { id, offset, length, output } => {
            read(client, id, size(offset, "offset")?.unwrap_or(0), size(length, "length")?, output.as_ref(), as_json)
        }
        DataCommand::Write { id, offset, input } => {
            write(client, id, size(offset, "offset")?.unwrap_or(0), input.as_ref(), as_json)
        }
    }
}

/// Reads `length` bytes (default: to the allocation's end) from `offset`. The bytes go to
/// `output` or stdout; with `--json`, the API's answer instead: one `DataDto` for the whole
/// range (its chunks joined), on stdout or in `output`.
fn read(
    client: &Client,
    id: &str,
    offset: u64,
    length: Option<u64>,
    output: Option<&PathBuf>,
    as_json: bool,
) -> Result<String, CliError> {
    let length = match length {
        Some(n) => n,
        None => {
            let a = client.get::<AllocationDto>(&format!("/api/memory/allocation/{}", path_segment(id)))?.data;
            a.size_bytes.checked_sub(offset).ok_or_else(|| {
                CliError(format!("--offset: {offset} is past the end of {id} ({} bytes)", a.size_bytes))
            })?
        }
    };
    let to_stdout = output.is_none_or(|p| p.as_os_str() == "-");
    if to_stdout && !as_json && std::io::stdout().is_terminal() {
        return Err(CliError(format!(
            "not writing {} of raw bytes to a terminal: give --output FILE, redirect stdout, or use --json",
            format_bytes(length)
        )));
    }
    let mut sink: Box<dyn std::io::Write> = match output {
        Some(p) if !to_stdout => {
            Box::new(std::fs::File::create(p).map_err(|e| CliError(format!("cannot create {}: {e}", p.display())))?)
        }
        _ => Box::new(std::io::stdout().lock()),
    };
    let io = |e: std::io::Error| CliError(format!("cannot write the bytes: {e}"));
    let mut all = Vec::new();
    let mut done = 0u64;
    // At least one request, also for no bytes: the daemon checks the offset.
    loop {
        let n = CHUNK.min(length - done);
        let a = client.get::<DataDto>(&format!("{}?offset={}&length={n}", data_path(id), offset + done))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&a.data.data_base64)
            .map_err(|e| CliError(format!("the daemon's base64 does not decode: {e}")))?;
        if as_json {
            all.extend_from_slice(&bytes);
        } else {
            sink.write_all(&bytes).map_err(io)?;
        }
        done += n;
        if done >= length {
            break;
        }
    }
    if as_json {
        let v = json!({
            "allocationId": id,
            "offset": offset,
            "length": length,
            "dataBase64": base64::engine::general_purpose::STANDARD.encode(&all),
        });
        sink.write_all(pretty(&v).as_bytes()).map_err(io)?;
    }
    sink.flush().map_err(io)?;
    match output {
        Some(p) if !to_stdout => Ok(format!(
            "read {} ({length} bytes) of {id} at offset {offset} into {}\n",
            format_bytes(length),
            p.display()
        )),
        _ => Ok(String::new()),
    }
}

/// Writes `input` (or stdin) into the allocation from `offset`, a chunk per request.
fn write(client: &Client, id: &str, offset: u64, input: Option<&PathBuf>, as_json: bool) -> Result<String, CliError> {
    let mut source: Box<dyn std::io::Read> = match input {
        Some(p) if p.as_os_str() != "-" => {
            Box::new(std::fs::File::open(p).map_err(|e| CliError(format!("cannot open {}: {e}", p.display())))?)
        }
        _ => Box::new(std::io::stdin().lock()),
    };
    let mut buf = vec![0u8; CHUNK as usize];
    let mut written = 0u64;
    loop {
        // Fill a whole chunk (pipes give less per read).
        let mut filled = 0;
        while filled < buf.len() {
            match source.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CliError(format!("cannot read the input: {e}"))),
            }
        }
        if filled == 0 {
            break;
        }
        let path = format!("{}?offset={}", data_path(id), offset + written);
        written += client.put_bytes::<WrittenDto>(&path, &buf[..filled])?.data.bytes_written;
        if filled < buf.len() {
            break;
        }
    }
    if as_json {
        return Ok(pretty(&json!({ "allocationId": id, "offset": offset, "bytesWritten": written })));
    }
    Ok(format!("wrote {} ({written} bytes) into {id} at offset {offset}\n", format_bytes(written)))
}
