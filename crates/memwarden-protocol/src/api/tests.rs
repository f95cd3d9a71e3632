use super::analytics::{ActionDto, RecommendationsDto};
use super::*;
use serde_json::{json, Value};

/// Deserializes `v` as `T` and serializes it back: the API's JSON survives the CLI's reading.
fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(v: Value) -> Value {
    let typed: T = serde_json::from_value(v).expect("deserializes");
    serde_json::to_value(&typed).expect("serializes")
}

#[test]
fn worker_state_names_match_the_json() {
    for s in [
        WorkerState::Starting,
        WorkerState::Ready,
        WorkerState::Unhealthy,
        WorkerState::Restarting,
        WorkerState::Stopped,
    ] {
        assert_eq!(serde_json::to_value(s).expect("json"), json!(s.as_str()));
    }
}

#[test]
fn envelopes_round_trip() {
    let ok = json!({"success": true, "isSuccess": true, "data": {"allocationId": "a", "deviceId": "cpu",
        "memoryType": "host", "freedBytes": 256}, "error": null, "message": null, "timestamp": "t",
        "correlationId": "c"});
    assert_eq!(round_trip::<ApiResponse<FreedDto>>(ok.clone()), ok);
    let error = json!({"code": "DEVICE_NOT_FOUND", "message": "m", "statusCode": 404});
    let err = json!({"success": false, "isSuccess": false, "data": null, "error": error, "message": "m",
        "timestamp": "t", "correlationId": "c"});
    assert_eq!(round_trip::<ApiResponse<FreedDto>>(err.clone()), err);
    assert_eq!(round_trip::<ErrorResponse>(err.clone()), err);
    let built = ErrorResponse::new(serde_json::from_value(error).expect("error"), "t".into(), "c".into());
    assert_eq!(serde_json::to_value(built).expect("json"), err, "message repeats the error's");
    assert_eq!(serde_json::to_value(ApiResponse::ok(1, "t".into(), "c".into())).expect("json")["isSuccess"], true);
}

#[test]
fn a_backends_own_status_fields_sit_beside_the_common_ones_and_come_back() {
    let mut status = json!({"deviceId": "cuda:0", "deviceType": "GPU", "name": "H200", "memoryType": "VRAM",
        "totalMemory": 8, "availableMemory": 4, "usedMemory": 4, "memoryUtilization": 0.5, "source": "s",
        "lastUpdated": "t", "reservedBytes": 0, "allocatedBytes": 0, "reservationBytes": 0, "pools": [],
        "fragmentation": 0.0, "uuid": "GPU-1", "pciBusId": "0", "computeCapability": "9.0",
        "memoryBandwidth": null, "reservedMemory": null, "processes": [], "healthy": true, "lastError": null});
    status["peerAccess"] = json!("cuda:1");
    let typed: DeviceStatusDto = serde_json::from_value(status.clone()).expect("deserializes");
    assert_eq!(typed.extra.get("peerAccess"), Some(&json!("cuda:1")));
    assert_eq!(typed.uuid.as_deref(), Some("GPU-1"), "a common field stays typed");
    assert_eq!(serde_json::to_value(&typed).expect("serializes"), status);
}

#[test]
fn flattened_pools_and_absent_can_allocate_round_trip() {
    let pool = json!({"memoryType": "host", "reservedBytes": 1, "allocatedBytes": 1, "freeInPoolBytes": 0,
        "largestFreeBlock": 0, "blockCount": 1, "allocationCount": 1, "freeRangeCount": 0, "fragmentation": 0.0,
        "blocks": [{"blockId": 0, "sizeBytes": 1, "dedicated": false, "address": "0x1",
            "ranges": [{"offset": 0, "sizeBytes": 1, "free": false, "allocationId": "a"}]}]});
    assert_eq!(round_trip::<PoolDumpDto>(pool.clone()), pool);
    let dumped: PoolDumpDto = serde_json::from_value(pool).expect("pool");
    assert_eq!(dumped.stats.block_count, 1);
}

#[test]
fn recommendations_keep_their_evidence_and_bodies() {
    let r = json!({"generatedAt": "t", "totalEstimatedSavingsBytes": 5, "recommendations": [{
        "type": "defragment", "priority": "high", "deviceId": "cpu", "message": "m",
        "evidence": {"failedAllocationBytes": 4194304, "fragmentation": 0.5},
        "estimatedSavingsBytes": 5,
        "action": {"method": "POST", "path": "/api/memory/operations/defragment/cpu", "body": {"strategy": "thorough"}}
    }]});
    assert_eq!(round_trip::<RecommendationsDto>(r.clone()), r);
    let clear = json!({"method": "POST", "path": "/api/memory/operations/clear/cpu", "body": null});
    assert_eq!(round_trip::<ActionDto>(clear.clone()), clear);
}

#[test]
fn request_bodies_are_what_the_daemon_reads() {
    let body = LoadBody {
        path: "/m.safetensors".into(),
        name: None,
        device_id: Some("cpu".into()),
        priority: None,
        pinned: false,
        held_by: Some("worker".into()),
        keep_alive_ms: Some(0),
        run_async: true,
    };
    let v = serde_json::to_value(&body).expect("json");
    assert_eq!(v["heldBy"], "worker");
    assert_eq!(v["async"], true);
    assert_eq!(v["deviceId"], "cpu");
    assert_eq!(serde_json::from_value::<LoadBody>(v).expect("back"), body);
    assert!(serde_json::from_value::<LoadBody>(json!({"path": "/m", "extra": 1})).is_err(), "unknown fields refused");
}

#[test]
fn an_operations_result_reads_back_as_the_answer_it_is() {
    let defrag = json!({"deviceId": "cpu", "strategy": "quick", "fragmentationBefore": 0.5, "fragmentationAfter": 0.0,
        "bytesMoved": 4, "allocationsMoved": 1, "blocksReleased": 1, "bytesReleased": 8,
        "largestFreeBlockBefore": 1, "largestFreeBlockAfter": 8, "durationMs": 1.0, "movingMs": 0.5, "passes": 1,
        "movesSkipped": 0, "error": null});
    let op = |result: Value| {
        json!({"operationId": "o", "kind": "defragment", "status": "completed", "deviceId": "cpu", "bytesDone": 4,
            "bytesTotal": 4, "progress": 1.0, "bytesPerSecond": 4.0, "durationMs": 1.0, "startedAt": "t",
            "completedAt": "t", "error": null, "errorCode": null, "location": "/api/memory/operations/o",
            "result": result})
    };
    let one = op(defrag.clone());
    assert_eq!(round_trip::<OperationDto>(one.clone()), one);
    let typed: OperationDto = serde_json::from_value(one).expect("operation");
    assert!(matches!(typed.result, Some(OperationResult::Defragment(_))), "{typed:?}");
    let all = op(json!({"bytesMoved": 4, "bytesReleased": 8, "devices": [defrag]}));
    let typed: OperationDto = serde_json::from_value(all).expect("operation");
    assert!(matches!(typed.result, Some(OperationResult::DefragmentAll(_))), "{typed:?}");
    let running = op(Value::Null);
    assert_eq!(serde_json::from_value::<OperationDto>(running).expect("running").result, None);
    assert_eq!(serde_json::to_value(OperationKind::ModelLoad).expect("json"), json!(OperationKind::ModelLoad.as_str()));
}
