"""The memwarden worker protocol (docs/PROTOCOL.md): one JSON object per line.

The kind of a line is decided by its keys, in this order: ``"type": "hello"`` → hello;
``"event"`` → notification; ``"action"`` → request; ``"success"`` → reply. Unknown fields are
ignored; unknown actions and events are errors with stable codes. A request or reply may say it
carries file descriptors with a top-level ``"fds": n`` (version 2; the transport passes them, see
``memwarden.endpoint``). This mirrors ``crates/memwarden-protocol`` exactly; both are tested
against ``fixtures/protocol/cases.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

from . import PROTOCOL_VERSION, SUPPORTED_VERSIONS
from .dtypes import DTYPE_BITS

MAX_LINE_BYTES = 4 << 20

MALFORMED_MESSAGE = "MALFORMED_MESSAGE"
UNKNOWN_ACTION = "UNKNOWN_ACTION"
UNKNOWN_EVENT = "UNKNOWN_EVENT"
INVALID_DATA = "INVALID_DATA"
UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
LINE_TOO_LONG = "LINE_TOO_LONG"
MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
FILE_NOT_FOUND = "FILE_NOT_FOUND"
LOAD_FAILED = "LOAD_FAILED"
DEVICE_UNAVAILABLE = "DEVICE_UNAVAILABLE"
NOT_SUPPORTED = "NOT_SUPPORTED"
TIMEOUT = "TIMEOUT"
INTERNAL = "INTERNAL"
# Added in version 2.
IN_USE = "IN_USE"
INVALID_MODEL_FILE = "INVALID_MODEL_FILE"
FILE_CHANGED = "FILE_CHANGED"
INSUFFICIENT_MEMORY = "INSUFFICIENT_MEMORY"
# A device id that names no device of the daemon's host, or one whose backend is not available there.
DEVICE_NOT_FOUND = "DEVICE_NOT_FOUND"
BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"

# Requests the daemon sends to a worker or client.
DAEMON_ACTIONS = (
    "ping",
    "getModelInfo",
    "loadModel",
    "unloadModel",
    "offloadModel",
    "trimCache",
    "optimizeMemory",
    "shutdown",
    "unmapWeights",
    "remapWeights",
)
# Requests a worker or client sends to the daemon (version 2); a peer answers them NOT_SUPPORTED.
PEER_ACTIONS = ("register", "loadWeights", "releaseWeights", "resumeWeights", "allocate", "free", "export")
ACTIONS = DAEMON_ACTIONS + PEER_ACTIONS
# `error` goes daemon → peer: a notification of the peer's was refused (data: code, message, modelId?).
EVENTS = ("modelLoaded", "modelUnloaded", "memoryReport", "weightsUsed", "weightsQuiesced", "error")


class ProtocolError(Exception):
    """A line or a request's data that could not be understood. ``request_id`` is set when the
    line was a request whose id could be read, so it can be answered with an error reply."""

    def __init__(self, code: str, message: str, request_id: Optional[str] = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass
class Message:
    kind: str  # hello | request | reply | notification
    body: Dict[str, Any] = field(default_factory=dict)

    @property
    def request_id(self) -> Optional[str]:
        return self.body.get("requestId")

    @property
    def action(self) -> Optional[str]:
        return self.body.get("action")

    @property
    def event(self) -> Optional[str]:
        return self.body.get("event")

    @property
    def data(self) -> Any:
        return self.body.get("data")

    @property
    def fds(self) -> int:
        """How many file descriptors the line says it carries (0 when it does not say)."""
        return self.body.get("fds", 0)


def _string(obj: dict, key: str, request_id: Optional[str] = None) -> str:
    if key not in obj:
        raise ProtocolError(INVALID_DATA, f"`{key}` is missing", request_id)
    v = obj[key]
    if not isinstance(v, str):
        raise ProtocolError(INVALID_DATA, f"`{key}` must be a string, got {json.dumps(v)}", request_id)
    return v


def _data(obj: dict) -> Any:
    d = obj.get("data")
    return {} if d is None else d


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_fds(obj: dict, request_id: Optional[str]) -> None:
    n = obj.get("fds", 0)
    if not (_int(n) and n >= 0):
        raise ProtocolError(INVALID_DATA, f"`fds` must be a non-negative integer, got {json.dumps(n)}", request_id)


def decode(line: str) -> Message:
    """Decodes one line (its newline may be present). Raises ProtocolError."""
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(LINE_TOO_LONG, f"line of {len(line)} bytes exceeds {MAX_LINE_BYTES}")
    try:
        obj = json.loads(line.rstrip("\r\n"))
    except ValueError as e:
        raise ProtocolError(MALFORMED_MESSAGE, f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(MALFORMED_MESSAGE, "a message must be a JSON object")
    if "type" in obj:
        if obj["type"] != "hello":
            raise ProtocolError(MALFORMED_MESSAGE, f"unknown message type {json.dumps(obj['type'])}")
        if not _int(obj.get("protocolVersion")):
            raise ProtocolError(INVALID_DATA, "hello: `protocolVersion` must be an integer")
        _string(obj, "workerId")
        if not _int(obj.get("pid")):
            raise ProtocolError(INVALID_DATA, "hello: `pid` must be an integer")
        if obj.get("role", "worker") not in ("worker", "client"):
            raise ProtocolError(INVALID_DATA, "hello: `role` must be worker or client")
        return Message("hello", obj)
    if "event" in obj:
        name = _string(obj, "event")
        if name not in EVENTS:
            raise ProtocolError(UNKNOWN_EVENT, f"unknown event `{name}`")
        return Message("notification", dict(obj, data=_data(obj)))
    if "action" in obj:
        rid = _string(obj, "requestId")
        name = _string(obj, "action", rid)
        if name not in ACTIONS:
            raise ProtocolError(UNKNOWN_ACTION, f"unknown action `{name}`", rid)
        data = _data(obj)
        if not isinstance(data, dict):
            raise ProtocolError(INVALID_DATA, "`data` must be an object", rid)
        _check_fds(obj, rid)
        return Message("request", dict(obj, data=data))
    if "success" in obj:
        _string(obj, "requestId")
        _check_fds(obj, None)
        if not isinstance(obj["success"], bool):
            raise ProtocolError(INVALID_DATA, "`success` must be true or false")
        err = obj.get("error")
        if err is not None and not (
            isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str)
        ):
            raise ProtocolError(INVALID_DATA, "`error` must be {code, message}")
        if not obj["success"] and err is None:
            raise ProtocolError(INVALID_DATA, "a failed reply must carry `error`")
        return Message("reply", obj)
    raise ProtocolError(MALFORMED_MESSAGE, "a message needs `type: hello`, `event`, `action` or `success`")


def check_hello(msg: Message) -> None:
    """Accepts a hello of any supported version (1 and 2) with a sane worker id."""
    if msg.body.get("protocolVersion") not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            UNSUPPORTED_VERSION,
            f"protocol version {msg.body.get('protocolVersion')} is not supported (this speaks {list(SUPPORTED_VERSIONS)})",
        )
    wid = msg.body.get("workerId", "")
    if not 0 < len(wid) <= 128:
        raise ProtocolError(INVALID_DATA, "workerId must be 1-128 characters")


def encode(body: Dict[str, Any]) -> str:
    """One line, no newline (json.dumps escapes control characters inside strings)."""
    return json.dumps(body, separators=(",", ":"))


def hello(worker_id: str, pid: int, role: str, frameworks: Dict[str, Optional[str]], devices: List[str]) -> dict:
    return {
        "type": "hello",
        "protocolVersion": PROTOCOL_VERSION,
        "workerId": worker_id,
        "pid": pid,
        "role": role,
        "frameworks": frameworks,
        "devices": devices,
    }


def _with_fds(body: dict, fds: int) -> dict:
    """`"fds"` is written only when the line carries descriptors (absent means 0)."""
    if fds:
        body["fds"] = fds
    return body


def request(request_id: str, action: str, data: Optional[dict] = None, fds: int = 0) -> dict:
    return _with_fds({"requestId": request_id, "action": action, "data": data or {}}, fds)


def ok(request_id: str, data: Any, fds: int = 0) -> dict:
    return _with_fds({"requestId": request_id, "success": True, "data": data, "error": None}, fds)


def error(request_id: str, code: str, message: str) -> dict:
    return {"requestId": request_id, "success": False, "data": None, "error": {"code": code, "message": message}}


def notification(event: str, data: Any) -> dict:
    return {"event": event, "data": data}


def timestamp(t: Optional[datetime] = None) -> str:
    """RFC 3339 UTC with milliseconds and a `Z`, as the Rust side writes and parses."""
    t = t or datetime.now(timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(s: str) -> datetime:
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    t = datetime.fromisoformat(s)
    if t.tzinfo is None:
        raise ValueError(f"timestamp {s!r} has no UTC offset")
    return t


# ---- typed checks of action data (the Rust side uses serde structs for the same) ----

_FIELDS = {
    # action or data type → {field: (required, check)}
    "GetModelInfo": {"deviceId": (False, str)},
    "LoadModel": {
        "path": (True, str),
        "name": (False, str),
        "deviceId": (False, str),
        "priority": (False, "u8"),
        "pinned": (False, bool),
        "modelId": (False, str),
    },
    "UnloadModel": {"modelId": (True, str)},
    "OffloadModel": {"modelId": (True, str), "target": (False, str)},
    "TrimCache": {"deviceId": (False, str)},
    "OptimizeMemory": {
        "deviceId": (True, str),
        "bytes": (True, "u64"),
        "deadlineMs": (False, "u64"),
        "excludeModels": (False, list),
    },
    "ModelUnloaded": {"modelId": (True, str), "freedBytes": (False, "u64")},
    "LoadWeights": {
        "path": (True, str),
        "deviceId": (False, str),
        "name": (False, str),
        "priority": (False, "percent"),
        "pinned": (False, bool),
        "keepAliveMs": (False, "u64"),
    },
    "ModelRef": {"modelId": (True, str)},
    "PeerAllocate": {
        "sizeBytes": (True, "u64"),
        "deviceId": (False, str),
        "memoryType": (False, str),
        "alignment": (False, "u64"),
        "purpose": (False, str),
        "owner": (False, str),
        "movable": (False, bool),
    },
    "PeerFree": {"allocationId": (True, str)},
    "PeerExport": {"allocationId": (True, str)},
    "UnmapWeights": {"modelId": (True, str), "timeoutMs": (True, "u64"), "final": (False, bool),
                     "confirmEarly": (False, bool)},
    "WeightsGrant": {
        "modelId": (True, str),
        "name": (True, str),
        "deviceId": (True, str),
        "handle": (True, "handle"),
        "allocationBytes": (True, "u64"),
        "dataBytes": (True, "u64"),
        "tensors": (True, "tensors"),
        "hash": (True, str),
        "shared": (True, bool),
        "access": (True, str),
        "pieces": (False, "pieces"),
    },
}

ACTION_DATA = {
    "getModelInfo": "GetModelInfo",
    "loadModel": "LoadModel",
    "unloadModel": "UnloadModel",
    "offloadModel": "OffloadModel",
    "trimCache": "TrimCache",
    "optimizeMemory": "OptimizeMemory",
    "register": "ModelInfo",
    "loadWeights": "LoadWeights",
    "releaseWeights": "ModelRef",
    "resumeWeights": "ModelRef",
    "allocate": "PeerAllocate",
    "free": "PeerFree",
    "export": "PeerExport",
    "unmapWeights": "UnmapWeights",
    "remapWeights": "WeightsGrant",
}

HANDLES = ("cudaVmm", "shm")  # how a WeightsGrant's descriptor is mapped


def _tensor_entry(t: Any) -> bool:
    """One entry of a WeightsGrant's `tensors`: {name, dtype, shape, offset, nbytes}."""
    return (
        isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and t.get("dtype") in DTYPE_BITS
        and isinstance(t.get("shape"), list)
        and all(_int(d) and d >= 0 for d in t["shape"])
        and _check(t.get("offset"), "u64") and t.get("offset") is not None
        and _check(t.get("nbytes"), "u64") and t.get("nbytes") is not None
    )


def _check(v: Any, check: Any) -> bool:
    if v is None:
        return True
    if check == "u8":
        return _int(v) and 0 <= v <= 255
    if check == "u64":
        return _int(v) and v >= 0
    if check == "percent":
        return _int(v) and 0 <= v <= 100
    if check == "handle":
        return v in HANDLES
    if check == "tensors":
        return isinstance(v, list) and all(_tensor_entry(t) for t in v)
    if check == "pieces":
        return isinstance(v, list) and all(
            isinstance(p, dict) and _int(p.get("offset")) and _int(p.get("bytes")) and p["offset"] >= 0 and p["bytes"] > 0
            for p in v
        )
    if check is str:
        return isinstance(v, str)
    return isinstance(v, check)


def check_data(data_type: str, data: Any, request_id: Optional[str] = None) -> dict:
    """Checks `data` against one of the protocol's data types; returns it or raises INVALID_DATA."""
    if data_type == "ModelInfo":
        return check_model_info(data, request_id)
    if data_type == "MemoryReport":
        if not isinstance(data, dict):
            raise ProtocolError(INVALID_DATA, "memoryReport data must be an object", request_id)
        for m in data.get("models", []):
            check_model_info(m, request_id)
        return data
    if not isinstance(data, dict):
        raise ProtocolError(INVALID_DATA, f"{data_type} data must be an object", request_id)
    for name, (required, check) in _FIELDS[data_type].items():
        if name not in data or data[name] is None:
            if required:
                raise ProtocolError(INVALID_DATA, f"{data_type} data: `{name}` is missing", request_id)
            continue
        if not _check(data[name], check):
            raise ProtocolError(
                INVALID_DATA, f"{data_type} data: `{name}` has the wrong type: {json.dumps(data[name])}", request_id
            )
    return data


def check_model_info(m: Any, request_id: Optional[str] = None) -> dict:
    if not isinstance(m, dict):
        raise ProtocolError(INVALID_DATA, "model info must be an object", request_id)
    for name in ("modelId", "modelName", "deviceId"):
        if not isinstance(m.get(name), str):
            raise ProtocolError(INVALID_DATA, f"model info: `{name}` must be a string", request_id)
    if not _check(m.get("sizeBytes"), "u64") or m.get("sizeBytes") is None:
        raise ProtocolError(INVALID_DATA, "model info: `sizeBytes` must be a non-negative integer", request_id)
    for name in ("loadedAt", "lastAccess"):
        try:
            parse_timestamp(m[name])
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(INVALID_DATA, f"model info: `{name}`: {e}", request_id) from None
    by_dev = m.get("bytesByDevice") or {}
    if by_dev and sum(by_dev.values()) != m["sizeBytes"]:
        raise ProtocolError(INVALID_DATA, "model info: bytesByDevice does not sum to sizeBytes", request_id)
    if not 0 <= m.get("priority", 50) <= 100:
        raise ProtocolError(INVALID_DATA, "model info: priority must be 0-100", request_id)
    return m
