//! The peer port over real mutual TLS with curl: who gets in, what the upstream sees,
//! and how refusals read.

use crate::support::upstream::{self, Proto};
use crate::support::{curl, node_config, Fedport, Pki};

fn start(pki: &Pki, h1: &upstream::Upstream, h2: &upstream::Upstream) -> Fedport {
    Fedport::start(&node_config(
        pki,
        &format!(
            r#"
[[service]]
name = "plain"
protocol = "http"
endpoints = ["{}"]

[[service]]
name = "multi"
protocol = "http"
endpoints = ["{}"]
timeout = "500ms"

[[service]]
name = "down"
protocol = "http"
endpoints = ["http://127.0.0.1:9"]
"#,
            h1.url(Proto::Http1),
            h2.url(Proto::H2c)
        ),
    ))
}

fn seen(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn client_cert_reaches_http1_and_h2c_upstreams_with_its_identity() {
    let pki = Pki::new();
    let (h1, h2) = (upstream::start(Proto::Http1), upstream::start(Proto::H2c));
    let fp = start(&pki, &h1, &h2);
    let port = fp.port("internal");
    let mut args: Vec<String> = pki.curl_client();
    for (svc, version) in [("plain", "HTTP/1.1"), ("multi", "HTTP/2.0")] {
        let url = format!("https://{svc}.fed.test:{port}/hello?x=1");
        let resolve = format!("{svc}.fed.test:{port}:127.0.0.1");
        args.truncate(6);
        args.extend(["--resolve".into(), resolve, url]);
        // a caller-supplied identity header must never reach the service
        args.extend([
            "-H".into(),
            "fed-peer: spiffe://fed.test/admin".into(),
            "-H".into(),
            "fed-hops: 9".into(),
            // read as HTTP_FED_PEER by CGI-style servers, like fed-peer
            "-H".into(),
            "fed_peer: spiffe://fed.test/admin".into(),
        ]);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, body, _) = curl(&a);
        assert_eq!(code, 200, "{svc}: {body}");
        let v = seen(&body);
        assert_eq!(v["path"], "/hello");
        assert_eq!(v["version"], version, "{svc} upstream protocol");
        assert_eq!(
            v["headers"]["fed-peer"],
            serde_json::json!(["spiffe://fed.test/client/alice"]),
            "{svc}: {body}"
        );
        assert!(v["headers"].get("fed-hops").is_none(), "{body}");
        assert!(v["headers"].get("fed_peer").is_none(), "{body}");
        assert!(v["headers"]["x-request-id"][0]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
    }
    assert_eq!(h1.hits(), 1);
    assert_eq!(h2.hits(), 1);
    assert!(
        fp.metric(r#"fedport_requests_total{listener="internal",service="plain",method="other",code="200"}"#)
            >= 1.0
    );
}

#[test]
fn handshake_fails_without_a_valid_client_cert_and_nothing_reaches_the_upstream() {
    let pki = Pki::new();
    let (h1, h2) = (upstream::start(Proto::Http1), upstream::start(Proto::H2c));
    let fp = start(&pki, &h1, &h2);
    let url = format!("https://localhost:{}/", fp.port("internal"));
    let ca = pki.ca.display().to_string();
    let stranger = (
        pki.stranger.cert.display().to_string(),
        pki.stranger.key.display().to_string(),
    );
    let expired = (
        pki.expired.cert.display().to_string(),
        pki.expired.key.display().to_string(),
    );
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "no certificate",
            vec!["--cacert", &ca, "-H", "fed-service: plain", &url],
        ),
        (
            "another CA",
            vec![
                "--cacert",
                &ca,
                "--cert",
                &stranger.0,
                "--key",
                &stranger.1,
                "-H",
                "fed-service: plain",
                &url,
            ],
        ),
        (
            "expired",
            vec![
                "--cacert",
                &ca,
                "--cert",
                &expired.0,
                "--key",
                &expired.1,
                "-H",
                "fed-service: plain",
                &url,
            ],
        ),
    ];
    for (what, args) in &cases {
        let (code, body, exit) = curl(args);
        assert_eq!(code, 0, "{what}: got an HTTP answer: {body}");
        assert_ne!(exit, 0, "{what}: curl must fail");
    }
    // openssl s_client, a second client nobody here wrote, is refused the same way
    let out = std::process::Command::new("timeout")
        .args([
            "10",
            "openssl",
            "s_client",
            "-ign_eof",
            "-connect",
            &format!("127.0.0.1:{}", fp.port("internal")),
            "-CAfile",
            &ca,
            "-tls1_3",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("alert") || text.contains("certificate required"),
        "{text}"
    );
    assert_eq!(h1.hits() + h2.hits(), 0, "nothing may reach an upstream");
    crate::support::wait_until("failure metrics", std::time::Duration::from_secs(5), || {
        fp.metric(
            r#"fedport_tls_handshake_failures_total{listener="internal",reason="no_client_cert"}"#,
        ) >= 2.0
            && fp.metric(
                r#"fedport_tls_handshake_failures_total{listener="internal",reason="unknown_ca"}"#,
            ) >= 1.0
            && fp.metric(
                r#"fedport_tls_handshake_failures_total{listener="internal",reason="expired"}"#,
            ) >= 1.0
    });
}

#[test]
fn refusals_answer_in_json_with_the_documented_status() {
    let pki = Pki::new();
    let (h1, h2) = (upstream::start(Proto::Http1), upstream::start(Proto::H2c));
    let fp = start(&pki, &h1, &h2);
    let port = fp.port("internal");
    let url = |p: &str| format!("https://localhost:{port}{p}");
    let c = pki.curl_client();
    let base: Vec<&str> = c.iter().map(String::as_str).collect();
    let cases = [
        ("nope", "/", 404, "unknown_service"),
        ("down", "/", 503, "no_healthy_target"),
        ("multi", "/slow?ms=3000", 504, "deadline"),
    ];
    for (svc, path, status, reason) in cases {
        let hdr = format!("fed-service: {svc}");
        let u = url(path);
        let mut a = base.clone();
        a.extend(["-H", &hdr, "-H", "x-request-id: req-42", &u]);
        let (code, body, _) = curl(&a);
        assert_eq!(code, status, "{svc}: {body}");
        let v = seen(&body);
        assert_eq!(v["error"]["reason"], reason, "{body}");
        assert_eq!(v["error"]["request_id"], "req-42");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(svc),
            "{body}"
        );
        assert!(
            fp.metric(&format!(
                r#"fedport_rejections_total{{listener="internal",reason="{reason}"}}"#
            )) >= 1.0
        );
    }
    // the upstream's own error status passes through untouched
    let u = url("/status/418");
    let mut a = base.clone();
    a.extend(["-H", "fed-service: plain", &u]);
    assert_eq!(curl(&a).0, 418);
    // a refusal is logged once, with its request id
    let log = fp.log_text();
    assert_eq!(log.matches("req-42").count(), 3, "{log}");
}

#[test]
fn local_listener_speaks_cleartext_http1_and_h2_prior_knowledge() {
    let pki = Pki::new();
    let (h1, h2) = (upstream::start(Proto::Http1), upstream::start(Proto::H2c));
    let fp = start(&pki, &h1, &h2);
    let base = format!("http://127.0.0.1:{}/x", fp.port("local"));
    for flag in ["--http1.1", "--http2-prior-knowledge"] {
        let (code, body, _) = curl(&[
            flag,
            "-H",
            "fed-service: multi",
            "-H",
            "fed-peer: forged",
            &base,
        ]);
        assert_eq!(code, 200, "{flag}: {body}");
        assert_eq!(
            seen(&body)["headers"]["fed-peer"],
            serde_json::json!(["local"])
        );
    }
}

#[test]
fn https_endpoints_use_the_node_certificate_and_connections_are_recycled() {
    let pki = Pki::new();
    let h1 = upstream::start(Proto::Http1);
    // node B: a dedicated mTLS port in front of the HTTP/1.1 upstream
    let b = Fedport::start(&format!(
        "[node]\nname = \"b\"\nregion = \"r\"\nworkers = 1\n{}\n[admin]\nbind = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"internal\"\nbind = \"127.0.0.1:0\"\nservice = \"plain\"\n\
         [[service]]\nname = \"plain\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
         [[allow]]\nfrom = \"spiffe://fed.test/node/a\"\nto = \"plain\"\n",
        pki.tls_section(),
        h1.url(Proto::Http1)
    ));
    // node A: reaches B over https:// with its own certificate, recycling every 3 requests
    let a = Fedport::start(&format!(
        "[node]\nname = \"a\"\nregion = \"r\"\nworkers = 1\nupstream_connections = 1\nupstream_max_requests = 3\n{}\n\
         [admin]\nbind = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"local\"\nrole = \"local\"\nbind = \"127.0.0.1:0\"\n\
         [[service]]\nname = \"far\"\nprotocol = \"http\"\nendpoints = [\"https://localhost:{}\"]\n\
         [[allow]]\nfrom = \"local\"\nto = \"far\"\n",
        pki.tls_section(),
        b.port("internal")
    ));
    let url = format!("http://127.0.0.1:{}/via-b", a.port("local"));
    for _ in 0..9 {
        let (code, body, _) = curl(&["-H", "fed-service: far", &url]);
        assert_eq!(code, 200, "{body}\n{}", a.log_text());
        let v = seen(&body);
        assert_eq!(v["path"], "/via-b");
        // B vouches for A's node certificate; A's own `fed-peer: local` never crosses
        assert_eq!(
            v["headers"]["fed-peer"],
            serde_json::json!(["spiffe://fed.test/node/a"]),
            "{body}"
        );
    }
    let connects = a.metric(r#"fedport_upstream_connects_total{service="far",result="ok"}"#);
    assert_eq!(connects, 3.0, "9 requests, a new connection every 3");
}

#[test]
fn requests_spread_over_every_endpoint_of_a_service() {
    let pki = Pki::new();
    let ups: Vec<_> = (0..3).map(|_| upstream::start(Proto::H2c)).collect();
    let urls: Vec<String> = ups
        .iter()
        .map(|u| format!("\"{}\"", u.url(Proto::H2c)))
        .collect();
    let fp = Fedport::start(&node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"wide\"\nprotocol = \"http\"\nendpoints = [{}]\n",
            urls.join(", ")
        ),
    ));
    let url = format!("http://127.0.0.1:{}/spread", fp.port("local"));
    for _ in 0..60 {
        assert_eq!(curl(&["-H", "fed-service: wide", &url]).0, 200);
    }
    let hits: Vec<usize> = ups.iter().map(|u| u.hits()).collect();
    assert_eq!(hits.iter().sum::<usize>(), 60);
    assert!(
        hits.iter().all(|&h| h >= 5),
        "power of two choices reaches every endpoint: {hits:?}"
    );
}

#[test]
fn rules_deny_by_default_with_403_and_no_upstream_contact() {
    let pki = Pki::new();
    let h1 = upstream::start(Proto::Http1);
    let fp = Fedport::start(&crate::support::node_config_with_rules(
        &pki,
        &format!(
            "[[service]]\nname = \"plain\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
             [[service]]\nname = \"secret\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
            h1.url(Proto::Http1),
            h1.url(Proto::Http1)
        ),
        "[[allow]]\nfrom = \"spiffe://fed.test/client/*\"\nto = \"plain\"\nmethods = [\"GET /v1/\"]\n",
    ));
    let c = pki.curl_client();
    let base: Vec<&str> = c.iter().map(String::as_str).collect();
    let port = fp.port("internal");
    let cases = [
        ("plain", "GET", "/v1/items", 200),
        ("plain", "POST", "/v1/items", 403),
        ("plain", "GET", "/admin", 403),
        ("secret", "GET", "/v1/items", 403),
    ];
    for (svc, verb, path, want) in cases {
        let hdr = format!("fed-service: {svc}");
        let url = format!("https://localhost:{port}{path}");
        let mut a = base.clone();
        a.extend(["-X", verb, "-H", &hdr, &url]);
        let (code, body, _) = curl(&a);
        assert_eq!(code, want, "{verb} {svc}{path}: {body}");
        if want == 403 {
            let v = seen(&body);
            assert_eq!(v["error"]["reason"], "denied");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(
                msg.contains("spiffe://fed.test/client/alice") && msg.contains(svc),
                "{msg}"
            );
            let other = if svc == "plain" { "secret" } else { "plain" };
            assert!(
                !msg.contains(other),
                "a denial never names other services: {msg}"
            );
        }
    }
    assert_eq!(h1.hits(), 1, "only the allowed request reached a service");
    // the local listener's identity `local` has no rule either
    let url = format!("http://127.0.0.1:{}/v1/items", fp.port("local"));
    assert_eq!(curl(&["-H", "fed-service: plain", &url]).0, 403);
    assert_eq!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="denied"}"#),
        3.0
    );
}

/// A body ending in trailers that claim fedport's headers: the service gets the body
/// and the caller's other trailers, never a `fed-*` one.
#[tokio::test(flavor = "current_thread")]
async fn request_trailers_cannot_carry_fedports_headers() {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    let pki = Pki::new();
    let (h1, h2) = (upstream::start(Proto::Http1), upstream::start(Proto::H2c));
    let fp = start(&pki, &h1, &h2);
    let port = fp.port("internal");
    let mut s = crate::support::h2_connect::<Frames>(&pki, fp.addr("internal")).await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("fed-peer", "spiffe://fed.test/admin".parse().unwrap());
    trailers.insert("fed_caller", "spiffe://fed.test/admin".parse().unwrap());
    trailers.insert("x-checksum", "abc".parse().unwrap());
    let frames = Frames(
        vec![
            http_body::Frame::data(Bytes::from_static(b"payload")),
            http_body::Frame::trailers(trailers),
        ]
        .into(),
    );
    let req = http::Request::post(format!("https://multi.fed.test:{port}/t"))
        .header("x-read-body", "1")
        .body(frames)
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["trailers"]["x-checksum"], "abc", "{v}");
    assert!(v["trailers"].get("fed-peer").is_none(), "{v}");
    assert!(v["trailers"].get("fed_caller").is_none(), "{v}");
}

/// A request body of given frames, trailers included.
struct Frames(std::collections::VecDeque<http_body::Frame<bytes::Bytes>>);

impl http_body::Body for Frames {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}
