//! Watching the port: `/metrics` read by parsers nobody here wrote (promtool, Python
//! prometheus_client) stays valid and bounded under a scan of random paths and methods;
//! the alert rules and the dashboard use only metrics a node exports; access log lines
//! are JSON with the documented fields; W3C trace context goes on with a new parent.

use crate::support::upstream::{self, Proto};
use crate::support::{node_config, Fedport, Pki};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};

fn series(metrics: &str) -> Vec<&str> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s))
        .collect()
}

fn promtool(args: &[&str], input: &str) -> (bool, String) {
    use std::io::Write;
    let mut c = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/install-test-deps.sh installs Debian's prometheus)");
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "current_thread")]
async fn metrics_are_valid_and_bounded_under_a_scan() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/schemas/reserve.json");
    let fp = Fedport::start(&node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"inventory\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
             schema = {{ json = {{ \"POST /v1/reserve\" = \"{}\" }} }}\n\
             [[peer]]\nname = \"b\"\nregion = \"r\"\naddress = \"127.0.0.1:1\"\n\
             identity = \"spiffe://fed.test/node/b\"\nservices = [\"inventory\"]\n",
            up.url(Proto::H2c),
            schema.display()
        ),
    ));
    let mut s = crate::support::h2_connect::<Full<Bytes>>(&pki, fp.addr("internal")).await;
    let port = fp.port("internal");
    let send = |method: &str, path: &str, service: &str, body: &'static str| {
        http::Request::builder()
            .method(method)
            .uri(format!("https://localhost:{port}{path}"))
            .header("fed-service", service)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    for (m, p, svc, b) in [
        ("GET", "/v1/items", "inventory", ""),
        (
            "POST",
            "/v1/reserve",
            "inventory",
            r#"{"sku":"a","count":1}"#,
        ),
        ("POST", "/v1/reserve", "inventory", r#"{"sku":1}"#),
        ("GET", "/", "nope", ""),
    ] {
        let r = s.send_request(send(m, p, svc, b)).await.unwrap();
        let _ = r.into_body().collect().await;
    }
    let before = fp.admin_get("/metrics");
    // a scanner: 10,000 random methods and paths, to the service and to made-up ones
    let mut rng = fastrand::Rng::with_seed(42);
    let methods = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "HEAD",
    ];
    let mut set = tokio::task::JoinSet::new();
    for i in 0..10_000 {
        let method = if rng.bool() {
            methods[rng.usize(..methods.len())].to_owned()
        } else {
            (0..rng.usize(3..8)).map(|_| rng.uppercase()).collect()
        };
        let path = format!("/{}/{}", rng.u32(..), rng.u64(..));
        let service = if i % 2 == 0 {
            "inventory".to_owned()
        } else {
            format!("svc{}", rng.u32(..))
        };
        let req = http::Request::builder()
            .method(method.as_str())
            .uri(format!("https://localhost:{port}{path}"))
            .header("fed-service", service)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let mut s = s.clone();
        set.spawn(async move {
            if let Ok(r) = s.send_request(req).await {
                let _ = r.into_body().collect().await;
            }
        });
        if set.len() >= 64 {
            set.join_next().await;
        }
    }
    while set.join_next().await.is_some() {}
    let after = fp.admin_get("/metrics");
    let (b, a) = (series(&before).len(), series(&after).len());
    eprintln!("series: {b} before the scan, {a} after 10,000 random requests");
    assert!(
        a <= b + 30,
        "a scan must not grow the series: {b} → {a}\n{}",
        series(&after)
            .into_iter()
            .filter(|l| !before.contains(l))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // valid for promtool, and for Python's parser with no series twice
    let (ok, out) = promtool(&["check", "metrics"], &after);
    assert!(ok, "promtool check metrics:\n{out}");
    let py = Command::new("python3")
        .args([
            "-c",
            "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as p\n\
             seen=set(); n=0\nfor f in p(sys.stdin.read()):\n  for s in f.samples:\n    k=(s.name, tuple(sorted(s.labels.items())))\n    assert k not in seen, k\n    seen.add(k); n+=1\nprint(n)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = py.stdin.as_ref().unwrap();
        stdin.write_all(after.as_bytes()).unwrap();
    }
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // OpenMetrics for scrapers that ask for it
    let om = Command::new("curl")
        .args([
            "-s",
            "-H",
            "Accept: application/openmetrics-text; version=1.0.0",
            &format!("http://{}/metrics", fp.admin.unwrap()),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&om.stdout).ends_with("# EOF\n"));

    // declared methods are labels; the scan folded into `other`
    assert!(
        after.contains(r#"method="POST /v1/reserve""#),
        "the JSON Schema route is a method label"
    );
    for needle in [
        "fedport_request_duration_seconds_bucket{le=\"0.000025\",listener=\"internal\",service=\"inventory\"}",
        "fedport_request_bytes_total",
        "fedport_response_bytes_total",
        "fedport_tls_handshakes_total",
        "fedport_certificate_expiry_timestamp_seconds{cert=\"node\"}",
        "fedport_build_info{version=",
        "fedport_config_info{",
        "fedport_config_reloads_total{result=\"error\"}",
        "fedport_peer_up{peer=\"b\"}",
        "fedport_traffic_spike{service=\"inventory\",peer=\"\",kind=\"rate\"}",
        "fedport_message_rejections_total{service=\"inventory\",method=\"POST /v1/reserve\",reason=\"schema\"}",
    ] {
        assert!(after.contains(needle), "missing {needle}");
    }

    // the alert rules are valid, and they and the dashboard use only exported metrics
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = root.join("deploy/prometheus/fedport-alerts.yml");
    let out = Command::new("promtool")
        .args(["check", "rules", rules.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // and they fire when they should: promtool's unit tests for the rules
    let cases = root.join("deploy/prometheus/fedport-alerts.test.yml");
    let out = Command::new("promtool")
        .args(["test", "rules", cases.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dashboard = std::fs::read_to_string(root.join("deploy/grafana/fedport.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let text = std::fs::read_to_string(&rules).unwrap() + &dashboard;
    // every family the node declares (a counter with no series yet included)
    let mut exported: HashSet<String> = series(&after)
        .iter()
        .map(|s| s.split('{').next().unwrap().to_owned())
        .collect();
    for l in after.lines() {
        if let Some(name) = l.strip_prefix("# TYPE ").and_then(|r| r.split(' ').next()) {
            for suffix in ["", "_bucket", "_sum", "_count"] {
                exported.insert(format!("{name}{suffix}"));
            }
        }
    }
    let mut used = HashSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("fedport_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        used.insert(name);
    }
    let missing: Vec<_> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "deploy assets use metrics a node does not export: {missing:?}"
    );
}

#[test]
fn access_log_lines_are_json_and_trace_context_goes_on() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let config = node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"inventory\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
            up.url(Proto::H2c)
        ),
    )
    .replace(
        "drain_timeout = \"10s\"",
        "drain_timeout = \"10s\"\naccess_log = true",
    );
    let fp = Fedport::start_with(None, &config, &["--log-format", "json"]);
    let c = pki.curl_client();
    let url = format!("https://localhost:{}/v1/items", fp.port("internal"));
    let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let tp = format!("traceparent: {given}");
    a.extend([
        "-H",
        "fed-service: inventory",
        "-H",
        &tp,
        "-H",
        "tracestate: vendor=opaque",
        "-H",
        "x-request-id: req-123",
        &url,
    ]);
    let (code, body, _) = crate::support::curl(&a);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let seen = v["headers"]["traceparent"][0].as_str().unwrap();
    assert!(
        seen.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && seen.ends_with("-01"),
        "{seen}"
    );
    assert_ne!(seen, given, "a new parent id for this hop");
    assert_eq!(v["headers"]["tracestate"][0], "vendor=opaque");
    assert_eq!(v["headers"]["x-request-id"][0], "req-123");
    // a refusal is logged too
    let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
    a.extend(["-H", "fed-service: nope", &url]);
    assert_eq!(crate::support::curl(&a).0, 404);

    crate::support::wait_until("access lines", std::time::Duration::from_secs(5), || {
        fp.log_text().matches("fedport::access").count() >= 2
    });
    let lines: Vec<serde_json::Value> = fp
        .log_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "fedport::access")
        .collect();
    assert_eq!(access.len(), 2, "{access:?}");
    let ok = access
        .iter()
        .find(|l| l["fields"]["request_id"] == "req-123")
        .expect("the request's line");
    let f = &ok["fields"];
    for key in [
        "request_id",
        "identity",
        "service",
        "method",
        "path",
        "status",
        "reason",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "upstream",
        "trace_id",
        "remote",
        "listener",
    ] {
        assert!(!f[key].is_null(), "access log field {key} missing: {f}");
    }
    assert_eq!(f["identity"], "spiffe://fed.test/client/alice");
    assert_eq!(f["service"], "inventory");
    assert_eq!(f["status"], 200);
    assert_eq!(f["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(f["upstream"], up.url(Proto::H2c).as_str());
    assert!(f["bytes_out"].as_u64().unwrap() > 0);
    let refused = access
        .iter()
        .find(|l| l["fields"]["status"] == 404)
        .expect("the refusal's line");
    assert_eq!(refused["fields"]["reason"], "unknown_service");
}

/// Sampled requests become spans at an OTLP/HTTP collector: this hop's span id (the
/// parent id the upstream saw), the caller's span as parent. Unsampled traces, and
/// traces started here with `sample = 0`, are not exported.
#[test]
fn sampled_requests_are_exported_to_an_otlp_collector() {
    use std::io::BufRead;
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let out = pki.path().join("spans.jsonl");
    let mut collector = Command::new("python3")
        .arg(crate::support::py("otlp_collector.py"))
        .arg(&out)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(collector.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let cport: u16 = line.trim().parse().unwrap();
    let fp = Fedport::start(&node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"inventory\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
             [tracing]\notlp = \"http://127.0.0.1:{cport}/v1/traces\"\nservice_name = \"edge\"\nsample = 0\n",
            up.url(Proto::H2c)
        ),
    ));
    let c = pki.curl_client();
    let url = format!("https://localhost:{}/v1/items", fp.port("internal"));
    let call = |tp: Option<&str>| {
        let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
        let h = tp.map(|t| format!("traceparent: {t}"));
        if let Some(h) = &h {
            a.extend(["-H", h.as_str()]);
        }
        a.extend(["-H", "fed-service: inventory", &url]);
        let (code, body, _) = crate::support::curl(&a);
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["headers"]["traceparent"][0].as_str().unwrap().to_owned()
    };
    let seen = call(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ));
    call(Some(
        "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-00f067aa0ba902b7-00",
    ));
    call(None);
    crate::support::wait_until(
        "the span exported",
        std::time::Duration::from_secs(10),
        || fp.metric(r#"fedport_trace_spans_total{result="exported"}"#) >= 1.0,
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let _ = collector.kill();
    let _ = collector.wait();
    let text = std::fs::read_to_string(&out).unwrap();
    let spans: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .flat_map(|v| {
            v["resourceSpans"][0]["scopeSpans"][0]["spans"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(spans.len(), 1, "only the sampled trace: {text}");
    let s = &spans[0];
    assert_eq!(s["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(s["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(
        s["spanId"],
        seen.split('-').nth(2).unwrap(),
        "the id the upstream saw as parent"
    );
    assert_eq!(s["name"], "fedport inventory");
    assert!(
        text.contains(r#""stringValue":"edge""#),
        "service.name: {text}"
    );
    assert_eq!(
        fp.metric(r#"fedport_trace_spans_total{result="exported"}"#),
        1.0
    );
}
