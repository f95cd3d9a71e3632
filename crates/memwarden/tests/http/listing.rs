//! Listing allocations a page at a time (issue 15, item 7): `limit`, `cursor` and `nextCursor`,
//! a stable order while allocations come and go, the filters, and the CLI that pages through.

use crate::common::{assert_envelope, assert_error, TestServer};
use memwarden::service::{AllocateRequest, Service};
use memwarden_core::MemoryKind;
use serde_json::Value;
use std::collections::HashSet;

fn request(kind: MemoryKind, owner: Option<&str>, purpose: Option<&str>) -> AllocateRequest {
    AllocateRequest {
        device: "cpu".into(),
        size_bytes: 4096,
        kind: Some(kind),
        alignment_bytes: 256,
        purpose: purpose.map(String::from),
        owner: owner.map(String::from),
        owner_pid: None,
        owner_client: None,
        persistent: false,
        movable: true,
    }
}

/// `n` 4 KiB host allocations straight through the service (HTTP would only make it slower);
/// their ids, oldest first.
fn allocate_many(service: &Service, n: usize) -> Vec<String> {
    (0..n).map(|_| service.allocate(request(MemoryKind::Host, None, None)).expect("allocate").id.clone()).collect()
}

/// The listing order as the service keeps it (every record, sorted): what pages must add up to.
fn oldest_first(service: &Service) -> Vec<String> {
    service.allocations(None).iter().map(|r| r.id.clone()).collect()
}

fn page(s: &TestServer, path: &str) -> Value {
    let (status, v) = s.call("GET", path, None);
    assert_eq!(status, 200, "{path}: {v}");
    assert_envelope(&v);
    v["data"].clone()
}

fn ids(page: &Value) -> Vec<String> {
    page["allocations"]
        .as_array()
        .expect("allocations")
        .iter()
        .map(|a| a["allocationId"].as_str().expect("id").to_string())
        .collect()
}

fn with_cursor(path: &str, page: &Value) -> Option<String> {
    let cursor = page["nextCursor"].as_str()?;
    let sep = if path.contains('?') { '&' } else { '?' };
    Some(format!("{path}{sep}cursor={cursor}"))
}

#[test]
fn three_pages_of_a_thousand_list_every_allocation_once_in_order() {
    let s = TestServer::start();
    allocate_many(&s.service, 2500);
    let want = oldest_first(&s.service);
    for route in ["/api/memory/allocations?limit=1000", "/api/memory/allocations/device/cpu?limit=1000"] {
        let mut listed = Vec::new();
        let mut sizes = Vec::new();
        let mut next = Some(route.to_string());
        while let Some(path) = next {
            let p = page(&s, &path);
            assert_eq!(p["count"], 2500, "count is the whole set's, on every page");
            assert_eq!(p["totalBytes"], 2500 * 4096);
            sizes.push(ids(&p).len());
            listed.extend(ids(&p));
            next = with_cursor(route, &p);
            if next.is_none() {
                assert!(p["nextCursor"].is_null(), "the last page says so: {}", p["nextCursor"]);
            }
        }
        assert_eq!(sizes, [1000, 1000, 500], "{route}");
        assert_eq!(listed, want, "{route}: every allocation once, oldest first");
    }
    // Without a limit: pages of 1000.
    let first = page(&s, "/api/memory/allocations");
    assert_eq!(ids(&first), want[..1000]);
    assert!(first["nextCursor"].is_string());
    // A limit that covers everything: one page, no cursor.
    let all = page(&s, "/api/memory/allocations?limit=10000");
    assert_eq!(ids(&all), want);
    assert!(all["nextCursor"].is_null());
}

#[test]
fn paging_while_allocations_are_freed_and_added_skips_and_repeats_none_of_the_living() {
    let s = TestServer::start();
    let original = allocate_many(&s.service, 2500);
    let route = "/api/memory/allocations?limit=1000";
    let first = page(&s, route);
    let seen_first = ids(&first);
    assert_eq!(seen_first, original[..1000]);
    // Free the allocation the cursor points at, others already seen, and others not yet seen
    // (on the next page and the last); add new ones.
    let mut freed: HashSet<String> = HashSet::new();
    // Those no page had shown when they were freed: never listed.
    let mut freed_unseen: HashSet<String> = HashSet::new();
    for i in [999, 998, 0, 500, 1000, 1001, 1500, 1999, 2000, 2499] {
        s.service.free(&original[i]).expect("free");
        freed.insert(original[i].clone());
        if i >= 1000 {
            freed_unseen.insert(original[i].clone());
        }
    }
    let added = allocate_many(&s.service, 30);
    let second = page(&s, &with_cursor(route, &first).expect("a second page"));
    assert_eq!(second["count"], 2500 - 10 + 30);
    assert!(ids(&second).contains(&original[1998]));
    // More frees (one the second page showed, others the last page would) and additions
    // before the last page.
    for i in [1998, 2100, 2200] {
        s.service.free(&original[i]).expect("free");
        freed.insert(original[i].clone());
    }
    freed_unseen.extend([original[2100].clone(), original[2200].clone(), added[0].clone()]);
    s.service.free(&added[0]).expect("free");
    let added_later = allocate_many(&s.service, 5);
    let mut listed = seen_first.clone();
    listed.extend(ids(&second));
    let mut next = with_cursor(route, &second);
    while let Some(path) = next {
        let p = page(&s, &path);
        listed.extend(ids(&p));
        next = with_cursor(route, &p);
    }
    let unique: HashSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "no allocation listed twice");
    for id in original.iter().chain(&added[1..]).chain(&added_later) {
        if !freed.contains(id) {
            assert!(unique.contains(id), "{id} lived throughout and was skipped");
        }
    }
    // The ones freed before their page came never appear; the order holds across pages.
    for id in &freed_unseen {
        assert!(!unique.contains(id), "{id} was freed before its page and still listed");
    }
    let position = |id: &String| original.iter().chain(&added).chain(&added_later).position(|o| o == id);
    let positions: Vec<usize> = listed.iter().map(|id| position(id).expect("known")).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "oldest first across pages");
}

#[test]
fn filters_select_exactly_the_matching_allocations_and_count_them_all() {
    let s = TestServer::start();
    struct Made {
        id: String,
        kind: MemoryKind,
        owner: Option<&'static str>,
        purpose: Option<&'static str>,
    }
    let mut made = Vec::new();
    for i in 0..60 {
        let kind = if i % 3 == 0 { MemoryKind::Reservation } else { MemoryKind::Host };
        let owner = [Some("vllm-a"), Some("vllm-a"), Some("vllm-b"), Some("vllm-b"), None][i % 5];
        let purpose = [Some("kv-cache"), Some("KV-cache"), Some("weights"), None][i % 4];
        let r = s.service.allocate(request(kind, owner, purpose)).expect("allocate");
        made.push(Made { id: r.id.clone(), kind, owner, purpose });
    }
    let all = oldest_first(&s.service);
    let expect = |pick: &dyn Fn(&Made) -> bool| -> Vec<String> {
        let chosen: HashSet<&String> = made.iter().filter(|m| pick(m)).map(|m| &m.id).collect();
        all.iter().filter(|id| chosen.contains(id)).cloned().collect()
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("owner=vllm-a", expect(&|m| m.owner == Some("vllm-a"))),
        ("owner=VLLM-A", vec![]),
        ("memoryType=RAM", expect(&|m| m.kind == MemoryKind::Host)),
        ("memoryType=System", expect(&|m| m.kind == MemoryKind::Host)),
        ("memoryType=reservation", expect(&|m| m.kind == MemoryKind::Reservation)),
        ("memoryType=device", vec![]),
        ("deviceId=CPU-0", all.clone()),
        ("deviceId=cpu_0&owner=vllm-b", expect(&|m| m.owner == Some("vllm-b"))),
        ("purpose=kv-cache", expect(&|m| m.purpose == Some("kv-cache"))),
        ("purpose=kv", vec![]),
        (
            "owner=vllm-b&memoryType=host&purpose=weights",
            expect(&|m| m.owner == Some("vllm-b") && m.kind == MemoryKind::Host && m.purpose == Some("weights")),
        ),
    ];
    for (query, want) in &cases {
        let p = page(&s, &format!("/api/memory/allocations?{query}"));
        assert_eq!(&ids(&p), want, "{query}");
        assert_eq!(p["count"], want.len(), "{query}");
        assert_eq!(p["totalBytes"], 4096 * want.len() as u64, "{query}");
        // Paged one at a time, the figures still describe the whole filtered set.
        let one = page(&s, &format!("/api/memory/allocations?{query}&limit=1"));
        assert_eq!(ids(&one), want.iter().take(1).cloned().collect::<Vec<_>>(), "{query}");
        assert_eq!(one["count"], want.len(), "{query}");
        assert_eq!(one["totalBytes"], 4096 * want.len() as u64, "{query}");
        assert_eq!(one["nextCursor"].is_string(), want.len() > 1, "{query}");
    }
    // The device route takes the same filters, an alias in its path.
    let p = page(&s, "/api/memory/allocations/device/CPU_0?memoryType=ram&owner=vllm-a");
    let want = expect(&|m| m.kind == MemoryKind::Host && m.owner == Some("vllm-a"));
    assert!(!want.is_empty() && want.len() < 60);
    assert_eq!(ids(&p), want);
    // Unknown devices, as elsewhere.
    assert_error(&s.call("GET", "/api/memory/allocations?deviceId=tpu_9", None), 404, "DEVICE_NOT_FOUND", "tpu_9");
    // A GPU id answers as the status route does (503 BACKEND_UNAVAILABLE without a GPU).
    let (status, v) = s.call("GET", "/api/memory/allocations?deviceId=gpu-7", None);
    let (want_status, want) = s.call("GET", "/api/memory/status/gpu-7", None);
    assert_eq!((status, &v["error"]["code"]), (want_status, &want["error"]["code"]), "{v}");
}

#[test]
fn a_bad_limit_cursor_or_kind_is_refused_naming_it() {
    let s = TestServer::start();
    allocate_many(&s.service, 3);
    for route in ["/api/memory/allocations", "/api/memory/allocations/device/cpu"] {
        for limit in ["0", "10001", "-1", "abc", "1.5", "", "99999999999999999999"] {
            let resp = s.call("GET", &format!("{route}?limit={limit}"), None);
            assert_error(&resp, 400, "INVALID_ARGUMENT", &format!("limit: '{limit}'"));
        }
        for cursor in ["garbage!", "", "bm90IGEgY3Vyc29y", "MS4yLg"] {
            let resp = s.call("GET", &format!("{route}?cursor={cursor}"), None);
            assert_error(&resp, 400, "INVALID_ARGUMENT", "cursor: ");
        }
        assert_error(
            &s.call("GET", &format!("{route}?memoryType=vram2"), None),
            400,
            "INVALID_ARGUMENT",
            "memoryType: ",
        );
    }
    // A cursor another daemon gave is stale here: its allocations are gone.
    let other = TestServer::start();
    allocate_many(&other.service, 3);
    let p = page(&other, "/api/memory/allocations?limit=1");
    let cursor = p["nextCursor"].as_str().expect("cursor");
    assert_eq!(page(&other, &format!("/api/memory/allocations?limit=1&cursor={cursor}"))["count"], 3);
    let resp = s.call("GET", &format!("/api/memory/allocations?cursor={cursor}"), None);
    assert_error(&resp, 400, "INVALID_ARGUMENT", "cursor: given by another run of the daemon");
}

#[test]
fn the_cli_pages_through_every_allocation() {
    let s = TestServer::start();
    let made = allocate_many(&s.service, 2500);
    for _ in 0..7 {
        s.service.allocate(request(MemoryKind::Reservation, Some("trainer"), Some("kv"))).expect("allocate");
    }
    let url = format!("http://{}", s.addr);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_memwarden"))
            .arg("--url")
            .arg(&url)
            .args(args)
            .output()
            .expect("run the cli");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf8")
    };
    let table = cli(&["allocations"]);
    for id in &made {
        assert!(table.contains(id.as_str()), "the table lacks {id}");
    }
    assert!(table.contains("2507 allocation(s)"), "{}", table.lines().last().unwrap_or_default());
    let json: Value = serde_json::from_str(&cli(&["--json", "allocations", "cpu"])).expect("json");
    let listed = ids(&json);
    assert_eq!(listed, oldest_first(&s.service), "all of them, oldest first, once");
    assert_eq!(json["count"], 2507);
    assert!(json["nextCursor"].is_null());
    // Filters pass through.
    let json: Value =
        serde_json::from_str(&cli(&["--json", "allocations", "--owner", "trainer", "--kind", "Reservation"]))
            .expect("json");
    assert_eq!(json["count"], 7);
    assert_eq!(ids(&json).len(), 7);
    let table = cli(&["allocations", "--purpose", "kv"]);
    assert!(table.contains("7 allocation(s)"), "{table}");
}

#[test]
fn the_document_describes_the_listing_parameters_as_the_routes_take_them() {
    let s = TestServer::start();
    let (_, doc) = s.call("GET", "/api/openapi.json", None);
    for route in ["/api/memory/allocations", "/api/memory/allocations/device/{deviceId}"] {
        let params = doc["paths"][route]["get"]["parameters"].as_array().expect("parameters");
        let param = |name: &str| params.iter().find(|p| p["name"] == name && p["in"] == "query").cloned();
        let limit = param("limit").expect("limit");
        assert_eq!(limit["schema"]["minimum"], 1, "{route}");
        assert_eq!(limit["schema"]["maximum"], memwarden::api::allocations::MAX_PAGE_LIMIT, "{route}");
        let default = memwarden::api::allocations::DEFAULT_PAGE_LIMIT.to_string();
        assert!(limit["description"].as_str().expect("description").contains(&default), "{route}");
        for name in ["cursor", "memoryType", "owner", "purpose"] {
            let p = param(name).unwrap_or_else(|| panic!("{route} lacks {name}"));
            assert!(p["description"].as_str().is_some_and(|d| !d.is_empty()), "{route} {name}");
        }
        assert_eq!(param("deviceId").is_some(), route == "/api/memory/allocations", "{route}");
    }
    let list = &doc["components"]["schemas"]["AllocationListDto"]["properties"];
    assert!(list["nextCursor"].is_object() && list["count"]["description"].is_string(), "{list}");
}
