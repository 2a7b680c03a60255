//! The worker's gRPC server: `kubemoe.expert.v1.Expert`, `grpc.health.v1` and reflection.

use crate::{ExpertStore, Result};
use kubemoe_api::expert::expert_server::{Expert, ExpertServer};
use kubemoe_api::expert::*;
use kubemoe_kernels::dtype::{into_le_bytes, F32s};
use kubemoe_placement::PlacementPlan;
use std::sync::{Arc, OnceLock};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The service's name, as health and reflection know it.
const EXPERT: &str = "kubemoe.expert.v1.Expert";

/// The `Expert` service. It answers from the process's start: `Info` says how far loading got
/// until the experts are [`ExpertService::set`], every other call is UNAVAILABLE until then.
#[derive(Clone)]
pub struct ExpertService {
    store: Arc<OnceLock<Arc<ExpertStore>>>,
    stats: Arc<crate::metrics::Stats>,
    /// What `Info` says while loading.
    model: String,
    rank: usize,
    world_size: Option<usize>,
    /// The epoch of the placement being loaded.
    epoch: u64,
    /// Where the data path listens (0: nowhere).
    data_port: u16,
}

impl ExpertService {
    /// A service whose experts of placement `epoch` are still loading.
    pub fn loading(
        model: String,
        rank: usize,
        world_size: Option<usize>,
        epoch: u64,
        stats: Arc<crate::metrics::Stats>,
    ) -> Self {
        ExpertService {
            store: Arc::new(OnceLock::new()),
            stats,
            model,
            rank,
            world_size,
            epoch,
            data_port: 0,
        }
    }

    /// The same, saying in `Info` that its data path listens on `port`.
    pub fn with_data_port(self, port: u16) -> Self {
        ExpertService { data_port: port, ..self }
    }

    /// Serves `store` from now on, in every clone.
    pub fn set(&self, store: Arc<ExpertStore>) {
        let _ = self.store.set(store);
    }

    fn store(&self) -> Result<&Arc<ExpertStore>, Status> {
        self.store.get().ok_or_else(|| {
            Status::unavailable(kubemoe_api::loading::describe(kubemoe_model::progress::loaded()))
        })
    }
}

/// One dispatch as either transport delivers it.
type Call<B> = kubemoe_api::data::Call<B>;

impl ExpertService {
    /// Computes one dispatch's partial sums, counted in `served` (its transport's counter).
    async fn compute<B: AsRef<[u8]> + Send + 'static>(
        &self,
        call: Call<B>,
        served: &std::sync::atomic::AtomicU64,
    ) -> Result<F32s, Status> {
        let arrived = std::time::Instant::now();
        let Call { layer, tokens, activations, routes, requests } = call;
        let span = tracing::debug_span!("dispatch", layer, tokens, requests = %requests);
        let (store, stats) = (self.store()?.clone(), self.stats.clone());
        // The FFN is CPU-bound: off the async threads, in the dispatch's span.
        let partial = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let partial =
                store.dispatch(layer as usize, tokens as usize, activations.as_ref(), routes.as_ref());
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
        served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(into_le_bytes(partial))
    }
}

/// The data path ([`kubemoe_api::data`]): the same dispatches as gRPC's, sizes checked first.
impl kubemoe_api::data::Handler for ExpertService {
    type Reply = F32s;

    fn admit(&self, h: &kubemoe_api::data::Header) -> Result<(), Status> {
        let (layer, tokens) = (h.layer as usize, h.tokens as usize);
        let admitted =
            self.store()?.admit(layer, tokens, h.activation_bytes as usize, h.route_bytes as usize);
        admitted.inspect_err(|_| {
            self.stats.dispatch_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })?;
        Ok(())
    }

    async fn call(&self, call: kubemoe_api::data::Call) -> Result<F32s, Status> {
        self.compute(call, &self.stats.data_dispatches).await
    }
}

#[tonic::async_trait]
impl Expert for ExpertService {
    async fn dispatch(
        &self,
        request: Request<DispatchRequest>,
    ) -> Result<Response<DispatchResponse>, Status> {
        let requests = kubemoe_api::trace::requests(request.metadata()).to_string();
        let r = request.into_inner();
        let call =
            Call { layer: r.layer, tokens: r.tokens, activations: r.activations, routes: r.routes, requests };
        let partial = self.compute(call, &self.stats.grpc_dispatches).await?;
        Ok(Response::new(DispatchResponse { partial: tonic::codegen::Bytes::from_owner(partial) }))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let layers = self
            .store()?
            .stats()
            .into_iter()
            .map(|(layer, tokens)| LayerCounts { layer: layer as u32, tokens })
            .collect();
        Ok(Response::new(StatsResponse { layers }))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let Ok(s) = self.store() else {
            let (loaded_bytes, total_bytes) = kubemoe_model::progress::loaded();
            return Ok(Response::new(InfoResponse {
                model: self.model.clone(),
                rank: self.rank as u32,
                world_size: self.world_size.unwrap_or(0) as u32,
                epoch: self.epoch,
                loading: Some(LoadProgress { loaded_bytes, total_bytes }),
                data_port: self.data_port.into(),
                ..InfoResponse::default()
            }));
        };
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
            loading: None,
            data_port: self.data_port.into(),
        }))
    }

    async fn prepare(&self, request: Request<PrepareRequest>) -> Result<Response<PrepareResponse>, Status> {
        let plan = request.into_inner().plan.ok_or_else(|| Status::invalid_argument("plan is missing"))?;
        let plan = PlacementPlan::try_from(plan).map_err(crate::Error::from)?;
        let (store, epoch) = (self.store()?.clone(), plan.epoch);
        // Reading weights is blocking I/O (and generation, for builtin models).
        let loaded = tokio::task::spawn_blocking(move || store.prepare(plan))
            .await
            .map_err(|e| Status::internal(format!("expert loading task failed: {e}")))??;
        tracing::info!(epoch, loaded, "prepared placement epoch");
        Ok(Response::new(PrepareResponse { loaded: loaded as u32 }))
    }

    async fn release(&self, request: Request<ReleaseRequest>) -> Result<Response<ReleaseResponse>, Status> {
        let (store, epoch) = (self.store()?.clone(), request.into_inner().epoch);
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

/// Serves `service` until `shutdown` fires: alive at once, ready once `loaded` turns true, and
/// NOT_SERVING first when shutting down.
pub async fn serve(
    service: ExpertService,
    served: Served,
    mut loaded: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> Result<()> {
    let Served { guard, tls, listener, health: health_listener } = served;
    let (reporter, health) = tonic_health::server::health_reporter();
    // Alive, not ready, before any probe can ask.
    kubemoe_api::health::starting(&reporter, EXPERT).await;
    // Up until the server has drained, so that probes see it draining.
    let health_stop = CancellationToken::new();
    let _stop_health = health_stop.clone().drop_guard();
    if let Some(listener) = health_listener {
        tokio::spawn(kubemoe_api::health::serve(listener, health.clone(), health_stop));
    }
    let expert = ExpertServer::new(service)
        .max_decoding_message_size(kubemoe_api::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(kubemoe_api::MAX_MESSAGE_BYTES);
    let expert = tonic::service::interceptor::InterceptedService::new(expert, guard);
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .max_frame_size(Some((1 << 24) - 1))
        .add_service(health)
        .add_service(kubemoe_api::reflection::v1(&[EXPERT])?)
        .add_service(kubemoe_api::reflection::v1alpha(&[EXPERT])?)
        .add_service(expert)
        .serve_with_incoming_shutdown(kubemoe_api::conn::incoming(listener, tls), async move {
            // Ready once loaded, then draining at shutdown, one after the other, so that a
            // shutdown never leaves health SERVING.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {}
                ready = async { loaded.wait_for(|loaded| *loaded).await.is_ok() } => {
                    if ready {
                        kubemoe_api::health::serving(&reporter, EXPERT).await;
                    }
                    shutdown.cancelled().await;
                }
            }
            kubemoe_api::health::draining(&reporter, EXPERT).await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn service() -> ExpertService {
        ExpertService::loading("builtin:tiny".into(), 1, Some(2), 3, Arc::default())
    }

    #[tokio::test]
    async fn while_loading_info_says_how_far_and_every_other_call_is_unavailable() {
        kubemoe_model::progress::load().expect(4 << 20);
        kubemoe_model::progress::load().advance(1 << 20);
        let service = service();
        let info = service.info(Request::new(InfoRequest {})).await.unwrap().into_inner();
        assert_eq!((info.model.as_str(), info.rank, info.world_size, info.epoch), ("builtin:tiny", 1, 2, 3));
        assert!(info.experts.is_empty());
        let loading = info.loading.unwrap();
        assert!(loading.loaded_bytes >= 1 << 20 && loading.total_bytes >= 4 << 20, "{loading:?}");
        let dispatch = DispatchRequest { layer: 1, tokens: 0, ..Default::default() };
        let refused = service.dispatch(Request::new(dispatch)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert!(refused.message().starts_with("loading weights: "), "{}", refused.message());
        let refused = service.release(Request::new(ReleaseRequest { epoch: 1 })).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert_eq!(
            service.stats(Request::new(StatsRequest {})).await.unwrap_err().code(),
            tonic::Code::Unavailable
        );

        // Set in one clone, served by all: Info says what is held, and no longer loading.
        let store =
            ExpertStore::load("builtin:tiny", kubemoe_model::Precision::Auto, 1, Some(2), None).unwrap();
        service.clone().set(Arc::new(store));
        let info = service.info(Request::new(InfoRequest {})).await.unwrap().into_inner();
        assert_eq!(info.loading, None);
        assert!(!info.experts.is_empty());
        service.stats(Request::new(StatsRequest {})).await.unwrap();
    }
}
