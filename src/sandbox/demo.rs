//! The sandbox's demo services: a gRPC echo (`demo.Echo`, any method answers with the
//! messages it was sent; `Fail` answers NOT_FOUND) over h2c, and a JSON HTTP/1.1
//! inventory service that tells the caller which identity fedport vouched for.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, hyper::Error>;

/// Serves the gRPC echo on `listener` (HTTP/2 prior knowledge) forever.
pub async fn grpc_echo(listener: TcpListener) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let svc =
                service_fn(|req: Request<Incoming>| async move { Ok::<_, Infallible>(echo(req)) });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

fn echo(req: Request<Incoming>) -> Response<Body> {
    let fail = req.uri().path().ends_with("/Fail");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(16);
    let mut body = req.into_body();
    tokio::spawn(async move {
        if !fail {
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Ok(data) = f.into_data() {
                            if tx.send(Ok(Frame::data(data))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(_) => return,
                }
            }
        }
        let mut t = HeaderMap::new();
        if fail {
            t.insert("grpc-status", HeaderValue::from_static("5"));
            t.insert(
                "grpc-message",
                HeaderValue::from_static("demo: nothing here"),
            );
        } else {
            t.insert("grpc-status", HeaderValue::from_static("0"));
        }
        let _ = tx.send(Ok(Frame::trailers(t))).await;
    });
    let stream = tokio_stream_from(rx);
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    resp
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_core_shim::Stream<Item = T> {
    futures_core_shim::from_fn(move |cx| rx.poll_recv(cx))
}

/// A minimal `Stream` from a poll function, so the demo needs no stream crate.
mod futures_core_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub use futures_core::Stream;

    pub struct FromFn<F>(F);

    impl<T, F: FnMut(&mut Context<'_>) -> Poll<Option<T>> + Unpin> Stream for FromFn<F> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            (self.0)(cx)
        }
    }

    pub fn from_fn<T, F: FnMut(&mut Context<'_>) -> Poll<Option<T>> + Unpin>(f: F) -> FromFn<F> {
        FromFn(f)
    }
}

/// Serves the JSON inventory service (HTTP/1.1) on `listener` forever.
pub async fn json_service(listener: TcpListener) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|req: Request<Incoming>| async move {
                Ok::<_, Infallible>(inventory(req).await)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

async fn inventory(req: Request<Incoming>) -> Response<Body> {
    let peer = req
        .headers()
        .get("fed-peer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (status, json) = match (method.as_str(), path.as_str()) {
        ("GET", "/v1/items") => (
            StatusCode::OK,
            serde_json::json!({ "items": [{"sku": "apple", "count": 12}, {"sku": "pear", "count": 3}], "seen_peer": peer }),
        ),
        ("POST", "/v1/reserve") => match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(v) => (
                StatusCode::OK,
                serde_json::json!({ "reserved": v, "seen_peer": peer }),
            ),
            Err(e) => (
                StatusCode::BAD_REQUEST,
                serde_json::json!({ "error": e.to_string() }),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "no such path", "path": path }),
        ),
    };
    let mut resp = Response::new(BodyExt::boxed(
        Full::new(Bytes::from(json.to_string())).map_err(|n| match n {}),
    ));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp
}
