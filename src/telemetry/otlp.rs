//! Span export (cargo feature `otlp`, on by default): each sampled request becomes a
//! SERVER span — this hop's span id, the caller's as its parent — sent in batches to
//! an OTLP/HTTP collector as JSON (the protocol's documented JSON encoding) from the
//! control thread. The request path only hands a finished span to a bounded queue;
//! when the queue is full the span is dropped and counted, never waited for.
//!
//! Why not the opentelemetry SDK: fedport already owns the trace context (ids, flags,
//! sampling) and needs only to ship finished spans; the SDK's span machinery on every
//! request would cost more than the ~100 lines of encoding here.

use crate::config::Tracing;
use crate::telemetry::{Metrics, ResultLabels};
use prometheus_client::metrics::counter::Counter;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// A finished span.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: String,
    pub span_id: String,
    pub parent_id: Option<String>,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub error: bool,
    /// Attribute name and value.
    pub attributes: Vec<(&'static str, String)>,
}

/// Where the request path hands finished spans.
#[derive(Clone)]
pub struct Spans {
    tx: mpsc::Sender<SpanRecord>,
    dropped: Counter,
}

impl Spans {
    pub fn send(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

/// The queue, and the exporter that drains it (to run on the control thread).
pub fn channel(tracing: &Tracing, node: &str, m: &Metrics) -> Option<(Spans, Exporter)> {
    if cfg!(not(feature = "otlp")) {
        return None;
    }
    let (host, port, path) = tracing.otlp.clone()?;
    let (tx, rx) = mpsc::channel(8192);
    let counter = |r: &str| {
        m.spans
            .get_or_create(&ResultLabels { result: r.into() })
            .clone()
    };
    Some((
        Spans {
            tx,
            dropped: counter("dropped"),
        },
        Exporter {
            rx,
            host,
            port,
            path,
            resource: vec![
                ("service.name", tracing.service_name.clone()),
                ("fedport.node", node.to_owned()),
            ],
            ok: counter("exported"),
            failed: counter("failed"),
        },
    ))
}

pub struct Exporter {
    rx: mpsc::Receiver<SpanRecord>,
    host: String,
    port: u16,
    path: String,
    resource: Vec<(&'static str, String)>,
    ok: Counter,
    failed: Counter,
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_string()
}

fn attributes(a: &[(&'static str, String)]) -> serde_json::Value {
    a.iter()
        .map(|(k, v)| serde_json::json!({ "key": k, "value": { "stringValue": v } }))
        .collect()
}

/// The OTLP/HTTP JSON body for a batch.
pub fn encode(resource: &[(&'static str, String)], spans: &[SpanRecord]) -> String {
    let spans: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut v = serde_json::json!({
                "traceId": s.trace_id,
                "spanId": s.span_id,
                "name": s.name,
                "kind": 2,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": attributes(&s.attributes),
                "status": { "code": if s.error { 2 } else { 1 } },
            });
            if let Some(p) = &s.parent_id {
                v["parentSpanId"] = p.clone().into();
            }
            v
        })
        .collect();
    serde_json::json!({
        "resourceSpans": [{
            "resource": { "attributes": attributes(resource) },
            "scopeSpans": [{ "scope": { "name": "fedport", "version": env!("CARGO_PKG_VERSION") }, "spans": spans }],
        }]
    })
    .to_string()
}

impl Exporter {
    /// Sends batches of up to 512 spans, at least once a second, until the queue closes.
    pub async fn run(mut self) {
        let mut batch = Vec::new();
        loop {
            let deadline = tokio::time::sleep(Duration::from_secs(1));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    s = self.rx.recv() => match s {
                        Some(s) => {
                            batch.push(s);
                            if batch.len() >= 512 { break }
                        }
                        None => {
                            self.flush(&mut batch).await;
                            return;
                        }
                    },
                    _ = &mut deadline => break,
                }
            }
            self.flush(&mut batch).await;
        }
    }

    async fn flush(&self, batch: &mut Vec<SpanRecord>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let body = encode(&self.resource, batch);
        batch.clear();
        match tokio::time::timeout(Duration::from_secs(5), self.post(body)).await {
            Ok(Ok(())) => {
                self.ok.inc_by(n);
            }
            other => {
                self.failed.inc_by(n);
                tracing::debug!(error = ?other.err(), "span export failed");
            }
        }
    }

    async fn post(&self, body: String) -> Result<(), String> {
        use http_body_util::BodyExt;
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::post(self.path.as_str())
            .header(http::header::HOST, format!("{}:{}", self.host, self.port))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("collector answered {status}"))
        }
    }
}

/// A span's parts known at the start of a request.
#[derive(Debug, Clone)]
pub struct Started {
    pub hop: super::trace::Hop,
    pub start: SystemTime,
    pub spans: Spans,
}

impl Started {
    pub fn finish(self, name: String, error: bool, attributes: Vec<(&'static str, String)>) {
        let hop = self.hop;
        self.spans.send(SpanRecord {
            trace_id: hop.trace_id,
            span_id: hop.span_id,
            parent_id: hop.parent_id,
            name,
            start: self.start,
            end: SystemTime::now(),
            error,
            attributes,
        });
    }
}

impl std::fmt::Debug for Spans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Spans")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_otlp_json() {
        let s = SpanRecord {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "1111111111111111".into(),
            parent_id: Some("00f067aa0ba902b7".into()),
            name: "fedport inventory".into(),
            start: UNIX_EPOCH + Duration::from_secs(1),
            end: UNIX_EPOCH + Duration::from_secs(2),
            error: false,
            attributes: vec![("fedport.service", "inventory".into())],
        };
        let v: serde_json::Value =
            serde_json::from_str(&encode(&[("service.name", "fedport".into())], &[s])).unwrap();
        let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(span["startTimeUnixNano"], "1000000000");
        assert_eq!(span["kind"], 2);
        assert_eq!(
            v["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "fedport"
        );
    }
}
