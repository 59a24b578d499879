//! The admin port: `/healthz` (alive), `/readyz` (accepting traffic; `?verbose` adds
//! each endpoint's health and each peer's state as JSON), `/metrics` (Prometheus
//! text) and `/config` (what is running, without secrets).

use crate::reason::Reason;
use crate::server::State;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;

pub async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, remote)) = listener.accept().await else {
            continue;
        };
        // `[admin] allow`: monitoring ranges (and loopback) only
        let config = state.config.load();
        let allow = &config.admin_allow;
        // on a dual-stack [::] socket an IPv4 caller is ::ffff:a.b.c.d
        let ip = remote.ip().to_canonical();
        if !allow.is_empty() && !ip.is_loopback() && !allow.iter().any(|n| n.contains(&ip)) {
            state.metrics.reject("admin", Reason::Address);
            continue;
        }
        let st = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(answer(&req, &st)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

fn answer(req: &Request<Incoming>, st: &State) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if req.uri().query() == Some("verbose") => {
            let mut detail = st.fleet.load().detail(&st.config.load());
            detail["ready"] = st.is_ready().into();
            if let Some(r) = st.registry.get() {
                detail["registry"] = r.detail();
            }
            let bundles = st.bundles.detail();
            if bundles.as_object().is_some_and(|b| !b.is_empty()) {
                detail["trust_bundles"] = bundles;
            }
            if let Some(n) = st.nofile.get() {
                detail["nofile"] = serde_json::json!({
                    "soft": n.soft,
                    "hard": n.hard,
                    "needed": crate::limits::nofile::needed(&st.config.load()),
                });
            }
            let status = if st.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, "application/json", detail.to_string())
        }
        "/readyz" if st.is_ready() => text(StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".into()),
        // OpenMetrics for scrapers that ask for it, the Prometheus text format otherwise
        "/metrics"
            if req
                .headers()
                .get(header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text")) =>
        {
            text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                st.metrics.encode(),
            )
        }
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            st.metrics.encode_prometheus(),
        ),
        "/config" => {
            // what is running: the manifest (ports, services, access, peers, limits),
            // TLS file paths — never key material — and the config's hash
            let c = st.config.load_full();
            let mut body = serde_json::to_value(crate::manifest::manifest(&c))
                .unwrap_or_default();
            body["hash"] = c.hash.clone().into();
            // the last SIGHUP reload, for `fedport reload` to wait on
            if let Ok(h) = st.hup.lock() {
                body["reload"] = serde_json::to_value(&*h).unwrap_or_default();
            }
            body["path"] = c.path.display().to_string().into();
            body["tls"] = match &c.tls {
                Some(t) => serde_json::json!({
                    "cert": t.files.cert.display().to_string(),
                    "key": t.files.key.display().to_string(),
                    "ca": t.files.ca.display().to_string(),
                    "crl": t.crl.as_ref().map(|p| p.display().to_string()),
                    "allow_tls12": t.allow_tls12,
                }),
                None => serde_json::Value::Null,
            };
            text(StatusCode::OK, "application/json", body.to_string())
        }
        _ => text(StatusCode::NOT_FOUND, "application/json", r#"{"error":{"reason":"not_found","message":"admin paths: /healthz /readyz /metrics /config"}}"#.into()),
    }
}
