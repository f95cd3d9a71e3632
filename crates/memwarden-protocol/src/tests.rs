use super::*;
use crate::validation::ModelInfoError;
use std::path::PathBuf;

fn cases() -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/protocol/cases.json");
    let text = std::fs::read_to_string(&path).expect("fixtures/protocol/cases.json");
    serde_json::from_str(&text).expect("cases.json is JSON")
}

fn message_json(m: &Message) -> Value {
    serde_json::from_str(&encode(m)).expect("encode gives JSON")
}

fn typed_ok(data_type: &str, data: &Value) -> Result<(), String> {
    let d = data.clone();
    let r = match data_type {
        "GetModelInfo" => serde_json::from_value::<GetModelInfo>(d).map(|_| ()),
        "LoadModel" => serde_json::from_value::<LoadModel>(d).map(|_| ()),
        "UnloadModel" => serde_json::from_value::<UnloadModel>(d).map(|_| ()),
        "OffloadModel" => serde_json::from_value::<OffloadModel>(d).map(|_| ()),
        "TrimCache" => serde_json::from_value::<TrimCache>(d).map(|_| ()),
        "OptimizeMemory" => serde_json::from_value::<OptimizeMemory>(d).map(|_| ()),
        "ModelInfo" => serde_json::from_value::<ModelInfo>(d).map(|m| assert_eq!(m.validate(), Ok(()))),
        "ModelUnloaded" => serde_json::from_value::<ModelUnloaded>(d).map(|_| ()),
        "MemoryReport" => serde_json::from_value::<MemoryReport>(d).map(|_| ()),
        "LoadWeights" => serde_json::from_value::<LoadWeights>(d).map(|_| ()),
        "WeightsGrant" => serde_json::from_value::<WeightsGrant>(d).map(|_| ()),
        "ModelRef" => serde_json::from_value::<ModelRef>(d).map(|_| ()),
        "UnmapWeights" => serde_json::from_value::<UnmapWeights>(d).map(|_| ()),
        "PeerAllocate" => serde_json::from_value::<PeerAllocate>(d).map(|_| ()),
        "PeerFree" => serde_json::from_value::<PeerFree>(d).map(|_| ()),
        "PeerExport" => serde_json::from_value::<PeerExport>(d).map(|_| ()),
        other => panic!("unknown dataType {other} in cases.json"),
    };
    r.map_err(|e| e.to_string())
}

#[test]
fn golden_cases_decode_as_specified() {
    let cases = cases();
    assert!(cases.len() >= 30, "the golden set shrank");
    for case in &cases {
        let name = case["name"].as_str().expect("name");
        let line = case["line"].as_str().expect("line");
        let expect = case["expect"].as_str().expect("expect");
        let decoded = decode(line);
        if expect == "error" {
            let err = decoded.expect_err(name);
            assert_eq!(err.code, case["code"].as_str().expect("code"), "{name}: {err}");
            assert_eq!(err.request_id.as_deref(), case["requestId"].as_str(), "{name}: request id of the error");
            // An error that names a request turns into an error reply for it.
            assert_eq!(err.reply().is_some(), case.get("requestId").is_some(), "{name}");
            continue;
        }
        let msg = decoded.unwrap_or_else(|e| panic!("{name}: {e}"));
        let kind = match &msg {
            Message::Hello(_) => "hello",
            Message::Request(_) => "request",
            Message::Reply(_) => "reply",
            Message::Notification(_) => "notification",
        };
        assert_eq!(kind, expect, "{name}");
        // Fields named by the case appear with those values in the re-encoded message.
        let json = message_json(&msg);
        if let Some(Value::Object(fields)) = case.get("fields") {
            for (k, v) in fields {
                assert_eq!(&json[k], v, "{name}: field {k}");
            }
        }
        // Encoding then decoding gives the same message back.
        assert_eq!(decode(&encode(&msg)).as_ref(), Ok(&msg), "{name}: round trip");
        if let Some(code) = case["errorCode"].as_str() {
            let Message::Reply(r) = &msg else { panic!("{name}: errorCode on a non-reply") };
            assert_eq!(r.error.as_ref().map(|e| e.code.as_str()), Some(code), "{name}");
        }
        if let Some(code) = case["handshake"].as_str() {
            let Message::Hello(h) = &msg else { panic!("{name}: handshake on a non-hello") };
            assert_eq!(check_hello(h).map_err(|e| e.code), Err(code), "{name}");
        } else if let Message::Hello(h) = &msg {
            assert_eq!(check_hello(h), Ok(()), "{name}");
        }
        if let Some(data_type) = case["dataType"].as_str() {
            let data = match &msg {
                Message::Request(r) => &r.data,
                Message::Reply(r) => &r.data,
                Message::Notification(n) => &n.data,
                Message::Hello(_) => panic!("{name}: dataType on hello"),
            };
            let want_error = case["dataError"].as_bool().unwrap_or(false);
            assert_eq!(
                typed_ok(data_type, data).is_err(),
                want_error,
                "{name}: typed data {:?}",
                typed_ok(data_type, data)
            );
        }
    }
}

#[test]
fn reader_skips_blank_lines_reports_bad_ones_and_continues() {
    let input = "\n{\"requestId\":\"a\",\"action\":\"ping\"}\nnot json\n\n{\"event\":\"modelUnloaded\",\"data\":{\"modelId\":\"x\"}}\n";
    let mut reader = std::io::Cursor::new(input.as_bytes());
    let first = read_message(&mut reader).expect("io").expect("a line").expect("valid");
    assert!(matches!(first, Message::Request(ref r) if r.action == Action::Ping && r.request_id == "a"));
    let second = read_message(&mut reader).expect("io").expect("a line");
    assert_eq!(second.map_err(|e| e.code), Err(codes::MALFORMED_MESSAGE));
    let third = read_message(&mut reader).expect("io").expect("a line").expect("valid");
    assert!(matches!(third, Message::Notification(ref n) if n.event == Event::ModelUnloaded));
    assert!(read_message(&mut reader).expect("io").is_none(), "end of input");
}

#[test]
fn written_messages_are_single_lines_even_with_newlines_in_strings() {
    let reply = Reply::err("r\n1", codes::LOAD_FAILED, "line one\nline two");
    let mut out = Vec::new();
    write_message(&mut out, &Message::Reply(reply.clone())).expect("write");
    let text = String::from_utf8(out).expect("utf8");
    assert_eq!(text.matches('\n').count(), 1, "{text}");
    assert!(text.ends_with('\n'));
    assert_eq!(decode(text.trim_end()), Ok(Message::Reply(reply)));
}

#[test]
fn overlong_lines_are_refused_without_parsing() {
    let line = format!("{{\"requestId\":\"x\",\"action\":\"ping\",\"pad\":\"{}\"}}", "a".repeat(MAX_LINE_BYTES));
    assert_eq!(decode(&line).map_err(|e| e.code), Err(codes::LINE_TOO_LONG));
}

#[test]
fn actions_round_trip_by_name_and_only_reads_are_idempotent() {
    for a in Action::ALL {
        assert_eq!(Action::from_name(a.name()), Some(a));
        assert_eq!(serde_json::to_value(a).expect("ser"), Value::String(a.name().into()));
    }
    assert!(Action::Ping.is_idempotent() && Action::GetModelInfo.is_idempotent());
    assert!(!Action::LoadModel.is_idempotent() && !Action::UnloadModel.is_idempotent());
    assert!(!Action::Shutdown.is_idempotent() && !Action::OptimizeMemory.is_idempotent());
}

#[test]
fn model_info_validate_catches_inconsistent_sizes() {
    let now = OffsetDateTime::UNIX_EPOCH;
    let mut m = ModelInfo {
        model_id: "m".into(),
        model_name: "m".into(),
        device_id: "cpu".into(),
        size_bytes: 10,
        bytes_by_device: [("cpu".to_string(), 10)].into(),
        loaded_at: now,
        last_access: now,
        load_time_ms: 0.0,
        priority: 50,
        pinned: false,
        path: None,
        tensor_count: 1,
        backend: None,
        reserved_bytes: None,
    };
    assert_eq!(m.validate(), Ok(()));
    m.size_bytes = 11;
    let e = m.validate().expect_err("sum differs from size");
    assert_eq!(e, ModelInfoError::BytesByDeviceSum { model_id: m.model_id.clone(), sum_bytes: 10, size_bytes: 11 });
    assert!(e.to_string().contains("bytesByDevice sums to 10, sizeBytes is 11"), "{e}");
    m.size_bytes = 10;
    m.priority = 101;
    assert_eq!(m.validate(), Err(ModelInfoError::PriorityAbove100 { model_id: m.model_id.clone(), priority: 101 }));
    m.model_id.clear();
    assert_eq!(m.validate(), Err(ModelInfoError::EmptyModelId));
}
