//! The HTTP client: requests to the daemon, the envelope unwrapped into typed `data` (the API's
//! own types from `memwarden_protocol::api`), and the event stream.

use memwarden_protocol::api::{ApiResponse, OptimizeOutcome, PressureEventDto};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde::Serialize;
use serde_json::Value;
use std::io::BufRead as _;
use std::time::Duration;

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

/// A response's `data`: typed, and as it came (what `--json` prints).
pub struct Answer<T> {
    pub data: T,
    pub raw: Value,
}

/// One event of `/api/memory/events`.
pub enum StreamEvent {
    /// A level change (`event: pressure`).
    Pressure(PressureEventDto),
    /// An optimizer run that did something (`event: optimization`).
    Optimization(OptimizeOutcome),
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        Client { base: base.trim_end_matches('/').to_string(), token, agent }
    }

    /// The daemon's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<Answer<T>, CliError> {
        self.call::<T, ()>("GET", path, None)
    }

    /// Sends a request and returns the envelope's `data` as `T`, or the envelope's error as a
    /// CliError.
    pub fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<Answer<T>, CliError> {
        self.send(method, path, body.map(Body::Json), None)
    }

    /// `GET path`, given up after `timeout` (for figures a command can do without).
    pub fn get_within<T: DeserializeOwned>(&self, path: &str, timeout: Duration) -> Result<Answer<T>, CliError> {
        self.send::<T, ()>("GET", path, None, Some(timeout))
    }

    /// `PUT path` with `bytes` as `application/octet-stream`.
    pub fn put_bytes<T: DeserializeOwned>(&self, path: &str, bytes: &[u8]) -> Result<Answer<T>, CliError> {
        self.send::<T, ()>("PUT", path, Some(Body::Bytes(bytes)), None)
    }

    fn send<T: DeserializeOwned, B: Serialize>(
        &self,
        method: &str,
        path: &str,
        body: Option<Body<'_, B>>,
        timeout: Option<Duration>,
    ) -> Result<Answer<T>, CliError> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let limit = |req: ureq::RequestBuilder<_>| match timeout {
            Some(t) => req.config().timeout_global(Some(t)).build(),
            None => req,
        };
        let result = match (method, body) {
            ("GET", _) => with_auth(limit(self.agent.get(&url)), &auth).call(),
            ("DELETE", _) => with_auth(self.agent.delete(&url), &auth).call(),
            (_, Some(Body::Bytes(b))) if method == "PUT" => {
                with_auth(self.agent.put(&url), &auth).content_type("application/octet-stream").send(b)
            }
            ("POST", Some(Body::Json(b))) => with_auth(self.agent.post(&url), &auth).send_json(b),
            ("PUT", Some(Body::Json(b))) => with_auth(self.agent.put(&url), &auth).send_json(b),
            ("POST", None) => with_auth(self.agent.post(&url), &auth).send_empty(),
            _ => return Err(CliError(format!("unsupported method {method}"))),
        };
        let mut response = result.map_err(|e| {
            CliError(format!("cannot reach memwarden at {}: {e} (is `memwarden serve` running?)", self.base))
        })?;
        let status = response.status();
        let envelope: ApiResponse<Value> = response
            .body_mut()
            .read_json()
            .map_err(|e| CliError(format!("{url} answered {status} without a JSON envelope: {e}")))?;
        if envelope.success {
            let raw = envelope.data.unwrap_or(Value::Null);
            let data = T::deserialize(&raw)
                .map_err(|e| CliError(format!("{url} answered {status} with unexpected data: {e}")))?;
            Ok(Answer { data, raw })
        } else {
            let (code, message) = match &envelope.error {
                Some(e) => (e.code.as_str(), e.message.as_str()),
                None => ("UNKNOWN", "no message"),
            };
            Err(CliError(format!("{code} ({}): {message}", status.as_u16())))
        }
    }

    /// Opens `/api/memory/events`: returns once the daemon has answered (the stream is then
    /// subscribed), with the events to read one by one.
    pub fn events(&self) -> Result<EventStream, CliError> {
        let url = format!("{}/api/memory/events", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let resp = with_auth(self.agent.get(&url), &auth)
            .call()
            .map_err(|e| CliError(format!("cannot reach memwarden at {}: {e}", self.base)))?;
        if !resp.status().is_success() {
            return Err(CliError(format!("{url} answered {}", resp.status())));
        }
        Ok(EventStream { lines: Box::new(std::io::BufReader::new(resp.into_body().into_reader()).lines()) })
    }

    /// Follows `/api/memory/events`, calling `on_event` with each event it knows, typed and as
    /// it came, until it returns false or the stream ends.
    pub fn follow_events(&self, mut on_event: impl FnMut(StreamEvent, &Value) -> bool) -> Result<(), CliError> {
        for item in self.events()? {
            let (name, raw) = item?;
            let event = match name.as_str() {
                "pressure" => PressureEventDto::deserialize(&raw).ok().map(StreamEvent::Pressure),
                "optimization" => OptimizeOutcome::deserialize(&raw).ok().map(StreamEvent::Optimization),
                _ => None,
            };
            if let Some(event) = event {
                if !on_event(event, &raw) {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// A request body.
enum Body<'a, B> {
    Json(&'a B),
    Bytes(&'a [u8]),
}

/// The events of `/api/memory/events` as they come: each its `event:` name and its `data` as
/// JSON. Ends with the stream.
pub struct EventStream {
    lines: Box<dyn Iterator<Item = std::io::Result<String>>>,
}

impl Iterator for EventStream {
    type Item = Result<(String, Value), CliError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut name = String::new();
        for line in self.lines.by_ref() {
            let line = match line {
                Ok(l) => l,
                Err(e) => return Some(Err(CliError(format!("event stream broke: {e}")))),
            };
            if let Some(n) = line.strip_prefix("event:") {
                name = n.trim().to_string();
            } else if let Some(data) = line.strip_prefix("data:") {
                // One data line per event (the daemon writes compact JSON).
                if let Ok(raw) = serde_json::from_str::<Value>(data.trim()) {
                    return Some(Ok((std::mem::take(&mut name), raw)));
                }
            } else if line.is_empty() {
                name.clear();
            }
        }
        None
    }
}

fn with_auth<B>(req: ureq::RequestBuilder<B>, auth: &Option<String>) -> ureq::RequestBuilder<B> {
    match auth {
        Some(a) => req.header("Authorization", a),
        None => req,
    }
}

/// An id as one URL path segment.
pub fn path_segment(s: &str) -> String {
    // Device ids and allocation ids are [a-z0-9:_-]; escape anything else rather than trust it.
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b':' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The path of `{route}/{device}` for one device or `{route}` for all; `route_one` overrides the
/// per-device prefix where the API spells it differently.
pub fn one_or_all(route: &str, route_one: Option<&str>, device: Option<&str>) -> String {
    match device {
        Some(d) => format!("{}/{}", route_one.unwrap_or(route), path_segment(d)),
        None => route.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(path_segment("cuda:0"), "cuda:0");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }
}
