//! The memwarden worker protocol (docs/PROTOCOL.md): JSON lines between the daemon and the
//! Python processes that hold models (supervised workers on stdio, attached clients on a Unix
//! socket). This crate is the transport-free codec, in the manner of lsp-server's `msg.rs`:
//! [`decode`] / [`encode`] work on one line, [`read_message`] / [`write_message`] on any
//! `BufRead` / `Write`; stdio and sockets live in the daemon.
//!
//! One line is one JSON object. Its kind is decided by its keys, in this order:
//! `"type": "hello"` → [`Hello`]; `"event"` → [`Notification`]; `"action"` → [`Request`];
//! `"success"` → [`Reply`]. Unknown fields are ignored (so a newer peer can add fields within
//! one protocol version); unknown actions and events are errors with stable codes.
#![deny(unsafe_code, clippy::unwrap_used)]

pub mod api;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, Write};
use time::OffsetDateTime;

mod typed;
mod weights;
pub use weights::*;
mod memory;
pub use memory::*;
mod data;
pub use data::*;
use memwarden_core::units::MIB;
pub use typed::ActionData;
/// `ModelInfo::validate` and the [`ModelInfoError`](validation::ModelInfoError) it returns.
pub mod validation;

/// The protocol version this crate speaks. A peer whose `hello` names another is refused.
pub const PROTOCOL_VERSION: u32 = 2;

/// The versions a peer may name in its hello: version 1 peers keep working, without the
/// requests and descriptors of version 2.
pub const SUPPORTED_VERSIONS: [u32; 2] = [1, 2];

/// Most descriptors one line may carry.
pub const MAX_FDS_PER_LINE: u32 = 16;

/// Longest accepted line (a `getModelInfo` reply of thousands of models fits easily).
pub const MAX_LINE_BYTES: usize = (4 * MIB) as usize;

/// Stable error codes, in replies and in decode errors.
pub mod codes {
    /// Not JSON, not an object, or no recognisable kind.
    pub const MALFORMED_MESSAGE: &str = "MALFORMED_MESSAGE";
    pub const UNKNOWN_ACTION: &str = "UNKNOWN_ACTION";
    pub const UNKNOWN_EVENT: &str = "UNKNOWN_EVENT";
    /// The kind is known, but a field is missing or has the wrong type.
    pub const INVALID_DATA: &str = "INVALID_DATA";
    pub const UNSUPPORTED_VERSION: &str = "UNSUPPORTED_VERSION";
    pub const LINE_TOO_LONG: &str = "LINE_TOO_LONG";
    pub const MODEL_NOT_FOUND: &str = "MODEL_NOT_FOUND";
    /// No held model is in the named group (a diffusers pipeline's components).
    pub const GROUP_NOT_FOUND: &str = "GROUP_NOT_FOUND";
    pub const FILE_NOT_FOUND: &str = "FILE_NOT_FOUND";
    pub const LOAD_FAILED: &str = "LOAD_FAILED";
    pub const DEVICE_UNAVAILABLE: &str = "DEVICE_UNAVAILABLE";
    pub const NOT_SUPPORTED: &str = "NOT_SUPPORTED";
    pub const TIMEOUT: &str = "TIMEOUT";
    pub const INTERNAL: &str = "INTERNAL";
    /// A holder's `use()` stayed open past the bound: nothing was unmapped.
    pub const IN_USE: &str = "IN_USE";
    /// The peer's user and group (SO_PEERCRED) are not on the socket's allow-list.
    pub const PERMISSION_DENIED: &str = "PERMISSION_DENIED";
    /// A truncated or lying safetensors header: nothing was allocated.
    pub const INVALID_MODEL_FILE: &str = "INVALID_MODEL_FILE";
    /// The file's size, mtime or content hash differs from what was loaded.
    pub const FILE_CHANGED: &str = "FILE_CHANGED";
    pub const INSUFFICIENT_MEMORY: &str = "INSUFFICIENT_MEMORY";
    /// A device id that names no device of this host (`tpu:7`, `cuda:5` on a host with one GPU).
    pub const DEVICE_NOT_FOUND: &str = "DEVICE_NOT_FOUND";
    /// A device id whose backend is not available on this host (`cuda:0` without a GPU).
    pub const BACKEND_UNAVAILABLE: &str = "BACKEND_UNAVAILABLE";
}

/// One protocol line.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    Request(Request),
    Reply(Reply),
    Notification(Notification),
}

/// The first line a worker or client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    pub protocol_version: u32,
    pub worker_id: String,
    pub pid: u32,
    #[serde(default)]
    pub role: Role,
    /// Framework name → version (`null` when not installed): python, numpy, torch, safetensors.
    #[serde(default)]
    pub frameworks: BTreeMap<String, Option<String>>,
    /// Devices the peer can place models on (`cpu`, `cuda:0`, …).
    #[serde(default)]
    pub devices: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// Started and supervised by the daemon (`python -m memwarden.worker`).
    #[default]
    Worker,
    /// An inference process that attached through the socket with `memwarden.client`.
    Client,
}

/// What the daemon asks a worker or client to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    Ping,
    GetModelInfo,
    LoadModel,
    UnloadModel,
    OffloadModel,
    TrimCache,
    OptimizeMemory,
    Shutdown,
    // Version 2, peer → daemon.
    Register,
    LoadWeights,
    ReleaseWeights,
    ResumeWeights,
    /// Memory owned by the peer's connection: freed when it closes.
    Allocate,
    Free,
    /// What another process needs to map an allocation; Vulkan memory's opaque fd travels
    /// with the reply.
    Export,
    // Version 2, daemon → peer.
    UnmapWeights,
    RemapWeights,
}

impl Action {
    pub const ALL: [Action; 17] = [
        Action::Ping,
        Action::GetModelInfo,
        Action::LoadModel,
        Action::UnloadModel,
        Action::OffloadModel,
        Action::TrimCache,
        Action::OptimizeMemory,
        Action::Shutdown,
        Action::Register,
        Action::LoadWeights,
        Action::ReleaseWeights,
        Action::ResumeWeights,
        Action::Allocate,
        Action::Free,
        Action::Export,
        Action::UnmapWeights,
        Action::RemapWeights,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::Ping => "ping",
            Action::GetModelInfo => "getModelInfo",
            Action::LoadModel => "loadModel",
            Action::UnloadModel => "unloadModel",
            Action::OffloadModel => "offloadModel",
            Action::TrimCache => "trimCache",
            Action::OptimizeMemory => "optimizeMemory",
            Action::Shutdown => "shutdown",
            Action::Register => "register",
            Action::LoadWeights => "loadWeights",
            Action::ReleaseWeights => "releaseWeights",
            Action::ResumeWeights => "resumeWeights",
            Action::Allocate => "allocate",
            Action::Free => "free",
            Action::Export => "export",
            Action::UnmapWeights => "unmapWeights",
            Action::RemapWeights => "remapWeights",
        }
    }

    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Safe to send twice: the supervisor retries these once after a timeout.
    pub fn is_idempotent(self) -> bool {
        matches!(self, Action::Ping | Action::GetModelInfo | Action::TrimCache)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub request_id: String,
    pub action: Action,
    /// The action's arguments; [`Request::data_as`] checks them against the typed structs below.
    pub data: Value,
    /// File descriptors that travel with this line (version 2, Unix sockets only).
    pub fds: u32,
}

impl Request {
    pub fn new(request_id: impl Into<String>, action: Action, data: impl Serialize) -> Request {
        Request {
            request_id: request_id.into(),
            action,
            data: serde_json::to_value(data).unwrap_or(Value::Object(Map::new())),
            fds: 0,
        }
    }

    pub fn data_as<T: for<'de> Deserialize<'de>>(&self) -> Result<T, DecodeError> {
        serde_json::from_value(self.data.clone()).map_err(|e| DecodeError {
            code: codes::INVALID_DATA,
            message: format!("{} data: {e}", self.action),
            request_id: Some(self.request_id.clone()),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub request_id: String,
    pub success: bool,
    pub data: Value,
    pub error: Option<ErrorInfo>,
    /// File descriptors that travel with this line (version 2, Unix sockets only).
    pub fds: u32,
}

impl Reply {
    pub fn ok(request_id: impl Into<String>, data: impl Serialize) -> Reply {
        Reply {
            request_id: request_id.into(),
            success: true,
            data: serde_json::to_value(data).unwrap_or(Value::Null),
            error: None,
            fds: 0,
        }
    }

    pub fn err(request_id: impl Into<String>, code: &str, message: impl Into<String>) -> Reply {
        Reply {
            request_id: request_id.into(),
            success: false,
            data: Value::Null,
            error: Some(ErrorInfo { code: code.to_string(), message: message.into() }),
            fds: 0,
        }
    }

    pub fn data_as<T: for<'de> Deserialize<'de>>(&self) -> Result<T, DecodeError> {
        serde_json::from_value(self.data.clone()).map_err(|e| DecodeError {
            code: codes::INVALID_DATA,
            message: format!("reply data: {e}"),
            request_id: Some(self.request_id.clone()),
        })
    }
}

/// Unsolicited lines: worker → daemon, except `error` (daemon → peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Event {
    /// `data` is a [`ModelInfo`].
    ModelLoaded,
    /// `data` is a [`ModelUnloaded`].
    ModelUnloaded,
    /// `data` is a [`MemoryReport`].
    MemoryReport,
    /// `data` is a [`ModelRef`]: a holder's `use()` of daemon-held weights ended (version 2).
    WeightsUsed,
    /// `data` is a [`ModelRef`]: asked to unmap with `confirmEarly`, the holder has no `use()`
    /// open and lets none start; it unmaps next and then replies.
    WeightsQuiesced,
    /// Daemon → peer: `data` is an [`ErrorNotice`]: a notification of the peer's was refused
    /// (a version 1 peer's `modelLoaded` on an unknown device). It has no reply to carry the error.
    Error,
}

impl Event {
    pub fn name(self) -> &'static str {
        match self {
            Event::ModelLoaded => "modelLoaded",
            Event::ModelUnloaded => "modelUnloaded",
            Event::MemoryReport => "memoryReport",
            Event::WeightsUsed => "weightsUsed",
            Event::WeightsQuiesced => "weightsQuiesced",
            Event::Error => "error",
        }
    }

    fn from_name(name: &str) -> Option<Event> {
        [
            Event::ModelLoaded,
            Event::ModelUnloaded,
            Event::MemoryReport,
            Event::WeightsUsed,
            Event::WeightsQuiesced,
            Event::Error,
        ]
        .into_iter()
        .find(|e| e.name() == name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub event: Event,
    pub data: Value,
}

impl Notification {
    pub fn data_as<T: for<'de> Deserialize<'de>>(&self) -> Result<T, DecodeError> {
        serde_json::from_value(self.data.clone()).map_err(|e| DecodeError {
            code: codes::INVALID_DATA,
            message: format!("{} data: {e}", self.event.name()),
            request_id: None,
        })
    }
}

// ---- the codec ----

/// A line that could not be understood. `request_id` is set when the line was a request whose
/// id could be read, so the receiver can answer it with an error reply.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DecodeError {
    pub code: &'static str,
    pub message: String,
    pub request_id: Option<String>,
}

impl DecodeError {
    fn new(code: &'static str, message: impl Into<String>) -> DecodeError {
        DecodeError { code, message: message.into(), request_id: None }
    }

    /// The error reply to send back, when the line was a request.
    pub fn reply(&self) -> Option<Reply> {
        self.request_id.as_ref().map(|id| Reply::err(id.clone(), self.code, self.message.clone()))
    }
}

fn take_string(obj: &Map<String, Value>, key: &str) -> Result<String, DecodeError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(DecodeError::new(codes::INVALID_DATA, format!("`{key}` must be a string, got {other}"))),
        None => Err(DecodeError::new(codes::INVALID_DATA, format!("`{key}` is missing"))),
    }
}

/// `fds`: how many descriptors ride with the line (absent: none).
fn take_fds(obj: &Map<String, Value>) -> Result<u32, DecodeError> {
    match obj.get("fds") {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v.as_u64().filter(|n| *n <= MAX_FDS_PER_LINE as u64).map(|n| n as u32).ok_or_else(|| {
            DecodeError::new(codes::INVALID_DATA, format!("`fds` must be 0-{MAX_FDS_PER_LINE}, got {v}"))
        }),
    }
}

fn data_field(obj: &Map<String, Value>) -> Value {
    match obj.get("data") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v) => v.clone(),
    }
}

/// Decodes one line (without its newline).
pub fn decode(line: &str) -> Result<Message, DecodeError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(DecodeError::new(
            codes::LINE_TOO_LONG,
            format!("line of {} bytes exceeds {MAX_LINE_BYTES}", line.len()),
        ));
    }
    let value: Value = serde_json::from_str(line.trim_end_matches('\r'))
        .map_err(|e| DecodeError::new(codes::MALFORMED_MESSAGE, format!("not JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(DecodeError::new(codes::MALFORMED_MESSAGE, "a message must be a JSON object"));
    };
    if let Some(kind) = obj.get("type") {
        if kind == "hello" {
            let hello: Hello = serde_json::from_value(Value::Object(obj))
                .map_err(|e| DecodeError::new(codes::INVALID_DATA, format!("hello: {e}")))?;
            return Ok(Message::Hello(hello));
        }
        return Err(DecodeError::new(codes::MALFORMED_MESSAGE, format!("unknown message type {kind}")));
    }
    if obj.contains_key("event") {
        let name = take_string(&obj, "event")?;
        let event = Event::from_name(&name)
            .ok_or_else(|| DecodeError::new(codes::UNKNOWN_EVENT, format!("unknown event `{name}`")))?;
        return Ok(Message::Notification(Notification { event, data: data_field(&obj) }));
    }
    if obj.contains_key("action") {
        let request_id = take_string(&obj, "requestId")?;
        let with_id = |mut e: DecodeError| {
            e.request_id = Some(request_id.clone());
            e
        };
        let name = take_string(&obj, "action").map_err(with_id)?;
        let action = Action::from_name(&name)
            .ok_or_else(|| with_id(DecodeError::new(codes::UNKNOWN_ACTION, format!("unknown action `{name}`"))))?;
        let data = data_field(&obj);
        if !data.is_object() {
            return Err(with_id(DecodeError::new(codes::INVALID_DATA, "`data` must be an object")));
        }
        let fds = take_fds(&obj).map_err(with_id)?;
        return Ok(Message::Request(Request { request_id, action, data, fds }));
    }
    if let Some(success) = obj.get("success") {
        let request_id = take_string(&obj, "requestId")?;
        let Some(success) = success.as_bool() else {
            return Err(DecodeError::new(codes::INVALID_DATA, "`success` must be true or false"));
        };
        let error = match obj.get("error") {
            None | Some(Value::Null) => None,
            Some(e) => Some(
                serde_json::from_value::<ErrorInfo>(e.clone())
                    .map_err(|err| DecodeError::new(codes::INVALID_DATA, format!("`error`: {err}")))?,
            ),
        };
        if !success && error.is_none() {
            return Err(DecodeError::new(codes::INVALID_DATA, "a failed reply must carry `error`"));
        }
        let data = obj.get("data").cloned().unwrap_or(Value::Null);
        let fds = take_fds(&obj)?;
        return Ok(Message::Reply(Reply { request_id, success, data, error, fds }));
    }
    Err(DecodeError::new(codes::MALFORMED_MESSAGE, "a message needs `type: hello`, `event`, `action` or `success`"))
}

/// Encodes one message as a single line without the trailing newline.
pub fn encode(message: &Message) -> String {
    let value = match message {
        Message::Hello(h) => {
            let mut v = serde_json::to_value(h).unwrap_or(Value::Null);
            if let Value::Object(obj) = &mut v {
                obj.insert("type".into(), Value::String("hello".into()));
            }
            v
        }
        Message::Request(r) => {
            with_fds(serde_json::json!({ "requestId": r.request_id, "action": r.action.name(), "data": r.data }), r.fds)
        }
        Message::Reply(r) => with_fds(
            serde_json::json!({ "requestId": r.request_id, "success": r.success, "data": r.data, "error": r.error }),
            r.fds,
        ),
        Message::Notification(n) => serde_json::json!({ "event": n.event.name(), "data": n.data }),
    };
    // serde_json escapes control characters inside strings, so the output is one line.
    value.to_string()
}

fn with_fds(mut v: Value, fds: u32) -> Value {
    if fds > 0 {
        if let Value::Object(obj) = &mut v {
            obj.insert("fds".into(), fds.into());
        }
    }
    v
}

/// Reads the next message. `Ok(None)` at end of input; an undecodable line is
/// `Ok(Some(Err(..)))` so the reader can answer it and go on. Blank lines are skipped.
pub fn read_message(reader: &mut impl BufRead) -> io::Result<Option<Result<Message, DecodeError>>> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let trimmed = line.trim_end_matches(['\n', '\r']);
        if trimmed.trim().is_empty() {
            continue;
        }
        return Ok(Some(decode(trimmed)));
    }
}

/// Writes one message and its newline, then flushes.
pub fn write_message(writer: &mut impl Write, message: &Message) -> io::Result<()> {
    let mut line = encode(message);
    line.push('\n');
    writer.write_all(line.as_bytes())?;
    writer.flush()
}

/// The handshake's checks on a peer's `hello`.
pub fn check_hello(hello: &Hello) -> Result<(), DecodeError> {
    if !SUPPORTED_VERSIONS.contains(&hello.protocol_version) {
        return Err(DecodeError::new(
            codes::UNSUPPORTED_VERSION,
            format!(
                "protocol version {} is not supported (this daemon speaks {SUPPORTED_VERSIONS:?})",
                hello.protocol_version
            ),
        ));
    }
    if hello.worker_id.is_empty() || hello.worker_id.len() > 128 {
        return Err(DecodeError::new(codes::INVALID_DATA, "workerId must be 1-128 characters"));
    }
    Ok(())
}

/// `now` in the protocol's timestamp form (RFC 3339, UTC).
pub fn timestamp(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests;
