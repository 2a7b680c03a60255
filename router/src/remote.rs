//! Routed experts computed by the workers: one gRPC `Dispatch` per destination worker per
//! MoE layer, all in flight at once, each under a deadline. Activations travel as raw
//! little-endian f32 bytes; every byte sent and received is counted.

use crate::dispatch::plan;
use kubemoe_api::expert::expert_client::ExpertClient;
use kubemoe_api::expert::{DispatchRequest, InfoRequest};
use kubemoe_model::layers::{RoutedExperts, Routing};
use kubemoe_model::Config;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Bytes moved by dispatch and combine, against the physical minimum one way
/// (tokens × distinct destination workers × hidden × 4).
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// Activation bytes dispatched.
    pub activations: AtomicU64,
    /// Route bytes dispatched (12 per token and expert).
    pub routes: AtomicU64,
    /// Partial-sum bytes combined.
    pub received: AtomicU64,
    pub minimum: AtomicU64,
}

pub struct RemoteExperts {
    clients: Vec<ExpertClient<Channel>>,
    /// Logical expert → worker index.
    owner: Vec<usize>,
    hidden: usize,
    deadline: Duration,
    runtime: tokio::runtime::Handle,
    pub bytes: ByteCounters,
}

/// The largest HTTP/2 frame (2^24 - 1, the protocol's limit).
pub const MAX_FRAME_BYTES: u32 = (1 << 24) - 1;

/// A lazily connecting channel that reconnects after a worker restarts. `url` is
/// `http://host:port` or plain `host:port`.
pub fn channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    Ok(Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        // Large frames: a dispatch is megabytes, and 16 KiB frames cost a syscall each.
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .connect_lazy())
}

impl RemoteExperts {
    /// Workers in rank order; `owner[e]` is the rank holding expert `e`.
    pub fn new(
        config: &Config,
        channels: Vec<Channel>,
        owner: Vec<usize>,
        deadline: Duration,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let max = crate::MAX_MESSAGE_BYTES;
        let clients = channels
            .into_iter()
            .map(|c| ExpertClient::new(c).max_decoding_message_size(max).max_encoding_message_size(max))
            .collect();
        Self { clients, owner, hidden: config.hidden_size, deadline, runtime, bytes: ByteCounters::default() }
    }

    /// Asks every worker what it holds; fails unless worker `i` reports rank `i` of this world.
    pub async fn check_workers(&self, model: &str) -> Result<(), String> {
        for (i, c) in self.clients.iter().enumerate() {
            let mut c = c.clone();
            let info = c
                .info(InfoRequest {})
                .await
                .map_err(|s| format!("worker {i}: {}", s.message()))?
                .into_inner();
            if info.rank as usize != i || info.world_size as usize != self.clients.len() {
                return Err(format!(
                    "worker {i} reports rank {} of {}; list workers in rank order",
                    info.rank, info.world_size
                ));
            }
            if info.model != model {
                return Err(format!("worker {i} serves model {}, this router {model}", info.model));
            }
        }
        Ok(())
    }
}

impl RoutedExperts for RemoteExperts {
    fn run(&self, layer: usize, x: &[f32], routing: &Routing) -> kubemoe_model::Result<Vec<f32>> {
        let hidden = self.hidden;
        let batches = plan(routing, &self.owner, self.clients.len());
        // The batch loop runs on its own thread: spawn the calls on the server's runtime.
        let _entered = self.runtime.enter();
        let mut calls = tokio::task::JoinSet::new();
        for (w, b) in batches.iter().enumerate().filter(|(_, b)| !b.rows.is_empty()) {
            let (activations, routes) = b.encode(x, hidden);
            self.bytes.activations.fetch_add(activations.len() as u64, Ordering::Relaxed);
            self.bytes.routes.fetch_add(routes.len() as u64, Ordering::Relaxed);
            self.bytes.minimum.fetch_add((b.rows.len() * hidden * 4) as u64, Ordering::Relaxed);
            let mut client = self.clients[w].clone();
            let request = DispatchRequest {
                layer: layer as u32,
                tokens: b.rows.len() as u32,
                activations: activations.into(),
                routes: routes.into(),
            };
            let deadline = self.deadline;
            calls.spawn(async move {
                let mut r = tonic::Request::new(request);
                r.set_timeout(deadline);
                let reply = tokio::time::timeout(deadline, client.dispatch(r))
                    .await
                    .map_err(|_| {
                        tonic::Status::deadline_exceeded(format!("worker {w} did not answer in {deadline:?}"))
                    })?
                    .map_err(|s| tonic::Status::new(s.code(), format!("worker {w}: {}", s.message())))?;
                Ok::<_, tonic::Status>((w, reply.into_inner().partial))
            });
        }
        let results = self.runtime.block_on(calls.join_all());
        let mut out = vec![0f32; x.len()];
        for r in results {
            let (w, partial) = r.map_err(|s| unavailable(layer, s))?;
            self.bytes.received.fetch_add(partial.len() as u64, Ordering::Relaxed);
            batches[w]
                .combine(&partial, hidden, &mut out)
                .map_err(|m| unavailable(layer, tonic::Status::internal(format!("worker {w}: {m}"))))?;
        }
        Ok(out)
    }
}

fn unavailable(layer: usize, status: tonic::Status) -> kubemoe_model::Error {
    kubemoe_model::Error::ExpertsUnavailable { layer, source: Box::new(status) }
}
