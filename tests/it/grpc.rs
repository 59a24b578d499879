//! gRPC through fedport with a client and a server nobody here wrote (Python grpcio):
//! unary and bidirectional streaming calls, trailers, status codes passing through.

use crate::support::{Fedport, Pki};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Starts the grpcio upstream and returns it with its port.
fn grpc_upstream() -> (Child, u16) {
    let mut c = Command::new(python())
        .arg(crate::support::py("grpc_upstream.py"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 with grpcio (scripts/install-test-deps.sh)");
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("grpc upstream said {line:?}"));
    (Child(c), port)
}

/// Runs one of the grpcio client scripts against fedport's peer port with the test
/// client's certificate and returns the JSON it printed.
fn run_client(script: &str, fp: &Fedport, pki: &Pki) -> serde_json::Value {
    let out = Command::new(python())
        .arg(crate::support::py(script))
        .arg(fp.addr("internal").to_string())
        .args([&pki.ca, &pki.client.cert, &pki.client.key])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// gRPC calls in raw frames (tests/py/raw_request.py), each body in one DATA frame
/// that ends the stream; one report each.
fn raw_grpc<const N: usize>(
    pki: &Pki,
    fp: &Fedport,
    calls: [(&str, Vec<u8>); N],
) -> [serde_json::Value; N] {
    let cases: Vec<_> = calls
        .iter()
        .map(|(path, body)| {
            serde_json::json!({
                "proto": "h2", "method": "POST", "path": path, "authority": "localhost",
                "headers": [["content-type", "application/grpc"], ["te", "trailers"]],
                "body_hex": body.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cases.json");
    std::fs::write(&file, serde_json::Value::from(cases).to_string()).unwrap();
    let file = file.display().to_string();
    let out = crate::support::PyClient::new(
        pki,
        "raw_request.py",
        fp.port("internal"),
        &pki.client,
        &[&file],
    )
    .stdout();
    let reports: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    reports
        .try_into()
        .unwrap_or_else(|r| panic!("{N} reports expected: {r:?}"))
}

#[test]
fn grpcio_unary_and_bidi_streaming_with_status_and_trailers() {
    let pki = Pki::new();
    let (_up, port) = grpc_upstream();
    let fp = Fedport::start(&crate::support::node_config_with_rules(
        &pki,
        &format!(
            r#"
[[service]]
name = "echo"
protocol = "grpc"
endpoints = ["h2c://127.0.0.1:{port}"]
grpc_services = ["test.Echo"]
max_message_bytes = "1KiB"

[[service]]
name = "down"
protocol = "grpc"
endpoints = ["h2c://127.0.0.1:9"]
grpc_services = ["down.Svc"]
"#
        ),
        r#"
[[allow]]
from = "spiffe://fed.test/client/*"
to = "echo"
methods = ["test.Echo/Say", "test.Echo/Chat", "test.Echo/Fail"]
[[allow]]
from = "spiffe://fed.test/client/alice"
to = "down"
"#,
    ));
    let v = run_client("grpc_client.py", &fp, &pki);

    let u = &v["unary"];
    assert_eq!(u["code"], "OK");
    assert_eq!(u["response"], "0a0568656c6c6f");
    assert_eq!(
        u["trailing"]["x-trailer"], "t1",
        "trailers pass through: {u}"
    );
    assert_eq!(
        u["initial"]["seen-peer"], "spiffe://fed.test/client/alice",
        "{u}"
    );

    let b = &v["bidi"];
    assert_eq!(b["code"], "OK");
    assert_eq!(
        b["got"], b["sent"],
        "every streamed message comes back in order"
    );

    let f = &v["fail"];
    assert_eq!(
        f["code"], "NOT_FOUND",
        "an upstream status passes through unchanged: {f}"
    );
    assert_eq!(f["details"], "nothing here: é");
    assert_eq!(f["trailing"]["x-why"], "because");

    assert_eq!(v["unknown"]["code"], "UNIMPLEMENTED", "{}", v["unknown"]);
    assert!(v["unknown"]["details"]
        .as_str()
        .unwrap()
        .contains("nope.Missing"));
    assert_eq!(v["down"]["code"], "UNAVAILABLE", "{}", v["down"]);
    assert_eq!(v["denied"]["code"], "PERMISSION_DENIED", "{}", v["denied"]);
    assert_eq!(v["big"]["code"], "RESOURCE_EXHAUSTED", "{}", v["big"]);
    assert_eq!(
        v["big_then_small"]["code"], "OK",
        "the channel still works: {}",
        v["big_then_small"]
    );
    assert!(v["denied"]["details"]
        .as_str()
        .unwrap()
        .contains("test.Echo/Secret"));

    assert!(
        fp.metric(
            r#"fedport_requests_total{listener="internal",service="echo",method="other",code="OK"}"#
        ) >= 2.0
    );
    assert!(
        fp.metric(r#"fedport_requests_total{listener="internal",service="echo",method="other",code="NOT_FOUND"}"#)
            >= 1.0
    );
    assert!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="unknown_service"}"#)
            >= 1.0
    );
}

#[test]
fn protobuf_messages_are_validated_against_the_schema_as_they_stream() {
    let pki = Pki::new();
    let (_up, port) = grpc_upstream();
    let protos = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proto");
    let fp = Fedport::start(&crate::support::node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"echo\"\nprotocol = \"grpc\"\nendpoints = [\"h2c://127.0.0.1:{port}\"]\n\
             schema = {{ proto = [\"{0}/test.proto\"], strict = true }}\n\
             [[service]]\nname = \"legacy\"\nprotocol = \"grpc\"\nendpoints = [\"h2c://127.0.0.1:{port}\"]\n\
             schema = {{ proto = [\"{0}/legacy.proto\"], validate_responses = true }}\n",
            protos.display()
        ),
    ));
    let v = run_client("grpc_validate.py", &fp, &pki);
    assert_eq!(v["valid"]["code"], "OK", "{v}");
    for (case, needle) in [
        ("bad_utf8", "UTF-8"),
        ("wrong_wire_type", "wire type"),
        ("truncated", ""),
        ("unknown_field", "unknown field number 2"),
    ] {
        assert_eq!(v[case]["code"], "INVALID_ARGUMENT", "{case}: {}", v[case]);
        let details = v[case]["details"].as_str().unwrap_or("");
        assert!(details.contains(needle), "{case}: {details}");
    }
    assert!(
        v["bad_utf8"]["details"].as_str().unwrap().contains("text"),
        "names the field: {}",
        v["bad_utf8"]
    );
    assert_eq!(
        v["not_in_schema"]["code"], "UNIMPLEMENTED",
        "{}",
        v["not_in_schema"]
    );
    let s = &v["stream"];
    assert_eq!(s["code"], "INVALID_ARGUMENT", "{s}");
    // messages 1-2 may reach the service before the call is reset on its side too
    // (never ended cleanly, which would have it complete a call the caller is told
    // failed); the bad third and everything after never do
    assert!(s["got"].as_array().map_or(0, Vec::len) <= 2, "{s}");
    assert!(
        v["upstream_chat_received"].as_u64().unwrap() <= 2,
        "nothing after the bad message reached the service: {}",
        v["upstream_chat_received"]
    );
    assert_eq!(
        v["upstream_chat_completed"], 0,
        "the service did not complete the call the caller was told failed"
    );
    // the same with the whole stream in one DATA frame that ends it: the valid message
    // goes on, and the service's side is still reset, never ended cleanly
    let frame = |m: &[u8]| {
        let mut f = vec![0u8, 0, 0, 0, m.len() as u8];
        f.extend_from_slice(m);
        f
    };
    let mut chat = frame(b"\x0a\x02m0");
    chat.extend(frame(b"\x0a\x02\xff\xfe"));
    let [chat, stats] = raw_grpc(
        &pki,
        &fp,
        [
            ("/test.Echo/Chat", chat),
            ("/test.Echo/Stats", vec![0u8; 5]),
        ],
    );
    assert_eq!(chat["headers"]["grpc-status"], "3", "{chat}");
    let counts = stats["body"].as_str().unwrap();
    assert!(
        counts.ends_with(&format!("/{}/0", v["upstream_say_received"])),
        "the one-frame call was not completed by the service either: {counts}"
    );

    // gzip: decompressed to be validated; a bomb is refused by its decompressed size
    assert_eq!(v["gzip_valid"]["code"], "OK", "{}", v["gzip_valid"]);
    assert_eq!(v["gzip_bad_utf8"]["code"], "INVALID_ARGUMENT");
    assert!(v["gzip_bad_utf8"]["details"]
        .as_str()
        .unwrap()
        .contains("test.Msg.text"));
    let wire = v["bomb_wire_bytes"].as_u64().unwrap();
    assert!(
        wire < 1 << 20,
        "the bomb is small on the wire: {wire} bytes"
    );
    assert_eq!(
        v["gzip_bomb"]["code"], "RESOURCE_EXHAUSTED",
        "{}",
        v["gzip_bomb"]
    );
    assert_eq!(v["deflate"]["code"], "UNIMPLEMENTED", "{}", v["deflate"]);
    assert!(v["deflate"]["details"]
        .as_str()
        .unwrap()
        .contains("grpc-encoding \"deflate\""));
    let peak = fp.peak_rss_kib();
    assert!(
        peak < 64 * 1024,
        "decompression is bounded: peak RSS {peak} KiB"
    );

    // proto2: required fields, however deep
    assert_eq!(v["order_valid"]["code"], "OK", "{}", v["order_valid"]);
    for (case, field) in [
        (
            "order_missing_id",
            "legacy.Order.id (field 1): required field is missing",
        ),
        (
            "item_missing_sku",
            "legacy.Order.items[0].sku (field 1): required field is missing",
        ),
        ("map_item_missing_sku", "legacy.Order.by_sku[\"k\"].sku"),
    ] {
        assert_eq!(v[case]["code"], "INVALID_ARGUMENT", "{case}: {}", v[case]);
        let details = v[case]["details"].as_str().unwrap_or("");
        assert!(details.contains(field), "{case}: {details}");
    }
    // validate_responses: the service's answer lacks its required id
    assert_eq!(
        v["broken_response"]["code"], "INTERNAL",
        "{}",
        v["broken_response"]
    );
    assert!(v["broken_response"]["details"]
        .as_str()
        .unwrap()
        .contains("response refused by its schema: legacy.Order.id"));

    assert_eq!(
        v["upstream_say_received"], 3,
        "only the valid unary calls (plain, gzip, proto2) reached the service"
    );
    // every refusal is counted, also one made after the answer began (mid-stream)
    let m = fp.admin_get("/metrics");
    let rejected = |reason: &str| {
        let sample =
            format!(r#"fedport_rejections_total{{listener="internal",reason="{reason}"}} "#);
        m.lines()
            .find_map(|l| l.strip_prefix(sample.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(rejected("schema"), 10.0, "{m}");
    assert_eq!(rejected("response_schema"), 1.0, "{m}");
    let by_method = |service: &str, method: &str, reason: &str| {
        fp.metric(&format!(
            r#"fedport_message_rejections_total{{service="{service}",method="{method}",reason="{reason}"}}"#
        ))
    };
    assert_eq!(by_method("echo", "test.Echo/Say", "schema"), 5.0);
    assert_eq!(by_method("echo", "test.Echo/Say", "size"), 1.0);
    assert_eq!(by_method("echo", "test.Echo/Say", "encoding"), 1.0);
    assert_eq!(by_method("echo", "test.Echo/Chat", "schema"), 2.0);
    assert_eq!(by_method("legacy", "legacy.Shop/Place", "schema"), 3.0);
    assert_eq!(
        by_method("legacy", "legacy.Shop/Broken", "response_schema"),
        1.0
    );
}

/// Active health checks speak grpc.health.v1 to gRPC services: NOT_SERVING takes the
/// endpoint out of rotation (metric and /readyz?verbose); with nowhere else to go,
/// requests still reach it rather than being refused.
#[tokio::test(flavor = "current_thread")]
async fn grpc_health_checks_follow_the_service() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let pki = Pki::new();
    let (_up, port) = grpc_upstream();
    let fp = Fedport::start(&crate::support::node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"echo\"\nprotocol = \"grpc\"\nendpoints = [\"h2c://127.0.0.1:{port}\"]\n\
             grpc_services = [\"test.Echo\"]\n\
             health = {{ interval = \"100ms\", unhealthy_threshold = 1, healthy_threshold = 1 }}\n"
        ),
    ));
    let healthy =
        format!(r#"fedport_upstream_healthy{{service="echo",endpoint="h2c://127.0.0.1:{port}"}}"#);
    let mut s = crate::support::h2_connect::<Full<Bytes>>(&pki, fp.addr("internal")).await;
    let p = fp.port("internal");
    let call = |method: &str| {
        http::Request::post(format!("https://localhost:{p}/test.Echo/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x03\x0a\x01x")))
            .unwrap()
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(fp.metric(&healthy), 1.0);
    let resp = s.send_request(call("Unhealthy")).await.unwrap();
    let _ = resp.into_body().collect().await;
    crate::support::wait_until(
        "NOT_SERVING noticed",
        std::time::Duration::from_secs(5),
        || fp.metric(&healthy) == 0.0,
    );
    let v: serde_json::Value = serde_json::from_str(&fp.admin_get("/readyz?verbose")).unwrap();
    assert_eq!(v["services"][0]["endpoints"][0]["available"], false, "{v}");
    assert_eq!(
        v["services"][0]["endpoints"][0]["health_checks_pass"], false,
        "{v}"
    );
    // the only endpoint of a service no peer offers: tried anyway, and it answers
    let resp = s.send_request(call("Say")).await.unwrap();
    let done = resp.into_body().collect().await.unwrap();
    assert_eq!(done.trailers().unwrap()["grpc-status"], "0");
}
