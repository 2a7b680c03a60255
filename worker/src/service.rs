//! The worker's gRPC server: `kubemoe.expert.v1.Expert`, `grpc.health.v1` and reflection.

use crate::{ExpertStore, Result};
use kubemoe_api::expert::expert_server::{Expert, ExpertServer};
use kubemoe_api::expert::*;
use kubemoe_placement::PlacementPlan;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub struct ExpertService {
    store: Arc<ExpertStore>,
    stats: Arc<crate::metrics::Stats>,
}

#[tonic::async_trait]
impl Expert for ExpertService {
    async fn dispatch(
        &self,
        request: Request<DispatchRequest>,
    ) -> Result<Response<DispatchResponse>, Status> {
        let arrived = std::time::Instant::now();
        let requests = kubemoe_api::trace::requests(request.metadata()).to_string();
        let r = request.into_inner();
        let span = tracing::debug_span!("dispatch", layer = r.layer, tokens = r.tokens, requests = %requests);
        let (store, stats) = (self.store.clone(), self.stats.clone());
        // The FFN is CPU-bound: off the async threads, in the dispatch's span.
        let partial = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let partial = store.dispatch(r.layer as usize, r.tokens as usize, &r.activations, &r.routes);
            match &partial {
                Ok(_) => {
                    stats.dispatch_duration.observe(arrived.elapsed());
                    tracing::debug!("dispatched")
                }
                Err(e) => {
                    stats.dispatch_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(error = %kubemoe_placement::error_chain(e), "dispatch refused")
                }
            }
            partial
        })
        .await
        .map_err(|e| Status::internal(format!("expert task failed: {e}")))??;
        Ok(Response::new(DispatchResponse { partial: partial.into() }))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let layers = self
            .store
            .stats()
            .into_iter()
            .map(|(layer, tokens)| LayerCounts { layer: layer as u32, tokens })
            .collect();
        Ok(Response::new(StatsResponse { layers }))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let s = &self.store;
        let experts = s
            .held()?
            .into_iter()
            .map(|(layer, e)| LayerExperts {
                layer: layer as u32,
                experts: e.into_iter().map(|x| x as u32).collect(),
            })
            .collect();
        Ok(Response::new(InfoResponse {
            model: s.model.clone(),
            rank: s.rank as u32,
            world_size: s.world_size()? as u32,
            experts,
            epoch: s.epoch()?,
        }))
    }

    async fn prepare(&self, request: Request<PrepareRequest>) -> Result<Response<PrepareResponse>, Status> {
        let plan = request.into_inner().plan.ok_or_else(|| Status::invalid_argument("plan is missing"))?;
        let plan = PlacementPlan::try_from(plan).map_err(crate::Error::from)?;
        let (store, epoch) = (self.store.clone(), plan.epoch);
        // Reading weights is blocking I/O (and generation, for builtin models).
        let loaded = tokio::task::spawn_blocking(move || store.prepare(plan))
            .await
            .map_err(|e| Status::internal(format!("expert loading task failed: {e}")))??;
        tracing::info!(epoch, loaded, "prepared placement epoch");
        Ok(Response::new(PrepareResponse { loaded: loaded as u32 }))
    }

    async fn release(&self, request: Request<ReleaseRequest>) -> Result<Response<ReleaseResponse>, Status> {
        let (store, epoch) = (self.store.clone(), request.into_inner().epoch);
        // It waits for dispatches in progress to let go of the experts: off the async threads.
        let released = tokio::task::spawn_blocking(move || store.release(epoch))
            .await
            .map_err(|e| Status::internal(format!("expert release task failed: {e}")))??;
        tracing::info!(epoch, released, "placement epoch in force");
        Ok(Response::new(ReleaseResponse { released: released as u32 }))
    }
}

/// How and where a worker's gRPC is served.
pub struct Served {
    /// What every `Expert` call passes first (health and reflection stay open for probes).
    pub guard: kubemoe_api::auth::Guard,
    pub tls: Option<Arc<kubemoe_api::tls::ServerConfig>>,
    pub listener: TcpListener,
    /// A plaintext port serving health alone.
    pub health: Option<TcpListener>,
}

/// Serves `store` until `shutdown` fires; health turns NOT_SERVING first.
pub async fn serve(
    store: Arc<ExpertStore>,
    stats: Arc<crate::metrics::Stats>,
    served: Served,
    shutdown: CancellationToken,
) -> Result<()> {
    let Served { guard, tls, listener, health: health_listener } = served;
    let (reporter, health) = tonic_health::server::health_reporter();
    // Up until the server has drained, so that probes see it draining.
    let health_stop = CancellationToken::new();
    let _stop_health = health_stop.clone().drop_guard();
    if let Some(listener) = health_listener {
        tokio::spawn(kubemoe_api::health::serve(listener, health.clone(), health_stop));
    }
    kubemoe_api::health::serving(&reporter, "kubemoe.expert.v1.Expert").await;
    let expert = ExpertServer::new(ExpertService { store, stats })
        .max_decoding_message_size(kubemoe_api::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(kubemoe_api::MAX_MESSAGE_BYTES);
    let expert = tonic::service::interceptor::InterceptedService::new(expert, guard);
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .max_frame_size(Some((1 << 24) - 1))
        .add_service(health)
        .add_service(kubemoe_api::reflection::v1(&["kubemoe.expert.v1.Expert"])?)
        .add_service(kubemoe_api::reflection::v1alpha(&["kubemoe.expert.v1.Expert"])?)
        .add_service(expert)
        .serve_with_incoming_shutdown(kubemoe_api::conn::incoming(listener, tls), async move {
            shutdown.cancelled().await;
            kubemoe_api::health::draining(&reporter, "kubemoe.expert.v1.Expert").await;
        })
        .await?;
    Ok(())
}
