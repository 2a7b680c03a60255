//! Serving while the weights load. A DeepSeek-V3 worker reads tens of GiB before it can compute
//! anything; its ports must answer meanwhile: kubelet's liveness probe (a process that answers
//! nothing for 30 s is restarted, and would never finish loading), clients (told how far loading
//! got rather than refused a connection), the operator (which shows the progress in the
//! ModelDeployment's status) and Prometheus.
//!
//! [`Pending`] is a service that answers with a stand-in until the real one is [`Pending::set`],
//! then hands every request to it: servers start with it before loading and never restart.
//! The stand-ins say how far loading got: [`Unavailable`] (gRPC `UNAVAILABLE`), [`app`] (HTTP
//! 503 in OpenAI's error shape, `/health` with the bytes, `/metrics` with [`gauges`]).

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tower_service::Service;

/// Bytes of weights loaded and to load, for the whole process (the model crate keeps them).
pub type Progress = fn() -> (u64, u64);

/// How [`describe`] starts.
pub const LOADING: &str = "loading weights: ";

/// `loading weights: 1200.0 of 2400.0 MiB (50%)`: whole percent rounded down, so 100% only
/// once all is read.
pub fn describe((loaded, total): (u64, u64)) -> String {
    let percent = (u128::from(loaded) * 100 / u128::from(total.max(1))).min(100);
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    format!("{LOADING}{:.1} of {:.1} MiB ({percent}%)", mib(loaded), mib(total))
}

/// The weight series in the Prometheus text format, served from a process's start:
/// `kubemoe_weights_loaded_bytes` and `kubemoe_weights_bytes` (stored bytes read since the start
/// and set out to read: equal once loaded; a migration's prepare adds to both), and
/// `kubemoe_weights_held_bytes{dtype}`, the bytes of the matrices held per precision (`held`,
/// once loaded: what memory requests are sized by).
pub fn gauges(out: &mut String, progress: Progress, held: &[(&str, usize)]) {
    let (loaded, total) = progress();
    out.push_str(&format!(
        "# HELP kubemoe_weights_loaded_bytes Bytes of weights this process has loaded\n\
         # TYPE kubemoe_weights_loaded_bytes gauge\nkubemoe_weights_loaded_bytes {loaded}\n\
         # HELP kubemoe_weights_bytes Bytes of weights this process loads\n\
         # TYPE kubemoe_weights_bytes gauge\nkubemoe_weights_bytes {total}\n\
         # HELP kubemoe_weights_held_bytes Bytes of weight matrices held, per precision\n\
         # TYPE kubemoe_weights_held_bytes gauge\n"
    ));
    for (dtype, bytes) in held {
        out.push_str(&format!("kubemoe_weights_held_bytes{{dtype=\"{dtype}\"}} {bytes}\n"));
    }
}

/// A service answered by a stand-in `L` until the real one, `S`, is set.
pub struct Pending<S, L> {
    real: Arc<OnceLock<S>>,
    stand_in: L,
}

impl<S, L: Clone> Clone for Pending<S, L> {
    fn clone(&self) -> Self {
        Pending { real: self.real.clone(), stand_in: self.stand_in.clone() }
    }
}

impl<S, L> Pending<S, L> {
    pub fn new(stand_in: L) -> Self {
        Pending { real: Arc::new(OnceLock::new()), stand_in }
    }

    /// Serves with `real` from now on (in every clone). A second call changes nothing.
    pub fn set(&self, real: S) {
        let _ = self.real.set(real);
    }
}

impl<S: tonic::server::NamedService, L> tonic::server::NamedService for Pending<S, L> {
    const NAME: &'static str = S::NAME;
}

type Answer<R> = Pin<Box<dyn Future<Output = Result<R, Infallible>> + Send>>;

impl<S, L, R, B> Service<R> for Pending<S, L>
where
    S: Service<R, Response = http::Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    L: Service<R, Response = http::Response<B>, Error = Infallible> + Clone + Send + 'static,
    L::Future: Send,
    R: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = Infallible;
    type Future = Answer<http::Response<B>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is asked of whichever answers, when it answers.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: R) -> Self::Future {
        match self.real.get() {
            Some(real) => Box::pin(ready_then_call(real.clone(), request)),
            None => Box::pin(ready_then_call(self.stand_in.clone(), request)),
        }
    }
}

async fn ready_then_call<S: Service<R, Error = Infallible>, R>(
    mut service: S,
    request: R,
) -> Result<S::Response, Infallible> {
    std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
    service.call(request).await
}

/// The gRPC stand-in: every call is `UNAVAILABLE`, saying how far loading got (clients retry
/// UNAVAILABLE; kubemoe's routers route around a worker that answers it).
#[derive(Clone)]
pub struct Unavailable(pub Progress);

impl<R> Service<R> for Unavailable {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: R) -> Self::Future {
        std::future::ready(Ok(tonic::Status::unavailable(describe(self.0())).into_http()))
    }
}

/// A gRPC service that is `UNAVAILABLE` until set.
pub fn grpc<S>(progress: Progress) -> Pending<S, Unavailable> {
    Pending::new(Unavailable(progress))
}

/// An HTTP app that is [`app`] until set.
pub fn http(progress: Progress) -> Pending<axum::Router, axum::Router> {
    Pending::new(app(progress))
}

impl Pending<axum::Router, axum::Router> {
    /// The app to serve: this, as a router.
    pub fn router(&self) -> axum::Router {
        axum::Router::new().fallback_service(self.clone())
    }
}

/// The HTTP stand-in: `/health` 503 with `{"status":"loading","loaded_bytes":…,"total_bytes":…}`,
/// `/metrics` the [`gauges`], anything else 503 in OpenAI's error shape (what the router's API
/// answers any request it cannot take now).
pub fn app(progress: Progress) -> axum::Router {
    let health = move || async move {
        let (loaded, total) = progress();
        let body = serde_json::json!({ "status": "loading", "loaded_bytes": loaded, "total_bytes": total });
        (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "application/json")], body.to_string())
    };
    let metrics = move || async move {
        let mut text = String::new();
        gauges(&mut text, progress, &[]);
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
    };
    let other = move || async move {
        let error = serde_json::json!({ "error": {
            "message": describe(progress()),
            "type": "service_unavailable",
            "param": null,
            "code": null,
        }});
        (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "application/json")], error.to_string())
            .into_response()
    };
    axum::Router::new()
        .route("/health", axum::routing::get(health))
        .route("/metrics", axum::routing::get(metrics))
        .fallback(other)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn half() -> (u64, u64) {
        (3 << 20, 6 << 20)
    }

    async fn get(app: &mut Pending<axum::Router, axum::Router>, path: &str) -> (StatusCode, String) {
        let request = http::Request::get(path).body(axum::body::Body::empty()).unwrap();
        let response = app.call(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn http_says_how_far_loading_got_until_the_real_app_is_set() {
        let mut app = http(half);
        let (status, body) = get(&mut app, "/health").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["status"], "loading");
        assert_eq!(body["loaded_bytes"], 3 << 20);
        assert_eq!(body["total_bytes"], 6 << 20);
        let (_, metrics) = get(&mut app, "/metrics").await;
        assert!(metrics.contains(&format!("kubemoe_weights_loaded_bytes {}\n", 3 << 20)), "{metrics}");
        assert!(metrics.contains(&format!("kubemoe_weights_bytes {}\n", 6 << 20)), "{metrics}");
        let (status, body) = get(&mut app, "/v1/models").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["message"], "loading weights: 3.0 of 6.0 MiB (50%)");

        // A clone set later serves every clone.
        app.clone().set(axum::Router::new().route("/health", axum::routing::get(|| async { "ok" })));
        assert_eq!(get(&mut app, "/health").await, (StatusCode::OK, "ok".into()));
    }

    #[tokio::test]
    async fn grpc_calls_are_unavailable_with_the_progress_until_set() {
        let mut service = grpc::<Unavailable>(half);
        let response = service.call(()).await.unwrap();
        let status = tonic::Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "loading weights: 3.0 of 6.0 MiB (50%)");
        service.set(Unavailable(|| (6 << 20, 6 << 20)));
        let response = service.call(()).await.unwrap();
        let status = tonic::Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.message(), "loading weights: 6.0 of 6.0 MiB (100%)");
    }
}
