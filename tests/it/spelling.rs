//! Every spelling of what fedport checks is checked: a table of content types, methods,
//! paths and hosts, for gRPC and HTTP calls, over HTTP/1.1 (raw bytes) and HTTP/2 (raw
//! frames, tests/py/raw_request.py). Each spelling is either checked exactly as the
//! canonical one is, or refused; an invalid request never reaches the service, and a
//! served one reaches it under the name of the service it was authorized for.

use crate::support::upstream::{self, Proto};
use crate::support::{node_config_with_rules, Fedport, Pki, PyClient};

/// What a spelling must get: fedport's own refusal with this reason (`fed-refused`),
/// or the service's answer.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    Refused(&'static str),
    Served,
}
use Want::*;

struct Case {
    name: String,
    method: &'static str,
    path: &'static str,
    /// HTTP/2 `:authority` (HTTP/1.1: none; use a `host` header).
    authority: Option<&'static str>,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
    want: Want,
}

fn run(pki: &Pki, port: u16, proto: &str, cases: &[Case]) -> Vec<serde_json::Value> {
    let json: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            serde_json::json!({
                "proto": proto,
                "method": c.method,
                "path": c.path,
                "authority": c.authority,
                "headers": c.headers,
                "body_hex": c.body.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cases.json");
    std::fs::write(&file, serde_json::to_vec(&json).unwrap()).unwrap();
    let file = file.display().to_string();
    PyClient::new(pki, "raw_request.py", port, &pki.client, &[&file])
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn grpc_frame(msg: &[u8]) -> Vec<u8> {
    let mut v = vec![0];
    v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

#[test]
fn every_spelling_is_checked_like_the_canonical_one_or_refused() {
    let pki = Pki::new();
    let h1 = upstream::start(Proto::Http1);
    let h2 = upstream::start(Proto::H2c);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let services = format!(
        "[[service]]\nname = \"inventory\"\nprotocol = \"http\"\nendpoints = [\"{h1}\"]\n\
         formats = [\"application/json\"]\n\
         schema = {{ json = {{ \"POST /v1/reserve\" = \"{json}\" }} }}\n\
         [[service]]\nname = \"loose\"\nprotocol = \"http\"\nendpoints = [\"{h1}\"]\n\
         schema = {{ json = {{ \"POST /v1/reserve\" = \"{json}\" }} }}\n\
         [[service]]\nname = \"orders\"\nprotocol = \"http\"\nendpoints = [\"{h1}\"]\n\
         [[service]]\nname = \"echo\"\nprotocol = \"grpc\"\nendpoints = [\"{h2}\"]\n\
         schema = {{ proto = [\"{proto}\"] }}\n",
        h1 = h1.url(Proto::Http1),
        h2 = h2.url(Proto::H2c),
        json = root.join("examples/schemas/reserve.json").display(),
        proto = root.join("tests/fixtures/proto/test.proto").display(),
    );
    let rules = "[[allow]]\nfrom = \"spiffe://fed.test/client/alice\"\nto = \"inventory\"\n\
                 methods = [\"POST /v1/reserve\", \"GET /v1/items\"]\n\
                 [[allow]]\nfrom = \"spiffe://fed.test/client/alice\"\nto = \"orders\"\n\
                 [[allow]]\nfrom = \"spiffe://fed.test/client/alice\"\nto = \"loose\"\n\
                 [[allow]]\nfrom = \"spiffe://fed.test/client/alice\"\nto = \"echo\"\n\
                 methods = [\"test.Echo/Say\"]\n";
    let fp = Fedport::start(&node_config_with_rules(&pki, &services, rules));
    let port = fp.port("internal");

    let bad_doc = br#"{"sku":5,"count":2}"#.to_vec();
    let good_doc = br#"{"sku":"a","count":2}"#.to_vec();
    // test.Msg.text (a string) holding invalid UTF-8; and a valid one
    let bad_msg = grpc_frame(&[0x0a, 0x02, 0xff, 0xfe]);
    let good_msg = grpc_frame(&[0x0a, 0x02, b'h', b'i']);

    for proto in ["h1", "h2"] {
        let mut cases: Vec<Case> = Vec::new();
        // an HTTP call to inventory: the host names it (h1: Host, h2: :authority)
        let mut http = |name: &str,
                        method: &'static str,
                        path: &'static str,
                        host: Option<&'static str>,
                        extra: &[(&'static str, &'static str)],
                        body: &[u8],
                        want: Want| {
            let mut headers: Vec<(&'static str, &'static str)> = Vec::new();
            let mut authority = None;
            match (proto, host) {
                ("h2", Some(h)) => authority = Some(h),
                (_, Some(h)) => headers.push(("host", h)),
                _ => {}
            }
            headers.extend_from_slice(extra);
            cases.push(Case {
                name: format!("{proto} http {name}"),
                method,
                path,
                authority,
                headers,
                body: body.to_vec(),
                want,
            });
        };
        let json = [("content-type", "application/json")];
        let inv = Some("inventory");
        http(
            "canonical",
            "POST",
            "/v1/reserve",
            inv,
            &json,
            &bad_doc,
            Refused("schema"),
        );
        http(
            "canonical, valid",
            "POST",
            "/v1/reserve",
            inv,
            &json,
            &good_doc,
            Served,
        );
        // a body in a content coding would be decoded by the service into bytes
        // fedport never checked; identity is the body as sent
        for (name, coding, want) in [
            ("content-encoding", "gzip", Refused("encoding")),
            ("content-encoding", "identity, GZIP", Refused("encoding")),
            ("content_encoding", "deflate", Refused("encoding")),
            ("content-encoding", "Identity", Refused("schema")),
        ] {
            let h: &'static [(&str, &str)] = Box::leak(Box::new([
                ("content-type", "application/json"),
                (name, coding),
            ]));
            http(
                &format!("{name} {coding:?}"),
                "POST",
                "/v1/reserve",
                inv,
                h,
                &bad_doc,
                want,
            );
        }
        // content type
        for ct in [
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json ;charset=\"utf-8\"",
            "APPLICATION/JSON;Charset=UTF-8",
        ] {
            let h: &'static [(&str, &str)] = Box::leak(Box::new([("content-type", ct)]));
            http(
                &format!("content-type {ct:?}"),
                "POST",
                "/v1/reserve",
                inv,
                h,
                &bad_doc,
                Refused("schema"),
            );
        }
        for ct in [
            "text/plain",
            "application/json, text/plain",
            "application/json;",
            "application /json",
            "application/json; charset",
        ] {
            let want = if ct == "application/json;" {
                Refused("schema")
            } else {
                Refused("format")
            };
            let h: &'static [(&str, &str)] = Box::leak(Box::new([("content-type", ct)]));
            http(
                &format!("content-type {ct:?}"),
                "POST",
                "/v1/reserve",
                inv,
                h,
                &bad_doc,
                want,
            );
        }
        http(
            "two content types, the same",
            "POST",
            "/v1/reserve",
            inv,
            &[
                ("content-type", "application/json"),
                ("content-type", "application/json"),
            ],
            &good_doc,
            Refused("format"),
        );
        http(
            "two content types",
            "POST",
            "/v1/reserve",
            inv,
            &[
                ("content-type", "text/plain"),
                ("content-type", "application/json"),
            ],
            &good_doc,
            Refused("format"),
        );
        http(
            "no content type",
            "POST",
            "/v1/reserve",
            inv,
            &[],
            &bad_doc,
            Refused("format"),
        );
        http(
            "a body claiming to be gRPC",
            "POST",
            "/v1/reserve",
            inv,
            &[
                ("content-type", "application/grpc"),
                ("fed-service", "inventory"),
            ],
            &bad_doc,
            Refused("format"),
        );
        // method
        for m in ["post", "Post", "pOST"] {
            http(
                &format!("method {m:?}"),
                m,
                "/v1/reserve",
                inv,
                &json,
                &good_doc,
                Refused("bad_request"),
            );
        }
        http(
            "method GET on a POST route",
            "GET",
            "/v1/reserve",
            inv,
            &json,
            &good_doc,
            Refused("denied"),
        );
        // path
        for p in ["/v1/reserve/", "//v1//reserve", "/v1/%72eserve"] {
            http(
                &format!("path {p:?}"),
                "POST",
                p,
                inv,
                &json,
                &bad_doc,
                Refused("schema"),
            );
        }
        for p in [
            "/v1/./reserve",
            "/v1/x/../reserve",
            "/v1/x/%2E%2E/reserve",
            "/v1%2freserve",
            "/v1/reserve%00",
            "/v1\\reserve",
        ] {
            http(
                &format!("path {p:?}"),
                "POST",
                p,
                inv,
                &json,
                &bad_doc,
                Refused("bad_request"),
            );
        }
        for p in [
            "/v1/reserve/%u002e%u002e/x",
            "/v1/reserve/%252e%252e/x",
            "/v1/reserve/%c0%ae%c0%ae/x",
            "/v1/reserve%3bx",
            "/v1/reserve/..%3b/x",
            "/v1/reserve/%zz",
        ] {
            http(
                &format!("path {p:?}"),
                "POST",
                p,
                inv,
                &json,
                &good_doc,
                Refused("bad_request"),
            );
        }
        // a JSON route's body read one way only: no key twice, in any case
        let twice: &[u8] = br#"{"sku":"a","count":-5,"count":1}"#;
        let cased: &[u8] = br#"{"sku":"a","count":1,"COUNT":-5}"#;
        http(
            "a key twice",
            "POST",
            "/v1/reserve",
            inv,
            &json,
            twice,
            Refused("schema"),
        );
        http(
            "keys in two cases",
            "POST",
            "/v1/reserve",
            inv,
            &json,
            cased,
            Refused("schema"),
        );
        // on a service that lists no formats, a JSON route's body goes on only as JSON
        let loose = Some("loose");
        let form = [("content-type", "application/x-www-form-urlencoded")];
        http(
            "a form on a JSON route",
            "POST",
            "/v1/reserve",
            loose,
            &form,
            &good_doc,
            Refused("format"),
        );
        http(
            "JSON there",
            "POST",
            "/v1/reserve",
            loose,
            &json,
            &bad_doc,
            Refused("schema"),
        );
        // a rule that grants more than the route (every method of `loose`): a path
        // that servers route to the route's handler in any case is validated as it is
        for p in ["/V1/RESERVE", "/v1/Reserve", "/v1/RESERVE;x"] {
            http(
                &format!("path {p:?}"),
                "POST",
                p,
                loose,
                &json,
                &bad_doc,
                Refused("schema"),
            );
        }
        // another method named in a header or a parameter
        for h in [
            "X-HTTP-Method-Override",
            "x-http-method",
            "X-Method-Override",
            "x_method_override",
        ] {
            // HTTP/2 field names are lower-case (the codec refuses others)
            let h: &'static str = match proto {
                "h2" => Box::leak(h.to_ascii_lowercase().into_boxed_str()),
                _ => h,
            };
            let extra: &'static [(&str, &str)] = Box::leak(Box::new([
                ("content-type", "application/json"),
                (h, "DELETE"),
            ]));
            http(
                &format!("{h}: DELETE"),
                "POST",
                "/v1/reserve",
                inv,
                extra,
                &good_doc,
                Refused("bad_request"),
            );
        }
        let q = "/v1/reserve?_method=DELETE";
        http(
            "_method=DELETE",
            "POST",
            q,
            inv,
            &json,
            &good_doc,
            Refused("bad_request"),
        );
        for p in [
            "/v1/reserve;x=1",
            "/V1/reserve",
            "/v1/reserve-all",
            "/v1/reservex",
        ] {
            http(
                &format!("path {p:?}"),
                "POST",
                p,
                inv,
                &json,
                &good_doc,
                Refused("denied"),
            );
        }
        // host
        for h in [
            "INVENTORY",
            "inventory.",
            "Inventory.Fed.Test.:7443",
            "inventory.fed.test:443",
        ] {
            http(
                &format!("host {h:?}"),
                "POST",
                "/v1/reserve",
                Some(h),
                &json,
                &bad_doc,
                Refused("schema"),
            );
        }
        http(
            "host of another service, routed by fed-service",
            "POST",
            "/v1/reserve",
            Some("orders"),
            &[
                ("content-type", "application/json"),
                ("fed-service", "inventory"),
            ],
            &good_doc,
            Refused("misdirected"),
        );
        http(
            "host with user info",
            "POST",
            "/v1/reserve",
            Some("x@inventory"),
            &json,
            &good_doc,
            Refused("bad_request"),
        );
        if proto == "h1" {
            http(
                "two hosts",
                "POST",
                "/v1/reserve",
                None,
                &[
                    ("host", "inventory"),
                    ("host", "orders"),
                    ("content-type", "application/json"),
                ],
                &good_doc,
                Refused("bad_request"),
            );
            http(
                "absolute-form target and another Host",
                "POST",
                "https://inventory/v1/reserve",
                None,
                &[("host", "orders"), ("content-type", "application/json")],
                &good_doc,
                Refused("bad_request"),
            );
            http(
                "absolute-form target",
                "POST",
                "https://inventory/v1/reserve",
                None,
                &json,
                &bad_doc,
                Refused("schema"),
            );
            // a header the caller names in Connection is no part of the request: it is
            // gone before anything checks it, not after
            http(
                "content type named in Connection",
                "POST",
                "/v1/reserve",
                Some("inventory"),
                &[
                    ("content-type", "application/json"),
                    ("connection", "content-type"),
                ],
                &good_doc,
                Refused("format"),
            );
        } else {
            http(
                ":authority and another host",
                "POST",
                "/v1/reserve",
                inv,
                &[("host", "orders"), ("content-type", "application/json")],
                &good_doc,
                Refused("bad_request"),
            );
            http(
                "expect 100-continue",
                "POST",
                "/v1/reserve",
                inv,
                &[
                    ("content-type", "application/json"),
                    ("expect", "100-continue"),
                ],
                &good_doc,
                Served,
            );
            http(
                ":authority and the same host",
                "POST",
                "/v1/reserve",
                inv,
                &[("host", "INVENTORY."), ("content-type", "application/json")],
                &bad_doc,
                Refused("schema"),
            );
        }

        // a gRPC call to echo
        let mut grpc = |name: &str,
                        method: &'static str,
                        path: &'static str,
                        extra: &[(&'static str, &'static str)],
                        body: &[u8],
                        want: Want| {
            let mut headers: Vec<(&'static str, &'static str)> = Vec::new();
            let authority = if proto == "h2" {
                Some("localhost")
            } else {
                headers.push(("host", "localhost"));
                None
            };
            headers.push(("te", "trailers"));
            headers.extend_from_slice(extra);
            cases.push(Case {
                name: format!("{proto} grpc {name}"),
                method,
                path,
                authority,
                headers,
                body: body.to_vec(),
                want,
            });
        };
        let g = [("content-type", "application/grpc")];
        grpc(
            "canonical",
            "POST",
            "/test.Echo/Say",
            &g,
            &bad_msg,
            Refused("schema"),
        );
        grpc(
            "canonical, valid",
            "POST",
            "/test.Echo/Say",
            &g,
            &good_msg,
            Served,
        );
        grpc(
            "content-encoding gzip",
            "POST",
            "/test.Echo/Say",
            &[
                ("content-type", "application/grpc"),
                ("content-encoding", "gzip"),
            ],
            &good_msg,
            Refused("encoding"),
        );
        for ct in [
            "application/grpc+proto",
            "Application/GRPC",
            "application/grpc; x=y",
            "APPLICATION/GRPC+PROTO",
        ] {
            let h: &'static [(&str, &str)] = Box::leak(Box::new([("content-type", ct)]));
            grpc(
                &format!("content-type {ct:?}"),
                "POST",
                "/test.Echo/Say",
                h,
                &bad_msg,
                Refused("schema"),
            );
        }
        grpc(
            "content-type application/grpc+json",
            "POST",
            "/test.Echo/Say",
            &[("content-type", "application/grpc+json")],
            &bad_msg,
            Refused("format"),
        );
        grpc(
            "content-type application/grpcx",
            "POST",
            "/test.Echo/Say",
            &[("content-type", "application/grpcx")],
            &bad_msg,
            Refused("unknown_service"),
        );
        grpc(
            "two content types",
            "POST",
            "/test.Echo/Say",
            &[
                ("content-type", "application/grpc"),
                ("content-type", "application/grpc"),
                ("fed-service", "echo"),
            ],
            &good_msg,
            Refused("format"),
        );
        grpc(
            "content type not a media type",
            "POST",
            "/test.Echo/Say",
            &[
                ("content-type", "application/grpc, text/plain"),
                ("fed-service", "echo"),
            ],
            &good_msg,
            Refused("format"),
        );
        grpc(
            "method post",
            "post",
            "/test.Echo/Say",
            &g,
            &good_msg,
            Refused("bad_request"),
        );
        grpc(
            "method GET",
            "GET",
            "/test.Echo/Say",
            &g,
            &bad_msg,
            Refused("schema"),
        );
        grpc(
            "path with a trailing slash",
            "POST",
            "/test.Echo/Say/",
            &g,
            &good_msg,
            Refused("unknown_service"),
        );
        grpc(
            "path escaped",
            "POST",
            "/test.Echo/%53ay",
            &g,
            &good_msg,
            Refused("unknown_service"),
        );
        grpc(
            "path with a dot segment",
            "POST",
            "/x/../test.Echo/Say",
            &g,
            &good_msg,
            Refused("bad_request"),
        );
        grpc(
            "a method no rule grants",
            "POST",
            "/test.Echo/Fail",
            &g,
            &good_msg,
            Refused("denied"),
        );
        grpc(
            "a method named like a granted one",
            "POST",
            "/test.Echo/SayMore",
            &g,
            &good_msg,
            Refused("unknown_service"),
        );
        grpc(
            "host of another service",
            "POST",
            "/test.Echo/Say",
            &[("content-type", "application/grpc"), ("host", "inventory")],
            &good_msg,
            Refused("bad_request"),
        );

        let before = (h1.hits(), h2.hits());
        let results = run(&pki, port, proto, &cases);
        assert_eq!(results.len(), cases.len());
        for (c, r) in cases.iter().zip(&results) {
            let refused = r["headers"]["fed-refused"].as_str();
            match c.want {
                Refused(reason) => assert_eq!(
                    refused,
                    Some(reason),
                    "{}: wanted a refusal ({reason}), got {r}",
                    c.name
                ),
                Served => {
                    assert_eq!(refused, None, "{}: wanted it served, got {r}", c.name);
                    assert_eq!(r["status"], 200, "{}: {r}", c.name);
                }
            }
        }
        let count = |kind: &str, f: &dyn Fn(Want) -> bool| {
            cases
                .iter()
                .filter(|c| c.name.starts_with(&format!("{proto} {kind}")) && f(c.want))
                .count()
        };
        assert_eq!(
            h1.hits() - before.0,
            count("http", &|w| w == Served),
            "{proto}: of the HTTP calls only those meant to be served reached a service"
        );
        // a gRPC call's messages are checked as they stream: a call refused for its
        // message reached the service as a head whose message never followed (the
        // grpc tests show the service sees no bad message)
        assert_eq!(
            h2.hits() - before.1,
            count("grpc", &|w| w == Served || w == Refused("schema")),
            "{proto}: of the gRPC calls only those served or refused for their message reached a service"
        );
    }

    // 100-continue is fedport's to answer: no service is told to expect
    assert!(
        h1.seen_header("expect").iter().all(String::is_empty),
        "{:?}",
        h1.seen_header("expect")
    );

    // what reached the service is the name of the service it was authorized for
    let seen = h1.seen_header("host");
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|h| h == "inventory"), "{seen:?}");
}

/// What was authorized is what reaches the service: whatever host a caller names, the
/// service's endpoints are told the authority of the service the request was routed
/// and authorized for — over http://, h2c:// and https://, from HTTP/1.1 and HTTP/2
/// callers — so a caller granted one service never reaches another's virtual host on an
/// upstream both share; a host naming the other service is refused.
#[test]
fn the_service_is_told_the_authority_it_was_authorized_for() {
    let pki = Pki::new();
    let files = fedport::identity::TlsFiles {
        cert: pki.node.cert.clone(),
        key: pki.node.key.clone(),
        ca: pki.ca.clone(),
    };
    let ups = [
        ("http", upstream::start(Proto::Http1)),
        ("h2c", upstream::start(Proto::H2c)),
        ("https-h2", upstream::start_tls(Proto::H2c, &files)),
        ("https-h1", upstream::start_tls(Proto::Http1, &files)),
    ];
    let mut services = String::new();
    for (name, up) in &ups {
        let proto = if name.ends_with("h1") || *name == "http" {
            Proto::Http1
        } else {
            Proto::H2c
        };
        // a granted service and a secret one on the same upstream, and one with an
        // authority of its own
        for (svc, extra) in [
            ("pub", ""),
            ("secret", ""),
            ("named", "authority = \"named.internal.example:8443\"\n"),
        ] {
            services.push_str(&format!(
                "[[service]]\nname = \"{svc}-{}\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n{extra}",
                name.replace('-', ""),
                up.url(proto)
            ));
        }
    }
    let mut rules = String::new();
    for (name, _) in &ups {
        for svc in ["pub", "named"] {
            rules.push_str(&format!(
                "[[allow]]\nfrom = \"spiffe://fed.test/client/alice\"\nto = \"{svc}-{}\"\n",
                name.replace('-', "")
            ));
        }
    }
    let fp = Fedport::start(&node_config_with_rules(&pki, &services, &rules));
    let port = fp.port("internal");
    for (name, up) in &ups {
        let n = name.replace('-', "");
        let before = up.hits();
        for caller in ["h1", "h2"] {
            let mut cases = Vec::new();
            let mut wants = Vec::new();
            for (host, svc, want) in [
                // a host that names no service: routed by fed-service, told its own name
                (
                    "127.0.0.1:7443".to_owned(),
                    format!("pub-{n}"),
                    Ok(format!("pub-{n}")),
                ),
                (
                    "localhost".to_owned(),
                    format!("named-{n}"),
                    Ok("named.internal.example:8443".into()),
                ),
                // the secret service's host, on a request routed to the granted one
                (
                    format!("secret-{n}.fed.test"),
                    format!("pub-{n}"),
                    Err("misdirected"),
                ),
            ] {
                let host: &'static str = Box::leak(host.into_boxed_str());
                let svc: &'static str = Box::leak(svc.into_boxed_str());
                let (authority, mut headers) = match caller {
                    "h2" => (Some(host), vec![]),
                    _ => (None, vec![("host", host)]),
                };
                headers.push(("fed-service", svc));
                cases.push(Case {
                    name: format!("{name} {caller} {host} -> {svc}"),
                    method: "GET",
                    path: "/who",
                    authority,
                    headers,
                    body: vec![],
                    want: Served,
                });
                wants.push(want);
            }
            let results = run(&pki, port, caller, &cases);
            for ((c, r), want) in cases.iter().zip(results).zip(wants) {
                match want {
                    Ok(authority) => {
                        assert_eq!(r["status"], 200, "{}: {r}", c.name);
                        let seen: serde_json::Value =
                            serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
                        assert_eq!(seen["authority"], authority.as_str(), "{}: {seen}", c.name);
                    }
                    Err(reason) => {
                        assert_eq!(r["headers"]["fed-refused"], reason, "{}: {r}", c.name)
                    }
                }
            }
        }
        assert_eq!(
            up.hits() - before,
            4,
            "{name}: the served calls, and only those"
        );
    }
}
