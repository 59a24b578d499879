//! What a service accepts reaches it, and nothing else: content types outside its
//! `formats` get 415, bodies over `max_message_bytes` get 413 — declared or streamed —
//! each with a JSON reason, and the service sees none of them.

use crate::support::upstream::{self, Proto};
use crate::support::{curl, node_config, Fedport, Pki};

#[test]
fn formats_and_sizes_are_enforced_before_the_service_sees_the_body() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = Fedport::start(&node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"inventory\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
             formats = [\"application/json\"]\nmax_message_bytes = \"1KiB\"\n",
            up.url(Proto::H2c)
        ),
    ));
    let c = pki.curl_client();
    let url = format!("https://localhost:{}/count", fp.port("internal"));
    let post = |ctype: &str, data: &str| {
        let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
        let h = format!("content-type: {ctype}");
        a.extend([
            "-H",
            "fed-service: inventory",
            "-H",
            &h,
            "--data-binary",
            data,
            &url,
        ]);
        curl(&a)
    };
    let reason = |body: &str| -> String {
        let v: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
        v["error"]["reason"].as_str().unwrap_or("").to_owned()
    };

    let (code, body, _) = post(
        "application/json; charset=utf-8",
        r#"{"sku":"apple","count":1}"#,
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(up.hits(), 1);

    let (code, body, _) = post("text/plain", "hello");
    assert_eq!((code, reason(&body).as_str()), (415, "format"), "{body}");

    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2000));
    let (code, body, _) = post("application/json", &big);
    assert_eq!(
        (code, reason(&body).as_str()),
        (413, "size"),
        "declared too large: {body}"
    );
    assert_eq!(up.hits(), 1, "refused before the service saw anything");

    // a request without a body needs no content type
    let url_get = format!("https://localhost:{}/v1/items", fp.port("internal"));
    let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
    a.extend(["-H", "fed-service: inventory", &url_get]);
    assert_eq!(curl(&a).0, 200);
    assert_eq!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="format"}"#),
        1.0
    );
    assert_eq!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="size"}"#),
        1.0
    );
}

/// A body of `n` chunks of 4 KiB whose length is not declared.
struct Chunks(usize);

impl http_body::Body for Chunks {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.0 == 0 {
            return std::task::Poll::Ready(None);
        }
        self.0 -= 1;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from(
            vec![b' '; 4096],
        )))))
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_streamed_body_is_refused_once_it_passes_the_limit() {
    use http_body_util::BodyExt;
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = Fedport::start(&node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"inventory\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
             formats = [\"application/json\"]\nmax_message_bytes = \"8KiB\"\n",
            up.url(Proto::H2c)
        ),
    ));
    let mut client = crate::support::h2_connect::<Chunks>(&pki, fp.addr("internal")).await;
    let port = fp.port("internal");
    let send = |n: usize| {
        http::Request::post(format!("https://localhost:{port}/count"))
            .header("fed-service", "inventory")
            .header("content-type", "application/json")
            .body(Chunks(n))
            .unwrap()
    };
    // within the limit, no length declared: streamed through
    let resp = client.send_request(send(2)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], br#"{"bytes":8192}"#);
    // past it: 413 with the size reason, and the service never got a complete body
    let resp = client.send_request(send(64)).await.unwrap();
    assert_eq!(resp.status(), 413);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["reason"], "size", "{v}");
    assert_eq!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="size"}"#),
        1.0
    );
}

#[test]
fn json_bodies_are_validated_against_their_route_schema() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let schema =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/schemas/reserve.json");
    let fp = Fedport::start(&node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"inventory\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
             formats = [\"application/json\"]\n\
             schema = {{ json = {{ \"POST /v1/reserve\" = \"{s}\", \"PUT /v1/orders/{{id}}\" = \"{s}\" }} }}\n",
            up.url(Proto::H2c),
            s = schema.display()
        ),
    ));
    let c = pki.curl_client();
    let port = fp.port("internal");
    let send = |verb: &str, path: &str, data: &str| {
        let url = format!("https://localhost:{port}{path}");
        let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
        a.extend([
            "-X",
            verb,
            "-H",
            "fed-service: inventory",
            "-H",
            "content-type: application/json",
        ]);
        a.extend(["--data-binary", data, &url]);
        let (code, body, _) = curl(&a);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        (code, v)
    };
    let (code, _) = send("POST", "/v1/reserve", r#"{"sku":"apple","count":2}"#);
    assert_eq!(code, 200);
    let first = |v: &serde_json::Value, k: &str| {
        v["error"]["violations"][0][k]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    let cases = [
        (r#"{"sku":5,"count":2}"#, "/sku", "type"),
        (r#"{"sku":"apple"}"#, "", "required"),
        (
            r#"{"sku":"apple","count":2,"extra":true}"#,
            "",
            "additionalProperties",
        ),
        ("hello", "", "json"),
    ];
    for (body, path, keyword) in cases {
        let (code, v) = send("POST", "/v1/reserve", body);
        assert_eq!(code, 400, "{body}: {v}");
        assert_eq!(v["error"]["reason"], "schema", "{v}");
        assert_eq!(
            (first(&v, "path"), first(&v, "keyword")),
            (path.to_owned(), keyword.to_owned()),
            "{body}: {v}"
        );
    }
    // several violations are all listed
    let (_, v) = send("POST", "/v1/reserve", r#"{"sku":5,"count":0,"x":1}"#);
    assert_eq!(
        v["error"]["violations"].as_array().map(Vec::len),
        Some(3),
        "{v}"
    );
    // nesting deeper than the parser allows is refused, not followed
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let (code, v) = send("POST", "/v1/reserve", &deep);
    assert_eq!((code, first(&v, "keyword").as_str()), (400, "json"), "{v}");
    // templates: /v1/orders/{id} is validated, a longer path is not this route
    assert_eq!(send("PUT", "/v1/orders/42", r#"{"sku":1}"#).0, 400);
    assert_eq!(
        send("PUT", "/v1/orders/42", r#"{"sku":"a","count":1}"#).0,
        200
    );
    assert_eq!(send("PUT", "/v1/orders/42/notes", "[]").0, 200);
    assert_eq!(
        up.hits(),
        3,
        "only valid or unschemed bodies reached the service"
    );
    // the right document in the wrong content type
    let url = format!("https://localhost:{port}/v1/reserve");
    let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
    a.extend([
        "-H",
        "fed-service: inventory",
        "-H",
        "content-type: text/plain",
    ]);
    a.extend(["--data-binary", r#"{"sku":"apple","count":2}"#, &url]);
    let (code, body, _) = curl(&a);
    assert_eq!(code, 415, "{body}");
    assert!(body.contains(r#""reason":"format""#), "{body}");
    assert_eq!(up.hits(), 3);
    assert_eq!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="schema"}"#),
        7.0
    );
    // counted by the route they were sent to, never by a raw path
    let by_route = |route: &str, reason: &str| {
        fp.metric(&format!(
            r#"fedport_message_rejections_total{{service="inventory",method="{route}",reason="{reason}"}}"#
        ))
    };
    assert_eq!(by_route("POST /v1/reserve", "schema"), 6.0);
    assert_eq!(by_route("PUT /v1/orders/{id}", "schema"), 1.0);
    assert_eq!(by_route("POST /v1/reserve", "format"), 1.0);
}

/// A gRPC message whose length prefix declares 1 GiB is refused on the prefix, with
/// RESOURCE_EXHAUSTED, whether or not the service validates its messages: fedport
/// stops reading the stream, and its memory does not grow by what the client pushes.
#[tokio::test(flavor = "current_thread")]
async fn an_oversized_length_prefix_is_refused_before_its_body_is_read() {
    use bytes::Bytes;
    use http_body_util::channel::Channel;
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let proto =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proto/test.proto");
    let fp = Fedport::start(&node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"sink\"\nprotocol = \"grpc\"\nendpoints = [\"{0}\"]\n\
             grpc_services = [\"big.Sink\"]\nmax_message_bytes = \"1MiB\"\n\
             [[service]]\nname = \"echo\"\nprotocol = \"grpc\"\nendpoints = [\"{0}\"]\n\
             schema = {{ proto = [\"{1}\"] }}\n",
            up.url(Proto::H2c),
            proto.display()
        ),
    ));
    let before = fp.peak_rss_kib();
    let port = fp.port("internal");
    let chunk = Bytes::from(vec![0u8; 256 << 10]);
    for path in ["/big.Sink/Put", "/test.Echo/Say"] {
        let mut s = crate::support::h2_connect::<Channel<Bytes>>(&pki, fp.addr("internal")).await;
        let (mut tx, body) = Channel::<Bytes>::new(1);
        let req = http::Request::post(format!("https://localhost:{port}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap();
        let answer = tokio::spawn(s.send_request(req));
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&(1u32 << 30).to_be_bytes());
        tx.send_data(Bytes::from(prefix)).await.unwrap();
        // push up to 256 MiB of the declared message, for at most 5 s
        let mut pushed: u64 = 0;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while pushed < 256 << 20 && tx.send_data(chunk.clone()).await.is_ok() {
                pushed += chunk.len() as u64;
            }
        })
        .await;
        let resp = tokio::time::timeout(std::time::Duration::from_secs(5), answer)
            .await
            .expect("an answer")
            .unwrap()
            .unwrap();
        assert_eq!(
            resp.headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap()),
            Some("8"),
            "{path}: RESOURCE_EXHAUSTED in a trailers-only answer: {resp:?}"
        );
        eprintln!(
            "{path}: the client pushed {} KiB before fedport stopped reading",
            pushed >> 10
        );
        assert!(
            pushed < 32 << 20,
            "{path}: fedport kept reading a refused message ({pushed} bytes)"
        );
    }
    let peak = fp.peak_rss_kib();
    eprintln!("fedport peak RSS {before} KiB before, {peak} KiB after");
    assert!(
        peak < before + 16 * 1024,
        "memory grew by the declared size: {before} → {peak} KiB"
    );
    assert_eq!(
        fp.metric(
            r#"fedport_message_rejections_total{service="sink",method="other",reason="size"}"#
        ),
        1.0
    );
    assert_eq!(
        fp.metric(
            r#"fedport_message_rejections_total{service="echo",method="test.Echo/Say",reason="size"}"#
        ),
        1.0
    );
}

/// What servers read differently from a plain comparison cannot carry a request past
/// validation: an upper-case gRPC content type is still gRPC; a JSON route is still
/// validated behind a trailing slash, `;params` or percent-escapes, and for a body
/// that claims to be gRPC; a path with dot segments is refused outright.
#[test]
fn other_spellings_of_a_request_do_not_get_it_past_validation() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let fp = Fedport::start(&node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"echo\"\nprotocol = \"grpc\"\nendpoints = [\"{0}\"]\n\
             schema = {{ proto = [\"{1}\"] }}\n\
             [[service]]\nname = \"inventory\"\nprotocol = \"http\"\nendpoints = [\"{0}\"]\n\
             schema = {{ json = {{ \"POST /v1/reserve\" = \"{2}\" }} }}\n",
            up.url(Proto::H2c),
            root.join("tests/fixtures/proto/test.proto").display(),
            root.join("examples/schemas/reserve.json").display(),
        ),
    ));
    let c = pki.curl_client();
    let port = fp.port("internal");
    let dir = tempfile::tempdir().unwrap();
    let post = |service: &str, ctype: &str, path: &str, data: &[u8], extra: &[&str]| {
        let file = dir.path().join("body");
        std::fs::write(&file, data).unwrap();
        let at = format!("@{}", file.display());
        let (s, t) = (
            format!("fed-service: {service}"),
            format!("content-type: {ctype}"),
        );
        let url = format!("https://localhost:{port}{path}");
        let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
        a.extend(["-H", &s, "-H", &t, "-H", "te: trailers"]);
        a.extend(extra);
        a.extend(["--data-binary", &at, &url]);
        curl(&a)
    };
    let bad_doc = br#"{"sku":5,"count":2}"#;
    for path in [
        "/v1/reserve/",
        "/v1/reserve;x=1",
        "/v1/%72eserve",
        "//v1/reserve",
    ] {
        let (code, body, _) = post("inventory", "application/json", path, bad_doc, &[]);
        assert_eq!(code, 400, "{path}: {body}");
        assert!(body.contains(r#""reason":"schema""#), "{path}: {body}");
    }
    // a body for a JSON route under another content type is refused, never passed on
    // as something the service would parse differently (a gRPC caller is told so in
    // gRPC)
    for ctype in [
        "application/grpc",
        "application/x-www-form-urlencoded",
        "text/plain",
    ] {
        let (code, body, _) = post("inventory", ctype, "/v1/reserve", bad_doc, &[]);
        if ctype != "application/grpc" {
            assert_eq!(code, 415, "{ctype}: {body}");
            assert!(body.contains(r#""reason":"format""#), "{ctype}: {body}");
        }
    }
    crate::support::wait_until(
        "three refused as format",
        std::time::Duration::from_secs(5),
        || fp.metric(r#"fedport_rejections_total{listener="internal",reason="format"}"#) >= 3.0,
    );
    crate::support::wait_until(
        "the refusals counted",
        std::time::Duration::from_secs(5),
        || {
            fp.metric(
            r#"fedport_message_rejections_total{service="inventory",method="POST /v1/reserve",reason="schema"}"#,
        ) >= 4.0
        },
    );
    assert_eq!(
        fp.metric(
            r#"fedport_message_rejections_total{service="inventory",method="POST /v1/reserve",reason="schema"}"#
        ),
        4.0
    );

    for path in ["/v1/x/../reserve", "/v1/x/%2e%2e/reserve", "/v1%2freserve"] {
        let (code, body, _) = post(
            "inventory",
            "application/json",
            path,
            bad_doc,
            &["--path-as-is"],
        );
        assert_eq!(code, 400, "{path}: {body}");
        assert!(body.contains(r#""reason":"bad_request""#), "{path}: {body}");
    }
    assert_eq!(up.hits(), 0, "none of them reached a service");

    // test.Msg.text (a string) holding invalid UTF-8, framed
    let bad_msg = [0u8, 0, 0, 0, 4, 0x0a, 0x02, 0xff, 0xfe];
    let (_, head, _) = post(
        "echo",
        "Application/GRPC",
        "/test.Echo/Say",
        &bad_msg,
        &["-i", "-H", "x-read-body: 1"],
    );
    assert!(
        head.contains("grpc-status: 3") && head.contains("invalid UTF-8"),
        "Application/GRPC is gRPC and its message is checked: {head}"
    );
}
