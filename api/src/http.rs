//! The HTTP/1.1 server of every kubemoe process (a router's OpenAI API and metrics, a worker's
//! and the operator's metrics and health): axum's router on hyper, with the limits
//! `axum::serve` does not set. A connection that has not sent a whole request head within
//! `header_timeout` is closed, whether it is slow (a slowloris client), idle before its first
//! request or idle between keep-alive requests (hyper's timer starts as soon as the connection
//! waits for a head). Streams already answering are not cut: the timeout covers the head only.
//!
//! With TLS ([`crate::tls`]) the handshake comes first ([`crate::conn`]), bounded on its own.
//!
//! Shutdown: the listener closes at once; connections finish the requests they are serving
//! (hyper's graceful shutdown) and close.

use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What a process serves with unless told otherwise (uvicorn, vLLM's server, closes idle
/// keep-alive connections after 5 s; a head has always arrived by 30 s from a real client).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` (over TLS when `tls` is given) until `shutdown` fires, then
/// waits for the requests in progress. Nothing stops it earlier: a failed accept is retried, a
/// failed connection dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<crate::tls::ServerConfig>>,
    app: axum::Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_timeout);
    let mut connections = tokio::task::JoinSet::new();
    // Boxed so that it can be dropped (closing the listener) before the connections finish.
    let mut incoming = Box::pin(crate::conn::incoming(listener, tls));
    loop {
        let conn = tokio::select! {
            Some(Ok(conn)) = incoming.next() => conn,
            () = shutdown.cancelled() => break,
        };
        while connections.try_join_next().is_some() {}
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%error, "HTTP connection ended");
            }
        });
    }
    drop(incoming);
    while connections.join_next().await.is_some() {}
}
