//! The agent's HTTP endpoints for Kubernetes and Prometheus: `/healthz` (the process serves),
//! `/readyz` (the node's engine can work: its network namespace thread answers, the data
//! listener, once bound, accepts) and `/metrics` ([`crate::metrics`]). Read-only and free of
//! secrets and ids: nothing here changes the node or names a pod.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::node::Node;

/// How long a request may take to arrive, and `/readyz` to decide.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 32;

/// Serves the endpoints on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, node: Arc<Node>, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "HTTP endpoint busy; connection closed");
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let node = node.clone();
                async move { Ok::<_, Infallible>(answer(&node, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(REQUEST_TIMEOUT)
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT * 4, conn).await.unwrap_or(Ok(())) {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

async fn answer(node: &Node, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into(), PLAIN);
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/readyz" => match tokio::time::timeout(REQUEST_TIMEOUT, node.ready()).await {
            Ok(Ok(())) => text(StatusCode::OK, "ok\n".into(), PLAIN),
            Ok(Err(why)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n"), PLAIN),
            Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: the check timed out\n".into(), PLAIN),
        },
        "/metrics" => text(StatusCode::OK, node.render_metrics(), "text/plain; version=0.0.4; charset=utf-8"),
        _ => text(StatusCode::NOT_FOUND, "not found: /healthz, /readyz, /metrics\n".into(), PLAIN),
    }
}
