//! `kubemoe.inference.v1.Inference`: request validation (INVALID_ARGUMENT naming the field),
//! the concurrency limit (RESOURCE_EXHAUSTED), text in and out, and streaming. Every stream is
//! fed by the batch loop through a bounded channel; when the client goes away the stream's
//! task ends, its channel closes and the batch loop drops the sequence.

use crate::engine::{EngineHandle, Event, Finish, Submission, SubmitError};
use crate::remote::RemoteExperts;
use crate::text::{Detokenizer, Message, TextCodec};
use kubemoe_api::auth::Guard;
use kubemoe_api::expert::balancer_server::{Balancer, BalancerServer};
use kubemoe_api::expert::{CommitRequest, CommitResponse, LayerCounts, LoadRequest, LoadResponse};
use kubemoe_api::inference::generate_request::Input;
use kubemoe_api::inference::inference_server::{Inference, InferenceServer};
use kubemoe_api::inference::*;
use kubemoe_api::loading::{Pending, Unavailable};
use kubemoe_model::{Config, SamplingParams};
use kubemoe_placement::PlacementPlan;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// New tokens when a request leaves `max_tokens` at 0 (vLLM's default for completions).
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// Alternatives per token a request may ask log-probabilities of (vLLM's default limit).
pub const MAX_LOGPROBS: u32 = 20;

/// Stop strings a request may give, and bytes each: every generated token is checked against
/// all of them.
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_BYTES: usize = 512;

/// HTTP/2 streams one client connection may have open at once on the public gRPC port (one
/// connection cannot hold more than this share of the router's request slots).
const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// What `max_tokens` 0 means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unset {
    /// [`DEFAULT_MAX_TOKENS`] (gRPC, OpenAI completions).
    Default,
    /// The rest of the context after the prompt (OpenAI chat completions, as vLLM does).
    RestOfContext,
}

/// What every request of both APIs is checked against before it is admitted ([`Admission::prepare`]).
pub struct Admission {
    pub model_name: String,
    pub vocab_size: usize,
    pub text: Option<Arc<TextCodec>>,
    /// Prompt plus new tokens of one request, at most.
    pub max_context: usize,
}

pub struct InferenceService {
    pub admission: Admission,
    pub config: Config,
    pub engine: EngineHandle,
    pub experts: Arc<crate::remote::RemoteExperts>,
    pub max_concurrent: usize,
    pub active: Arc<AtomicUsize>,
    /// Requests received, for the ids of those that bring none.
    pub received: AtomicU64,
    pub stats: Arc<crate::stats::Stats>,
    /// What the router waits for before it serves (its workers); `None` once serving.
    pub waiting: tokio::sync::watch::Receiver<Option<String>>,
}

/// Counts a request as active until dropped.
struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A validated request.
pub struct Prepared {
    prompt: Vec<u32>,
    /// The rendered chat prompt opens a `<think>` block ([`crate::reasoning`]).
    reasoning: bool,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    logprobs: Option<usize>,
}

impl Admission {
    fn text(&self, field: &str) -> Result<&TextCodec, Status> {
        self.text.as_deref().ok_or_else(|| {
            Status::invalid_argument(format!(
                "{field}: {} has no tokenizer.json; send input_ids",
                self.model_name
            ))
        })
    }

    /// Refuses `bytes` of text that cannot fit the context whatever their tokens, before any
    /// work is spent on them.
    fn fits(&self, field: &str, codec: &TextCodec, bytes: usize) -> Result<(), Status> {
        let least = codec.min_tokens(bytes);
        if least > self.max_context {
            return Err(Status::invalid_argument(format!(
                "{field}: {bytes} bytes of text are at least {least} tokens, more than the context length {}; \
                 send a shorter prompt",
                self.max_context
            )));
        }
        Ok(())
    }

    /// Checks `r` (cheap checks first, so that nothing is tokenised for a request refused
    /// anyway), then tokenises its prompt or renders its messages: `INVALID_ARGUMENT` naming
    /// the field for anything a client must change.
    pub fn prepare(&self, r: GenerateRequest, unset: Unset) -> Result<Prepared, Status> {
        // Cheap checks first: nothing is tokenised for a request refused anyway.
        if !(r.temperature >= 0.0 && r.temperature.is_finite()) {
            return Err(Status::invalid_argument(format!(
                "temperature: {} must be 0 (greedy) or positive",
                r.temperature
            )));
        }
        let top_p = r.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Status::invalid_argument(format!("top_p: {top_p} must be in (0, 1]")));
        }
        if let Some(n) = r.logprobs.filter(|n| *n > MAX_LOGPROBS) {
            return Err(Status::invalid_argument(format!(
                "logprobs: {n} alternatives per token are more than the {MAX_LOGPROBS} this server returns"
            )));
        }
        if !r.stop.is_empty() {
            self.text("stop")?;
            if r.stop.len() > MAX_STOP_STRINGS {
                return Err(Status::invalid_argument(format!(
                    "stop: {} stop strings are more than the {MAX_STOP_STRINGS} a request may give",
                    r.stop.len()
                )));
            }
            if r.stop.iter().any(String::is_empty) {
                return Err(Status::invalid_argument("stop: stop strings must not be empty"));
            }
            if let Some(long) = r.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
                return Err(Status::invalid_argument(format!(
                    "stop: a stop string of {} bytes is longer than {MAX_STOP_BYTES} bytes",
                    long.len()
                )));
            }
        }
        let mut reasoning = false;
        let prompt = match r.input {
            None => return Err(Status::invalid_argument("input: set one of prompt, input_ids, messages")),
            Some(Input::Prompt(p)) => {
                let codec = self.text("prompt")?;
                self.fits("prompt", codec, p.len())?;
                codec.encode(&p).map_err(|e| Status::internal(e.to_string()))?
            }
            Some(Input::InputIds(ids)) => ids.ids,
            Some(Input::Messages(m)) => {
                let codec = self.text("messages")?;
                self.fits(
                    "messages",
                    codec,
                    m.messages.iter().map(|m| m.content.len() + m.role.len()).sum(),
                )?;
                let messages: Vec<Message> =
                    m.messages.into_iter().map(|m| Message { role: m.role, content: m.content }).collect();
                let rendered = codec
                    .render_chat(&messages)
                    .map_err(|e| Status::invalid_argument(format!("messages: {e}")))?;
                reasoning = crate::reasoning::opens_reasoning(&rendered);
                codec.encode(&rendered).map_err(|e| Status::internal(e.to_string()))?
            }
        };
        if prompt.is_empty() {
            return Err(Status::invalid_argument("input: the prompt has no tokens"));
        }
        let vocab = self.vocab_size;
        if let Some((pos, id)) = prompt.iter().enumerate().find(|(_, id)| **id as usize >= vocab) {
            return Err(Status::invalid_argument(format!(
                "input_ids: id {id} at position {pos} is outside the vocabulary (vocab_size {vocab})"
            )));
        }
        let max_tokens = match (r.max_tokens, unset) {
            (0, Unset::Default) => DEFAULT_MAX_TOKENS,
            (0, Unset::RestOfContext) => self.max_context.saturating_sub(prompt.len()).max(1),
            (n, _) => n as usize,
        };
        if prompt.len() + max_tokens > self.max_context {
            return Err(Status::invalid_argument(format!(
                "max_tokens: {} prompt tokens + {max_tokens} new tokens exceed the context length {}",
                prompt.len(),
                self.max_context
            )));
        }
        let sampling = SamplingParams {
            temperature: r.temperature,
            top_k: r.top_k as usize,
            top_p,
            seed: r.seed.unwrap_or(0),
        };
        let logprobs = r.logprobs.map(|n| n as usize);
        Ok(Prepared { prompt, reasoning, max_tokens, sampling, stop: r.stop, logprobs })
    }
}

impl InferenceService {
    /// The id of a request (the client's `x-request-id`, else one made here) and the span its
    /// log lines go in.
    pub(crate) fn identify(&self, client_id: Option<String>) -> (Arc<str>, tracing::Span) {
        let id: Arc<str> = client_id
            .unwrap_or_else(|| {
                let n = self.received.fetch_add(1, Ordering::Relaxed);
                format!("{:x}-{n}", std::process::id())
            })
            .into();
        let span = tracing::info_span!("request", id = %id, model = %self.admission.model_name);
        (id, span)
    }

    /// Validates, admits and submits `r` in the current request span; returns the stream of its
    /// responses.
    pub(crate) fn start(&self, id: Arc<str>, r: GenerateRequest, unset: Unset) -> Result<Started, Status> {
        let arrived = Instant::now();
        if let Some(why) = self.waiting.borrow().as_deref() {
            return Err(Status::unavailable(format!("not serving yet, waiting for the workers: {why}")));
        }
        let p = self
            .admission
            .prepare(r, unset)
            .inspect_err(|s| tracing::info!(error = %s.message(), "refused"))?;
        let active = self.active.fetch_add(1, Ordering::SeqCst);
        let guard = ActiveGuard(self.active.clone());
        if active >= self.max_concurrent {
            tracing::info!(active, limit = self.max_concurrent, "refused: over the concurrency limit");
            return Err(Status::resource_exhausted(format!(
                "{} requests are in progress, the limit is {}; retry later",
                active, self.max_concurrent
            )));
        }
        let (events_tx, events_rx) = mpsc::channel(p.max_tokens + 2);
        let submission = Submission {
            id,
            prompt: p.prompt.clone(),
            max_tokens: p.max_tokens,
            sampling: p.sampling,
            logprobs: p.logprobs,
            events: events_tx,
        };
        match self.engine.submit(submission) {
            Ok(()) => {}
            Err(SubmitError::Full) => {
                return Err(Status::resource_exhausted("the router's queue is full; retry later"))
            }
            Err(SubmitError::Stopped) => return Err(Status::unavailable("the router is shutting down")),
        }
        tracing::info!(prompt_tokens = p.prompt.len(), max_tokens = p.max_tokens, "admitted");
        let (out_tx, out_rx) = mpsc::channel(p.max_tokens + 2);
        let text = self.admission.text.clone();
        let detok = Detokenizer::new(p.stop);
        let timing = Timing { stats: self.stats.clone(), arrived, last_token: arrived };
        let relayed = relay(events_rx, out_tx, text, detok, p.prompt.len() as u32, timing, guard);
        tokio::spawn(relayed.instrument(tracing::Span::current()));
        Ok(Started { responses: out_rx, reasoning: p.reasoning })
    }
}

/// A request the batch loop took.
pub(crate) struct Started {
    pub responses: mpsc::Receiver<Result<GenerateResponse, Status>>,
    /// The chat template opened a `<think>` block: the answer starts with reasoning.
    pub reasoning: bool,
}

/// What a request's relay records in the router's statistics.
struct Timing {
    stats: Arc<crate::stats::Stats>,
    arrived: Instant,
    last_token: Instant,
}

impl Timing {
    /// A token arrived: the time to the first one, or since the previous one.
    fn token(&mut self, first: bool, prompt_tokens: u32) {
        let now = Instant::now();
        if first {
            self.stats.time_to_first_token.observe(now - self.arrived);
            self.stats.prompt_tokens.fetch_add(u64::from(prompt_tokens), Ordering::Relaxed);
        } else {
            self.stats.inter_token_latency.observe(now - self.last_token);
        }
        self.stats.generation_tokens.fetch_add(1, Ordering::Relaxed);
        self.last_token = now;
    }

    fn finished(&self, reason: FinishReason) {
        self.stats.e2e_latency.observe(self.arrived.elapsed());
        let counter = match reason {
            FinishReason::Length => &self.stats.success_length,
            _ => &self.stats.success_stop,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Turns batch-loop events into responses until the sequence ends or the client leaves.
async fn relay(
    mut events: mpsc::Receiver<Event>,
    out: mpsc::Sender<Result<GenerateResponse, Status>>,
    text: Option<Arc<TextCodec>>,
    mut detok: Detokenizer,
    prompt_tokens: u32,
    mut timing: Timing,
    _active: ActiveGuard,
) {
    let mut completion_tokens = 0u32;
    let usage = |completion_tokens| Some(Usage { prompt_tokens, completion_tokens });
    loop {
        // A client that leaves while its request waits or prefills frees its slot at once.
        let event = tokio::select! {
            event = events.recv() => event,
            () = out.closed() => return,
        };
        let Some(event) = event else { break };
        let message = match event {
            Event::Token(id, logprobs) => {
                let logprobs: Vec<TokenLogprobs> = logprobs.into_iter().map(wire_logprobs).collect();
                timing.token(completion_tokens == 0, prompt_tokens);
                completion_tokens += 1;
                let delta = match &text {
                    Some(codec) => detok.push(codec, id),
                    None => Ok(crate::text::Delta { text: String::new(), stopped: false }),
                };
                match delta {
                    Ok(d) if d.stopped => {
                        tracing::info!(completion_tokens, finish = "STOP", "finished at a stop string");
                        timing.finished(FinishReason::Stop);
                        let last = GenerateResponse {
                            token_ids: vec![id],
                            text: d.text,
                            finish_reason: FinishReason::Stop as i32,
                            usage: usage(completion_tokens),
                            logprobs,
                        };
                        let _ = out.send(Ok(last)).await;
                        return; // dropping `events` stops the sequence in the batch loop
                    }
                    Ok(d) => Ok(GenerateResponse {
                        token_ids: vec![id],
                        text: d.text,
                        logprobs,
                        ..Default::default()
                    }),
                    Err(e) => Err(Status::internal(e.to_string())),
                }
            }
            Event::Done(finish) => {
                let tail = text.as_deref().map(|c| detok.flush(c)).transpose();
                let reason = match finish {
                    Finish::Length => FinishReason::Length,
                    Finish::Stop => FinishReason::Stop,
                };
                tail.map(|t| GenerateResponse {
                    token_ids: vec![],
                    text: t.unwrap_or_default(),
                    finish_reason: reason as i32,
                    usage: usage(completion_tokens),
                    logprobs: Vec::new(),
                })
                .map_err(|e| Status::internal(e.to_string()))
            }
            Event::Failed(status) => Err(status),
        };
        let last = !matches!(&message, Ok(m) if m.finish_reason == FinishReason::Unspecified as i32);
        match &message {
            Ok(m) if last => {
                let reason = FinishReason::try_from(m.finish_reason).unwrap_or(FinishReason::Unspecified);
                tracing::info!(completion_tokens, finish = reason.as_str_name(), "finished");
                timing.finished(reason);
            }
            Err(status) => tracing::warn!(completion_tokens, error = %status.message(), "failed"),
            Ok(_) => {}
        }
        if out.send(message).await.is_err() || last {
            return;
        }
    }
}

fn wire_logprobs(l: kubemoe_model::Logprobs) -> TokenLogprobs {
    TokenLogprobs {
        token_id: l.token,
        logprob: l.logprob,
        top: l.top.into_iter().map(|(token_id, logprob)| TopLogprob { token_id, logprob }).collect(),
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

/// `response` carrying its request's id, so that a client can find the request in the logs.
fn with_id<T>(mut response: Response<T>, id: &str) -> Response<T> {
    if let Ok(value) = tonic::metadata::MetadataValue::try_from(id) {
        response.metadata_mut().insert(kubemoe_api::trace::REQUEST_ID_KEY, value);
    }
    response
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let (id, span) = self.identify(kubemoe_api::trace::client_request_id(request.metadata()));
        let mut rx =
            span.in_scope(|| self.start(id.clone(), request.into_inner(), Unset::Default))?.responses;
        let mut all = GenerateResponse::default();
        while let Some(m) = rx.recv().await {
            let m = m?;
            all.token_ids.extend(m.token_ids);
            all.text.push_str(&m.text);
            all.logprobs.extend(m.logprobs);
            if m.finish_reason != FinishReason::Unspecified as i32 {
                all.finish_reason = m.finish_reason;
                all.usage = m.usage;
                return Ok(with_id(Response::new(all), &id));
            }
        }
        Err(Status::internal("the sequence ended without a finish reason"))
    }

    type GenerateStreamStream = ResponseStream;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (id, span) = self.identify(kubemoe_api::trace::client_request_id(request.metadata()));
        let rx = span.in_scope(|| self.start(id.clone(), request.into_inner(), Unset::Default))?.responses;
        Ok(with_id(Response::new(Box::pin(ReceiverStream::new(rx))), &id))
    }

    async fn model_info(&self, _: Request<ModelInfoRequest>) -> Result<Response<ModelInfoResponse>, Status> {
        let c = &self.config;
        Ok(Response::new(ModelInfoResponse {
            model: self.admission.model_name.clone(),
            model_type: format!("{:?}", c.family).to_lowercase(),
            vocab_size: c.vocab_size as u32,
            max_context_length: self.admission.max_context as u32,
            num_hidden_layers: c.num_hidden_layers as u32,
            n_routed_experts: c.n_routed_experts as u32,
            num_experts_per_tok: c.gate.top_k as u32,
            workers: self.experts.workers() as u32,
            has_tokenizer: self.admission.text.is_some(),
            has_chat_template: self.admission.text.as_ref().is_some_and(|t| t.has_chat_template()),
        }))
    }
}

/// `kubemoe.expert.v1.Balancer`: the expert load this router measured, and placement switches.
pub struct BalancerService {
    pub experts: Arc<RemoteExperts>,
}

#[tonic::async_trait]
impl Balancer for BalancerService {
    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        let (layers, covered, plan) = self.experts.load();
        Ok(Response::new(LoadResponse {
            layers: layers.into_iter().map(|(layer, tokens)| LayerCounts { layer, tokens }).collect(),
            window_seconds: covered.as_secs_f64(),
            plan: Some((&plan).into()),
            workers_down: self.experts.down().into_iter().map(|w| w as u32).collect(),
        }))
    }

    async fn commit(&self, request: Request<CommitRequest>) -> Result<Response<CommitResponse>, Status> {
        let CommitRequest { plan, workers: request_workers } = request.into_inner();
        let plan = plan.ok_or_else(|| Status::invalid_argument("plan is missing"))?;
        let plan = PlacementPlan::try_from(plan).map_err(crate::Error::from)?;
        self.experts.commit(plan, request_workers).await?;
        Ok(Response::new(CommitResponse {}))
    }
}

/// The services of the public and of the internal port.
const INFERENCE: &str = "kubemoe.inference.v1.Inference";
const BALANCER: &str = "kubemoe.expert.v1.Balancer";

/// How and where the public gRPC API is served.
pub struct Public {
    /// What every inference call passes first (the API keys, [`kubemoe_api::auth`]).
    pub guard: Guard,
    /// How old a connection may grow before it is asked to go.
    pub max_connection_age: std::time::Duration,
    pub tls: Option<Arc<kubemoe_api::tls::ServerConfig>>,
    pub listener: TcpListener,
    /// A plaintext port serving health alone.
    pub health: Option<TcpListener>,
}

/// The public API as served: UNAVAILABLE, saying how far loading got, until the model is loaded
/// and the service set.
pub type PendingInference = Pending<InferenceServer<InferenceService>, Unavailable>;
/// The `Balancer` as served, likewise.
pub type PendingBalancer = Pending<BalancerServer<BalancerService>, Unavailable>;

/// Serves `inference` until `shutdown` fires: alive at once, ready once `waiting` is `None`
/// (weights loaded, workers answering), and NOT_SERVING first when shutting down.
pub async fn serve(
    inference: PendingInference,
    mut waiting: tokio::sync::watch::Receiver<Option<String>>,
    public: Public,
    shutdown: CancellationToken,
) -> crate::Result<()> {
    let Public { guard, max_connection_age, tls, listener, health: health_listener } = public;
    let inference = InterceptedService::new(inference, guard);
    let (reporter, health) = tonic_health::server::health_reporter();
    // Alive, not ready, before any probe can ask.
    kubemoe_api::health::starting(&reporter, INFERENCE).await;
    // Up until the server has drained, so that probes see it draining.
    let health_stop = CancellationToken::new();
    let _stop_health = health_stop.clone().drop_guard();
    if let Some(listener) = health_listener {
        tokio::spawn(kubemoe_api::health::serve(listener, health.clone(), health_stop));
    }
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // Every connection, idle ones included, is asked to go (GOAWAY: clients reconnect for
        // their next call) once it is this old; streams in progress finish first (no grace
        // limit: tonic 0.14, given one, waits age + grace and then cuts them). Long-lived
        // connections also stop pinning clients to one router of a Service.
        .max_connection_age(max_connection_age)
        // Dead peers' connections are found and closed rather than kept forever.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(health)
        .add_service(kubemoe_api::reflection::v1(&[INFERENCE])?)
        .add_service(kubemoe_api::reflection::v1alpha(&[INFERENCE])?)
        .add_service(inference)
        .serve_with_incoming_shutdown(kubemoe_api::conn::incoming(listener, tls), async move {
            // Ready once the workers are, then draining at shutdown: in this order, one after
            // the other, so that a shutdown never leaves health SERVING.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {}
                ready = async { waiting.wait_for(Option::is_none).await.is_ok() } => {
                    if ready {
                        kubemoe_api::health::serving(&reporter, INFERENCE).await;
                    }
                    shutdown.cancelled().await;
                }
            }
            kubemoe_api::health::draining(&reporter, INFERENCE).await;
        })
        .await?;
    Ok(())
}

/// Serves `balancer` on the internal port until `shutdown` fires: every call passes `guard`
/// (the deployment's internal token) first. Off the public port and its Service, so that no
/// client of the API can switch or read the placement.
pub async fn serve_internal(
    balancer: PendingBalancer,
    guard: Guard,
    tls: Option<Arc<kubemoe_api::tls::ServerConfig>>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> crate::Result<()> {
    tonic::transport::Server::builder()
        .add_service(InterceptedService::new(balancer, guard))
        .add_service(kubemoe_api::reflection::v1(&[BALANCER])?)
        .add_service(kubemoe_api::reflection::v1alpha(&[BALANCER])?)
        .serve_with_incoming_shutdown(kubemoe_api::conn::incoming(listener, tls), shutdown.cancelled_owned())
        .await?;
    Ok(())
}
