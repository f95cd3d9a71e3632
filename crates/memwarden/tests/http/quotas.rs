//! Quotas (`[[quotas]]`) over HTTP: per-owner byte limits per device and kind, answered with 507
//! `QUOTA_EXCEEDED`, and `GET /api/memory/owners`.

use crate::common::{assert_error, TestServer};
use memwarden::config::{quotas::QuotaEntry, Config};
use serde_json::{json, Value};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn quota(owner: &str, device: &str, memory_type: &str, max_bytes: u64) -> QuotaEntry {
    QuotaEntry { owner: owner.into(), device: device.into(), memory_type: memory_type.into(), max_bytes }
}

fn server(quotas: Vec<QuotaEntry>) -> TestServer {
    let config = Config { quotas, ..Config::default() };
    config.validate().expect("a valid config");
    TestServer::start_with(config)
}

fn allocate(s: &TestServer, body: Value) -> (u16, Value) {
    s.call("POST", "/api/memory/allocations/allocate/cpu", Some(&body.to_string()))
}

fn owners(s: &TestServer) -> Value {
    let (status, v) = s.call("GET", "/api/memory/owners", None);
    assert_eq!(status, 200, "{v}");
    v["data"].clone()
}

fn allocations(s: &TestServer) -> Value {
    let (status, v) = s.call("GET", "/api/memory/allocations", None);
    assert_eq!(status, 200, "{v}");
    v["data"].clone()
}

/// The owners listing's row for `owner` (`None`: no owner) on cpu of `kind`.
fn row(listing: &Value, owner: Option<&str>, kind: &str) -> Value {
    let owner = owner.map_or(Value::Null, |o| json!(o));
    let rows = listing["owners"].as_array().expect("owners");
    rows.iter()
        .find(|r| r["owner"] == owner && r["deviceId"] == "cpu" && r["memoryType"] == kind)
        .cloned()
        .unwrap_or_else(|| panic!("no row for {owner} cpu {kind} in {listing}"))
}

#[test]
fn over_the_limit_is_507_naming_owner_limit_and_use_and_nothing_changes() {
    let s = server(vec![quota("vllm-a", "cpu", "host", MIB)]);
    s.alloc_on("cpu", json!({"sizeBytes": 768 * KIB, "owner": "vllm-a"}));
    let (listing, list, pools) =
        (owners(&s), allocations(&s), s.call("GET", "/api/memory/pools/cpu", None).1["data"].clone());
    let refused = allocate(&s, json!({"sizeBytes": 512 * KIB, "owner": "vllm-a"}));
    assert_error(&refused, 507, "QUOTA_EXCEEDED", "owner 'vllm-a'");
    let message = refused.1["error"]["message"].as_str().expect("message");
    for needle in
        ["may hold 1048576 bytes of host memory on cpu", "holds 786432", "would add 524288", "nothing was allocated"]
    {
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
    assert_eq!(owners(&s), listing, "the owners listing is unchanged");
    assert_eq!(allocations(&s), list, "no allocation was made");
    assert_eq!(s.call("GET", "/api/memory/pools/cpu", None).1["data"], pools, "the pools are unchanged");
    s.service.validate().expect("the ledger, the pools and the quota books agree");
}

#[test]
fn under_the_limit_is_201_counting_pool_bytes_and_a_free_gives_the_room_back() {
    let s = server(vec![quota("vllm-a", "cpu:0", "host", 2 * KIB)]);
    // 1000 bytes take 1024 in the pool: the quota counts those.
    let small = s.alloc_on("cpu", json!({"sizeBytes": 1000, "owner": "vllm-a"}));
    assert_eq!(row(&owners(&s), Some("vllm-a"), "host")["allocatedBytes"], 1024);
    assert_error(
        &allocate(&s, json!({"sizeBytes": 1025, "owner": "vllm-a"})),
        507,
        "QUOTA_EXCEEDED",
        "holds 1024; this request would add 1280",
    );
    let exact = s.alloc_on("cpu", json!({"sizeBytes": 1024, "owner": "vllm-a"}));
    assert_error(&allocate(&s, json!({"sizeBytes": 1, "owner": "vllm-a"})), 507, "QUOTA_EXCEEDED", "holds 2048");
    let (status, v) = s.call("DELETE", &format!("/api/memory/allocations/{small}"), None);
    assert_eq!(status, 200, "{v}");
    s.alloc_on("cpu", json!({"sizeBytes": 1024, "owner": "vllm-a"}));
    s.call("DELETE", &format!("/api/memory/allocations/{exact}"), None);
    let r = row(&owners(&s), Some("vllm-a"), "host");
    assert_eq!((r["allocatedBytes"].clone(), r["allocationCount"].clone()), (json!(1024), json!(1)), "{r}");
    assert_eq!(r["quota"]["remainingBytes"], 1024, "{r}");
    s.service.validate().expect("books agree after frees");
}

#[test]
fn a_star_entry_applies_across_kinds_and_devices() {
    let s = server(vec![quota("a", "*", "*", MIB), quota("b", "cpu", "*", MIB)]);
    s.alloc_on("cpu", json!({"sizeBytes": 512 * KIB, "owner": "a"}));
    s.alloc_on("cpu", json!({"sizeBytes": 256 * KIB, "owner": "a", "memoryType": "reservation"}));
    s.alloc_on("cpu", json!({"sizeBytes": 128 * KIB, "owner": "a", "memoryType": "pinned"}));
    assert_error(
        &allocate(&s, json!({"sizeBytes": 256 * KIB, "owner": "a", "memoryType": "pinned"})),
        507,
        "QUOTA_EXCEEDED",
        "may hold 1048576 bytes of memory of all kinds on all devices and holds 917504",
    );
    s.alloc_on("cpu", json!({"sizeBytes": 768 * KIB, "owner": "b", "memoryType": "reservation"}));
    assert_error(
        &allocate(&s, json!({"sizeBytes": 512 * KIB, "owner": "b"})),
        507,
        "QUOTA_EXCEEDED",
        "memory of all kinds on cpu",
    );
    let listing = owners(&s);
    let a = &listing["quotas"][0];
    assert_eq!((a["deviceId"].clone(), a["memoryType"].clone()), (json!("*"), json!("*")));
    assert_eq!((a["usedBytes"].clone(), a["remainingBytes"].clone()), (json!(896 * KIB), json!(128 * KIB)));
    assert_eq!(row(&listing, Some("a"), "pinned")["quota"], *a, "each row names the quota that binds");
}

#[test]
fn another_owner_and_unowned_allocations_are_unaffected() {
    let s = server(vec![quota("a", "cpu", "host", 64 * KIB)]);
    s.alloc_on("cpu", json!({"sizeBytes": 64 * KIB, "owner": "a"}));
    assert_error(&allocate(&s, json!({"sizeBytes": 256, "owner": "a"})), 507, "QUOTA_EXCEEDED", "owner 'a'");
    s.alloc_on("cpu", json!({"sizeBytes": 4 * MIB, "owner": "b"}));
    s.alloc_on("cpu", json!({"sizeBytes": 4 * MIB}));
    // Owners match exactly: `A` is another owner.
    s.alloc_on("cpu", json!({"sizeBytes": 4 * MIB, "owner": "A"}));
    // A quota on host memory leaves a's pinned memory alone.
    s.alloc_on("cpu", json!({"sizeBytes": 128 * KIB, "owner": "a", "memoryType": "pinned"}));
    let listing = owners(&s);
    assert!(row(&listing, Some("b"), "host")["quota"].is_null());
    assert!(row(&listing, None, "host")["quota"].is_null());
    assert!(row(&listing, Some("a"), "pinned")["quota"].is_null());
}

#[test]
fn the_owners_listing_matches_the_allocations() {
    let s = server(vec![quota("a", "cpu", "host", 8 * MIB), quota("idle", "cpu", "pinned", MIB)]);
    for (size, owner, kind) in [
        (1000, Some("a"), "host"),
        (5000, Some("a"), "host"),
        (64 * KIB, Some("a"), "reservation"),
        (3000, Some("b"), "pinned"),
        (700, None, "host"),
        (900, None, "host"),
    ] {
        let mut body = json!({"sizeBytes": size, "memoryType": kind});
        if let Some(o) = owner {
            body["owner"] = json!(o);
        }
        s.alloc_on("cpu", body);
    }
    let (listing, list) = (owners(&s), allocations(&s));
    let rows = listing["owners"].as_array().expect("rows");
    let mut listed = 0;
    for r in rows {
        let same: Vec<&Value> = list["allocations"]
            .as_array()
            .expect("allocations")
            .iter()
            .filter(|a| {
                a["owner"] == r["owner"] && a["deviceId"] == r["deviceId"] && a["memoryType"] == r["memoryType"]
            })
            .collect();
        let sum = |field: &str| same.iter().map(|a| a[field].as_u64().expect("bytes")).sum::<u64>();
        assert_eq!(r["allocationCount"], same.len(), "{r}");
        assert_eq!(r["allocatedBytes"], sum("allocatedSize"), "{r}");
        assert_eq!(r["requestedBytes"], sum("sizeBytes"), "{r}");
        listed += same.len();
    }
    assert_eq!(listed, 6, "every allocation is in one row");
    assert_eq!(rows[0]["owner"], Value::Null, "allocations without an owner come first, as null");
    let a = row(&listing, Some("a"), "host");
    assert_eq!((a["allocatedBytes"].clone(), a["requestedBytes"].clone()), (json!(1024 + 5120), json!(6000)));
    assert_eq!(
        a["quota"],
        json!({"owner": "a", "deviceId": "cpu", "memoryType": "host", "maxBytes": 8 * MIB, "usedBytes": 6144, "remainingBytes": 8 * MIB - 6144})
    );
    assert!(row(&listing, Some("a"), "reservation")["quota"].is_null(), "the host quota does not cover reservations");
    let idle = row(&listing, Some("idle"), "pinned");
    assert_eq!((idle["allocationCount"].clone(), idle["allocatedBytes"].clone()), (json!(0), json!(0)), "{idle}");
    assert_eq!(idle["quota"]["maxBytes"], MIB);
    assert_eq!(listing["quotas"].as_array().expect("quotas").len(), 2);
}

#[test]
fn a_transfer_into_a_new_allocation_counts_for_the_sources_owner() {
    let s = server(vec![quota("a", "cpu", "*", MIB)]);
    let src = s.alloc_on("cpu", json!({"sizeBytes": 768 * KIB, "owner": "a"}));
    let before = allocations(&s);
    let body = json!({"sourceAllocationId": src, "targetDeviceId": "cpu", "targetMemoryType": "pinned"});
    assert_error(&s.call("POST", "/api/memory/transfer", Some(&body.to_string())), 507, "QUOTA_EXCEEDED", "owner 'a'");
    assert_eq!(allocations(&s), before, "no destination was made");
    // Copies into an existing allocation take nothing new.
    let dst = s.alloc_on("cpu", json!({"sizeBytes": 256 * KIB, "owner": "a"}));
    let body = json!({"sourceAllocationId": src, "destinationAllocationId": dst, "sizeBytes": 256 * KIB});
    let (status, v) = s.call("POST", "/api/memory/copy", Some(&body.to_string()));
    assert_eq!(status, 200, "{v}");
    s.service.validate().expect("books agree");
}

#[test]
fn memwarden_owners_prints_the_rows_and_the_quotas() {
    use memwarden::cli::{http::Client, run, Command};
    let s = server(vec![quota("a", "cpu", "host", MIB), quota("idle", "*", "pinned", MIB)]);
    s.alloc_on("cpu", json!({"sizeBytes": 512 * KIB, "owner": "a"}));
    s.alloc_on("cpu", json!({"sizeBytes": 1000}));
    let client = Client::new(&s.url(""), None);
    let out = run(&client, &Command::Owners, false).expect("owners");
    let line = |start: &str| out.lines().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("{start}: {out}"));
    assert!(line("a ").contains("512 KiB of 1.00 MiB (cpu host)"), "{out}");
    assert!(line("(none) ").contains("1.00 KiB"), "{out}");
    assert!(line("idle ").contains("0 B of 1.00 MiB (* pinned)"), "{out}");
    assert!(line("QUOTA OWNER").contains("REMAINING"), "{out}");
    let json = run(&client, &Command::Owners, true).expect("--json");
    let v: Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["quotas"][1]["deviceId"], "*");
}
