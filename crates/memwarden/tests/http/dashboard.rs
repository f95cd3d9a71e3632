//! The dashboard (issue 16, item 2): `/` and its assets are served from the binary, open without
//! the token, with the right content types, and load nothing from another origin. The page's
//! behaviour in a real browser is `scripts/browser-test`'s.

use crate::common::{assert_error, TestServer};
use memwarden::api::dashboard::{ASSETS, INDEX_HTML};
use memwarden::config::Config;

/// Status, content type and body of a GET without any header.
fn get(s: &TestServer, path: &str) -> (u16, String, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut resp = agent.get(&s.url(path)).call().expect("request");
    let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = resp.body_mut().read_to_string().expect("body");
    (resp.status().as_u16(), content_type, body)
}

fn with_token() -> TestServer {
    TestServer::start_with(Config { auth_token: Some("s3cret".into()), ..Config::default() })
}

#[test]
fn the_page_and_its_assets_are_open_with_a_token_configured() {
    let s = with_token();
    let (status, content_type, body) = get(&s, "/");
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "text/html; charset=utf-8");
    assert_eq!(body, INDEX_HTML);
    for (path, want) in [
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
        ("/ui/favicon.svg", "image/svg+xml"),
    ] {
        let (status, content_type, body) = get(&s, path);
        assert_eq!((status, content_type.as_str()), (200, want), "{path}");
        assert!(!body.is_empty(), "{path}");
    }
    // The API behind it still needs the token.
    assert_error(&s.call("GET", "/api/memory/status", None), 401, "UNAUTHORIZED", "token");
    // An unknown asset is the usual error envelope.
    assert_error(&s.call("GET", "/ui/nothing.js", None), 404, "ROUTE_NOT_FOUND", "nothing.js");
}

#[test]
fn the_page_names_every_asset_it_loads() {
    let s = TestServer::start();
    for (name, _, _) in ASSETS {
        assert!(INDEX_HTML.contains(&format!("\"/ui/{name}\"")), "index.html does not load /ui/{name}");
    }
    // Every src and href is a path on this daemon; no inline script (the CSP forbids one).
    for attr in ["src=\"", "href=\""] {
        for (i, _) in INDEX_HTML.match_indices(attr) {
            let value = &INDEX_HTML[i + attr.len()..];
            assert!(value.starts_with('/') && !value.starts_with("//"), "{attr}{}", &value[..value.len().min(40)]);
        }
    }
    assert_eq!(INDEX_HTML.matches("<script").count(), INDEX_HTML.matches("<script src=\"/ui/").count());
    let (_, _, body) = get(&s, "/");
    let csp = {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let resp = agent.get(&s.url("/")).call().expect("request");
        resp.headers().get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
    };
    assert!(csp.contains("connect-src 'self'") && csp.contains("script-src 'self'"), "{csp}");
    assert!(body.contains("id=\"token-dialog\""));
    // The page is not API: the document (which the fuzzer holds the routes to) leaves it out.
    let (status, doc) = s.call("GET", "/api/openapi.json", None);
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.keys().all(|p| p != "/" && !p.starts_with("/ui")), "{:?}", paths.keys().collect::<Vec<_>>());
}

/// Comments out of HTML, CSS and JavaScript text: `<!-- -->`, `/* */`, and `//` to the end of the
/// line where it starts the line or follows a space (so the `//` of a URL stays).
fn without_comments(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("<!--").into_iter().chain(rest.find("/*")).min() {
        out.push_str(&rest[..start]);
        let close = if rest[start..].starts_with("<!--") { "-->" } else { "*/" };
        rest = rest[start..].find(close).map_or("", |end| &rest[start + end + close.len()..]);
    }
    out.push_str(rest);
    out.lines()
        .map(|line| match line.find("//").filter(|&i| i == 0 || line[..i].ends_with(' ')) {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_embedded_assets_reference_no_external_url() {
    // The SVG namespace is a name, never fetched; it is the one URL allowed.
    const SVG_NS: &str = "http://www.w3.org/2000/svg";
    let files = std::iter::once(("index.html", INDEX_HTML)).chain(ASSETS.iter().map(|(name, _, body)| (*name, *body)));
    for (name, body) in files {
        let code = without_comments(body).replace(SVG_NS, "");
        for needle in ["http://", "https://", "=\"//", "='//", "url(//", "url(\"//", "@import"] {
            assert!(!code.contains(needle), "{name} references {needle}…: {}", {
                let i = code.find(needle).unwrap_or(0);
                &code[i..(i + 80).min(code.len())]
            });
        }
    }
    assert_eq!(without_comments("a // b\nc http://x\n/* d */e <!-- f -->g"), "a \nc http://x\ne g");
}
