//! Routed experts computed by the workers: one dispatch per destination worker per MoE layer,
//! all in flight at once, each under a deadline, over the worker's data path
//! ([`kubemoe_api::data`]: framed, on persistent connections kept idle between calls) when its
//! `Info` names one, else as a gRPC `Dispatch`. Activations travel as raw little-endian f32
//! bytes; every byte sent and received is counted, and every routed token is counted per
//! (layer, expert) in the load window.
//!
//! A worker that fails a dispatch for a reason of its own (refused or reset connection,
//! deadline passed: `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `CANCELLED`, `UNKNOWN`) is marked down
//! at once and the layer is dispatched again without it: workers keep no state between
//! dispatches, so the replicas of its experts on live workers give the same sums. An expert
//! all of whose holders are down fails its step with `UNAVAILABLE` naming them, at once rather
//! than after a deadline each time. A task asks each down worker for its `Info` every
//! [`PROBE_EVERY`] and marks it live when it answers as the same rank holding what the plan in
//! force places on it. Refusals that are the request's fault (`INVALID_ARGUMENT`, ...) never
//! mark a worker down.
//!
//! Placement switches happen between two steps: a step routes every layer by the
//! plan committed when its first MoE layer ran (the second micro-batch of a step, on another
//! thread, joins that plan when it starts while the first still runs, else starts its own),
//! and [`RemoteExperts::commit`] answers only once no step routes by an older plan, so that
//! workers may then drop the experts it used.
//!
//! Membership is the committed plan's: it names how many workers there are, and a commit may
//! bring their URLs (else they come from the `{rank}` template or the list the router started
//! with). A live resize commits a plan over more or fewer workers; ranks only ever get added to
//! what the router knows (a step on the old plan may still dispatch to a rank the new one
//! drops), and a rank whose URL changed gets a new connection.

use crate::dispatch::{plan, WorkerBatch};
use crate::load::LoadWindow;
use crate::{Error, Result};
use kubemoe_api::expert::expert_client::ExpertClient;
use kubemoe_api::expert::{DispatchRequest, InfoRequest, InfoResponse};
use kubemoe_model::layers::{RoutedExperts, Routing};
use kubemoe_model::Config;
use kubemoe_placement::PlacementPlan;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

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

type Client = ExpertClient<kubemoe_api::auth::Internal>;

/// Most idle data-path connections kept per worker (one per call that was in flight at once).
const IDLE_CONNECTIONS: usize = 8;

/// A worker's data path: where it listens, and connections between calls.
struct DataPath {
    host: String,
    port: u16,
    idle: Mutex<Vec<kubemoe_api::data::Connection>>,
}

impl DataPath {
    /// The data path on `port` of the host of `url` (None for port 0: the worker has none).
    fn of(url: &str, port: u32) -> Option<Arc<Self>> {
        let port = u16::try_from(port).ok().filter(|p| *p != 0)?;
        let uri: tonic::codegen::http::Uri = url.parse().ok()?;
        let host = uri.host()?.to_string();
        Some(Arc::new(DataPath { host, port, idle: Mutex::new(Vec::new()) }))
    }

    /// One dispatch, on an idle connection or a new one; its partial sums are as long as its
    /// activations. An idle connection that fails as gone (the worker restarted since it was
    /// last used: a pod's container, on the same port) or refuses its credential (the token
    /// rotated since it was opened) is replaced by a new one once, as gRPC reconnects and
    /// presents the current token; a new connection that fails means the worker is down.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        tls: Option<&kubemoe_api::tls::Client>,
        credential: Option<&[u8]>,
        layer: u32,
        tokens: u32,
        requests: &str,
        activations: &[u8],
        routes: &[u8],
    ) -> Result<Vec<u8>, tonic::Status> {
        use kubemoe_api::data::Connection;
        let open = || Connection::open(&self.host, self.port, tls, credential);
        let idle = lock(&self.idle).pop();
        let reused = idle.is_some();
        let mut conn = match idle {
            Some(conn) => conn,
            None => open().await?,
        };
        let reply = activations.len();
        let partial = match conn.call(layer, tokens, requests, activations, routes, reply).await {
            Err(status)
                if reused
                    && matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unauthenticated) =>
            {
                conn = open().await?;
                conn.call(layer, tokens, requests, activations, routes, reply).await?
            }
            partial => partial?,
        };
        let mut idle = lock(&self.idle);
        if idle.len() < IDLE_CONNECTIONS {
            idle.push(conn);
        }
        Ok(partial)
    }
}

/// What the router was told about where the workers are: their URLs in rank order, or one URL
/// with `{rank}` in it (the operator's per-pod DNS names), which reaches any rank a plan names.
#[derive(Debug)]
pub enum Members {
    List(Vec<String>),
    Template(String),
}

impl Members {
    pub const RANK: &str = "{rank}";

    /// `--workers`: one template, or URLs none of which is one.
    pub fn parse(workers: &[String]) -> Result<Self> {
        match workers {
            [] => Err(Error::Workers("no workers given; pass their gRPC URLs in rank order".into())),
            [one] if one.contains(Self::RANK) => Ok(Members::Template(one.clone())),
            many if many.iter().any(|w| w.contains(Self::RANK)) => Err(Error::Workers(format!(
                "a URL with {} stands for every rank: give it alone, not among other URLs",
                Self::RANK
            ))),
            many => Ok(Members::List(many.to_vec())),
        }
    }

    /// The URL of each rank below `workers`, when known.
    fn urls(&self, workers: u32) -> Option<Vec<String>> {
        match self {
            Members::List(urls) => urls.get(..workers as usize).map(<[String]>::to_vec),
            Members::Template(t) => {
                Some((0..workers).map(|r| t.replace(Self::RANK, &r.to_string())).collect())
            }
        }
    }
}

/// The workers a router knows, by rank (shared with the probe task). Entries are added or
/// replaced, never removed: a step routing by an older plan may still reach any of them.
struct Workers {
    urls: Vec<String>,
    clients: Vec<Client>,
    /// Whether each takes dispatches.
    live: Vec<bool>,
    /// Each one's data path, as its last `Info` named it (None: gRPC `Dispatch`).
    data: Vec<Option<Arc<DataPath>>>,
}

impl Workers {
    /// Records the data port worker `rank` named in its `Info`; connections to the same port
    /// are kept.
    fn learn(&mut self, rank: usize, data_port: u32) {
        let same = self.data[rank].as_ref().map(|d| u32::from(d.port)) == Some(data_port);
        if !same {
            self.data[rank] = DataPath::of(&self.urls[rank], data_port);
            let path = self.data[rank].as_ref().map(|d| format!("{}:{}", d.host, d.port));
            tracing::info!(worker = rank, data_path = ?path, "dispatching over the data path when named, else gRPC");
        }
    }
}

pub struct RemoteExperts {
    workers: Arc<Mutex<Workers>>,
    /// What the router was started with; a list is kept up to date in `workers`.
    members: Members,
    /// How workers are reached: TLS (checked against the deployment's CA) or plaintext.
    tls: Option<kubemoe_api::tls::Client>,
    credential: kubemoe_api::auth::Bearer,
    hidden: usize,
    experts: u32,
    /// Decoder layer ids of the MoE layers, ascending.
    moe_layers: Vec<u32>,
    deadline: Duration,
    runtime: tokio::runtime::Handle,
    /// Shared with the probe task, which checks a returning worker against the plan in force.
    switch: Arc<Mutex<Switch>>,
    load: Mutex<LoadWindow>,
    /// The requests of the step in progress, named in every dispatch's metadata.
    requests: Mutex<Arc<str>>,
    pub bytes: ByteCounters,
}

/// How often a down worker is asked whether it is back, and how long it has to answer.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Whether a failed call says the worker (not the request) is the problem.
fn worker_down(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown)
}

/// A plan and, per MoE layer and logical expert, the workers holding it.
struct Routes {
    plan: PlacementPlan,
    holders: Vec<Vec<Vec<u32>>>,
}

impl Routes {
    fn new(plan: PlacementPlan) -> Arc<Self> {
        Arc::new(Routes { holders: plan.holders(), plan })
    }
}

struct Switch {
    /// What the next step routes by.
    committed: Arc<Routes>,
    /// What the step in progress routes by.
    step: Option<Arc<Routes>>,
    /// The threads in the step in progress: its two micro-batches run on two
    /// ([`crate::engine::forward`]), and the step lasts until the last of them is done.
    stepping: Vec<std::thread::ThreadId>,
}

/// Longest a commit waits for the step in progress to end.
const COMMIT_WAIT: Duration = Duration::from_secs(60);

/// The lock's data even after a panic elsewhere: every update below is a single assignment.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RemoteExperts {
    /// The workers of `workers` (URLs in rank order, or a `{rank}` template: [`Members`]),
    /// reached with `tls` (none: plaintext) and `credential`, routed by `plan` (default: the
    /// minimal initial placement over the listed workers), with load counted over `window`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        workers: &[String],
        tls: Option<kubemoe_api::tls::Client>,
        credential: kubemoe_api::auth::Bearer,
        plan: Option<PlacementPlan>,
        deadline: Duration,
        window: Duration,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self> {
        let members = Members::parse(workers)?;
        let experts = config.n_routed_experts as u32;
        let moe_layers: Vec<u32> = config.moe_layers().map(|l| l as u32).collect();
        let plan = match (plan, &members) {
            (Some(plan), _) => plan,
            (None, Members::List(urls)) => PlacementPlan::minimal(experts, &moe_layers, urls.len() as u32),
            (None, Members::Template(_)) => {
                return Err(Error::Workers(format!(
                    "a {} template in --workers needs --placement, which says how many workers there are",
                    Members::RANK
                )))
            }
        };
        plan.validate_for(experts, &moe_layers)?;
        let urls = match &members {
            Members::List(urls) if urls.len() != plan.workers as usize => {
                return Err(Error::Workers(format!(
                    "--workers lists {} URLs, the placement names {} workers: give one URL per rank",
                    urls.len(),
                    plan.workers
                )))
            }
            m => m.urls(plan.workers).unwrap_or_default(),
        };
        let clients =
            urls.iter().map(|u| client(tls.as_ref(), &credential, u)).collect::<Result<Vec<_>>>()?;
        let (live, data) = (vec![true; urls.len()], vec![None; urls.len()]);
        let workers = Arc::new(Mutex::new(Workers { live, urls, clients, data }));
        let switch =
            Arc::new(Mutex::new(Switch { committed: Routes::new(plan), step: None, stepping: Vec::new() }));
        runtime.spawn(probe(Arc::downgrade(&workers), Arc::downgrade(&switch)));
        Ok(Self {
            workers,
            members,
            tls,
            credential,
            hidden: config.hidden_size,
            experts,
            load: Mutex::new(LoadWindow::new(window, moe_layers.len(), experts as usize, Instant::now())),
            moe_layers,
            deadline,
            runtime,
            switch,
            requests: Mutex::new(Arc::from("")),
            bytes: ByteCounters::default(),
        })
    }

    /// Ranks of the committed plan's workers marked down.
    pub fn down(&self) -> Vec<usize> {
        let workers = self.committed().workers as usize;
        down_of(&lock(&self.workers).live).into_iter().filter(|&w| w < workers).collect()
    }

    /// How many workers the committed plan spreads the experts over.
    pub fn workers(&self) -> usize {
        self.committed().workers as usize
    }

    fn committed(&self) -> PlacementPlan {
        lock(&self.switch).committed.plan.clone()
    }

    /// Routes by `plan` from the next step on, over the workers at `urls` (one per rank of the
    /// plan; none: the ones the router knows or its template gives); returns once no step
    /// routes by an older plan. A plan is committed only when its epoch does not go back and
    /// every worker reports holding every expert the plan places on it (a plan the workers were
    /// not prepared for would fail every request); otherwise nothing changes.
    pub async fn commit(&self, plan: PlacementPlan, urls: Vec<String>) -> Result<()> {
        plan.validate_for(self.experts, &self.moe_layers)?;
        let epoch = plan.epoch;
        let older = |committed: &PlacementPlan| {
            (epoch < committed.epoch).then(|| {
                Error::Epoch(format!(
                    "plan epoch {epoch} is older than the committed epoch {}",
                    committed.epoch
                ))
            })
        };
        if let Some(e) = older(&lock(&self.switch).committed.plan) {
            return Err(e);
        }
        let n = plan.workers as usize;
        let known = lock(&self.workers).urls.clone();
        let urls = if urls.is_empty() {
            match &self.members {
                Members::Template(_) => self.members.urls(plan.workers),
                Members::List(_) => known.get(..n).map(<[String]>::to_vec),
            }
            .ok_or_else(|| {
                Error::WorkerUrls(format!(
                    "plan epoch {} names {n} workers and this router knows the URLs of {}: send them with it",
                    plan.epoch,
                    known.len()
                ))
            })?
        } else if urls.len() != n {
            return Err(Error::WorkerUrls(format!(
                "{} worker URLs for a plan of {n} workers: send one per rank",
                urls.len()
            )));
        } else {
            urls
        };
        // Ranks with a new URL get a new connection, checked before anything routes to it.
        let mut fresh = Vec::new();
        for (rank, url) in urls.iter().enumerate() {
            if known.get(rank) != Some(url) {
                fresh.push((rank, client(self.tls.as_ref(), &self.credential, url)?));
            }
        }
        let data_ports = self.check_held(&plan, &fresh).await?;
        {
            let mut s = lock(&self.switch);
            // Another commit may have gone first while the workers answered.
            if let Some(e) = older(&s.committed.plan) {
                return Err(e);
            }
            // `fresh` ascends and holds every rank past those known, which only ever grow: each
            // is one already known or the next.
            let mut w = lock(&self.workers);
            for (rank, client) in fresh {
                let url = urls[rank].clone();
                if rank < w.urls.len() {
                    (w.urls[rank], w.clients[rank], w.live[rank], w.data[rank]) = (url, client, true, None);
                } else {
                    w.urls.push(url);
                    w.clients.push(client);
                    w.live.push(true);
                    w.data.push(None);
                }
            }
            for (rank, port) in data_ports {
                w.learn(rank, port);
            }
            s.committed = Routes::new(plan);
        }
        // A step lasts milliseconds to seconds; poll rather than wire a notification into it.
        let started = Instant::now();
        loop {
            let step = lock(&self.switch).step.as_ref().map(|r| r.plan.epoch);
            let Some(old) = step.filter(|e| *e != epoch) else { break };
            if started.elapsed() > COMMIT_WAIT {
                return Err(Error::Epoch(format!(
                    "a step still routes by epoch {old} {COMMIT_WAIT:?} after epoch {epoch} was committed; \
                     the batch loop is stuck: restart this router"
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// Fails unless every live worker of `plan` holds every expert `plan` places on it, the
    /// ranks in `fresh` asked through their new client. A worker marked down is not asked (a
    /// recovery epoch is committed while it is): the probe checks it against the plan in force
    /// when it answers again. Returns the data port each asked worker named.
    async fn check_held(&self, plan: &PlacementPlan, fresh: &[(usize, Client)]) -> Result<Vec<(usize, u32)>> {
        let mut calls = tokio::task::JoinSet::new();
        let asked: Vec<(usize, Client)> = {
            let w = lock(&self.workers);
            (0..plan.workers as usize)
                .filter_map(|rank| match fresh.iter().find(|(r, _)| *r == rank) {
                    Some((_, c)) => Some((rank, c.clone())),
                    None => w.live.get(rank).filter(|up| **up).map(|_| (rank, w.clients[rank].clone())),
                })
                .collect()
        };
        for (rank, mut client) in asked {
            let deadline = self.deadline;
            calls.spawn(async move {
                let info = tokio::time::timeout(deadline, client.info(InfoRequest {})).await;
                (rank, info)
            });
        }
        let mut data_ports = Vec::new();
        while let Some(done) = calls.join_next().await {
            let (rank, info) = done.map_err(|e| Error::Workers(format!("worker info task: {e}")))?;
            let info = match info {
                Ok(Ok(info)) => info.into_inner(),
                Ok(Err(status)) => {
                    return Err(Error::Workers(format!("worker {rank}: {}", status.message())))
                }
                Err(_) => {
                    return Err(Error::Workers(format!(
                        "worker {rank}: no answer within {:?}",
                        self.deadline
                    )))
                }
            };
            // URLs a commit brought may be out of order: the rank must answer as itself.
            if info.rank as usize != rank {
                return Err(Error::WorkerUrls(format!(
                    "the worker given for rank {rank} reports rank {}: send the URLs in rank order",
                    info.rank
                )));
            }
            if let Some(loading) = still_loading(rank, &info) {
                return Err(Error::Workers(loading));
            }
            if let Some((layer, missing)) = first_missing(plan, rank as u32, &info) {
                return Err(Error::Epoch(format!(
                    "worker {rank} does not hold expert {missing} of layer {layer}, which plan epoch {} \
                     places on it: prepare the plan on every worker before committing it",
                    plan.epoch
                )));
            }
            data_ports.push((rank, info.data_port));
        }
        Ok(data_ports)
    }

    /// Tokens per logical expert of each MoE layer over the load window, the time it covers,
    /// and the plan committed.
    pub fn load(&self) -> (Vec<(u32, Vec<u64>)>, Duration, PlacementPlan) {
        let now = Instant::now();
        let (counts, covered) = {
            let mut w = lock(&self.load);
            (w.snapshot(now), w.covered(now))
        };
        let plan = lock(&self.switch).committed.plan.clone();
        (self.moe_layers.iter().copied().zip(counts).collect(), covered, plan)
    }

    /// Asks every worker what it holds; fails, saying what is wrong, unless worker `i` answers
    /// as rank `i` of this world, serving `model`, and holding what the committed plan places
    /// on it. A worker that does not answer (down, as a dispatch judges it) is no mismatch:
    /// when every expert has a holder among the others, it is marked down and routed around
    /// (the probe takes it back), so a router that starts while a worker is dead still serves.
    pub async fn check_workers(&self, model: &str) -> Result<(), String> {
        let routes = lock(&self.switch).committed.clone();
        let plan = &routes.plan;
        let clients = lock(&self.workers).clients[..plan.workers as usize].to_vec();
        let mut silent: Vec<(u32, String)> = Vec::new();
        for (i, mut c) in clients.into_iter().enumerate() {
            let info = match tokio::time::timeout(self.deadline, c.info(InfoRequest {})).await {
                Ok(Ok(info)) => info.into_inner(),
                Ok(Err(status)) if worker_down(&status) => {
                    silent.push((i as u32, format!("worker {i}: {}", status.message())));
                    continue;
                }
                Ok(Err(status)) => return Err(format!("worker {i}: {}", status.message())),
                Err(_) => {
                    silent.push((i as u32, format!("worker {i}: no answer within {:?}", self.deadline)));
                    continue;
                }
            };
            if info.rank as usize != i {
                return Err(format!("worker {i} reports rank {}; list workers in rank order", info.rank));
            }
            if info.model != model {
                return Err(format!("worker {i} serves model {}, this router {model}", info.model));
            }
            // Loading is being down for a while: routed around if others hold its experts.
            if let Some(loading) = still_loading(i, &info) {
                silent.push((i as u32, loading));
                continue;
            }
            if let Some((layer, missing)) = first_missing(plan, i as u32, &info) {
                return Err(format!(
                    "worker {i} (placement epoch {}) does not hold expert {missing} of layer {layer}, which \
                     this router's placement epoch {} places on it: start both from the same placement",
                    info.epoch, plan.epoch
                ));
            }
            lock(&self.workers).learn(i, info.data_port);
        }
        let Some((_, first)) = silent.first() else { return Ok(()) };
        let down: Vec<u32> = silent.iter().map(|(w, _)| *w).collect();
        let uncovered = plan.layers.iter().zip(&routes.holders).find_map(|(l, experts)| {
            let e = experts.iter().position(|holders| holders.iter().all(|w| down.contains(w)))?;
            Some((l.layer, e))
        });
        if let Some((layer, expert)) = uncovered {
            return Err(format!("{first}; expert {expert} of layer {layer} has no other holder"));
        }
        tracing::warn!(workers = ?down, "serving without workers that do not answer: their experts have replicas");
        let mut workers = lock(&self.workers);
        down.iter().for_each(|&w| workers.live[w as usize] = false);
        Ok(())
    }
}

impl RoutedExperts for RemoteExperts {
    fn run(&self, layer: usize, x: &[f32], routing: &Routing) -> kubemoe_model::Result<Vec<f32>> {
        let index = self.moe_layers.iter().position(|&l| l as usize == layer).ok_or_else(|| {
            unavailable(layer, tonic::Status::internal(format!("layer {layer} is not an MoE layer")))
        })?;
        let routes = {
            let mut s = lock(&self.switch);
            let me = std::thread::current().id();
            // The first MoE layer of a thread's step: it starts the step, or joins the one
            // the other micro-batch started (one plan for both).
            if !s.stepping.contains(&me) {
                if s.stepping.is_empty() {
                    s.step = Some(s.committed.clone());
                }
                s.stepping.push(me);
            }
            s.step.clone().unwrap_or_else(|| s.committed.clone())
        };
        lock(&self.load).record(Instant::now(), index, &routing.ids);
        let result = self.call(layer, x, routing, &routes.holders[index]);
        if result.is_err() || index + 1 == self.moe_layers.len() {
            self.end_step();
        }
        result
    }

    fn begin_step(&self, requests: &str) {
        *lock(&self.requests) = Arc::from(requests);
    }

    /// Ends this thread's part of the step; the step ends with its last thread.
    fn end_step(&self) {
        let mut s = lock(&self.switch);
        let me = std::thread::current().id();
        s.stepping.retain(|t| *t != me);
        if s.stepping.is_empty() {
            s.step = None;
        }
    }
}

impl RemoteExperts {
    /// One layer's dispatch and combine, routed by `holders` over the live workers; a worker
    /// that fails as down is marked so and the layer is dispatched again without it.
    fn call(
        &self,
        layer: usize,
        x: &[f32],
        routing: &Routing,
        holders: &[Vec<u32>],
    ) -> kubemoe_model::Result<Vec<f32>> {
        // Workers this call found down: excluded here even if the probe revives them meanwhile,
        // so that each round excludes one more worker and the loop ends.
        let mut failed_here = vec![false; lock(&self.workers).live.len()];
        loop {
            let live: Vec<bool> = lock(&self.workers)
                .live
                .iter()
                .zip(&failed_here)
                .map(|(up, failed)| *up && !failed)
                .collect();
            let batches = plan(routing, holders, &live)
                .map_err(|m| unavailable(layer, tonic::Status::unavailable(m)))?;
            let results = self.dispatch(layer, x, routing, &batches);
            let mut out = vec![0f32; x.len()];
            let mut failed = None;
            for r in results {
                match r {
                    Ok((w, partial)) => {
                        self.bytes.received.fetch_add(partial.len() as u64, Ordering::Relaxed);
                        batches[w].combine(&partial, self.hidden, &mut out).map_err(|m| {
                            unavailable(layer, tonic::Status::internal(format!("worker {w}: {m}")))
                        })?;
                    }
                    Err((w, status)) if worker_down(&status) => {
                        tracing::warn!(worker = w, error = %status.message(), "worker down; routing around it");
                        let mut workers = lock(&self.workers);
                        workers.live[w] = false;
                        // Its idle connections lead to what failed: the next ones are new.
                        if let Some(path) = &workers.data[w] {
                            lock(&path.idle).clear();
                        }
                        drop(workers);
                        failed_here[w] = true;
                        failed = Some(status);
                    }
                    Err((_, status)) => return Err(unavailable(layer, status)),
                }
            }
            match failed {
                None => return Ok(out),
                // The next round plans without the failed workers: at most one round per worker.
                Some(status) => {
                    tracing::debug!(layer, error = %status.message(), "dispatching the layer again")
                }
            }
        }
    }

    /// Sends each worker its batch, all at once, each under the deadline; the partial sums or
    /// each failure with its worker.
    fn dispatch(
        &self,
        layer: usize,
        x: &[f32],
        routing: &Routing,
        batches: &[WorkerBatch],
    ) -> Vec<Result<(usize, bytes::Bytes), (usize, tonic::Status)>> {
        let hidden = self.hidden;
        let requests = lock(&self.requests).clone();
        let tokens = routing.ids.len() / routing.top_k.max(1);
        // Span fields are evaluated only when the span is enabled: no list is built otherwise.
        let span = tracing::debug_span!(
            "dispatch",
            layer,
            workers = ?batches.iter().enumerate().filter(|(_, b)| !b.rows.is_empty()).map(|(w, _)| w).collect::<Vec<_>>(),
            tokens
        );
        tracing::debug!(parent: &span, "dispatching");
        // The batch loop runs on its own thread: spawn the calls on the server's runtime.
        let _entered = self.runtime.enter();
        let mut calls = tokio::task::JoinSet::new();
        for (w, b) in batches.iter().enumerate().filter(|(_, b)| !b.rows.is_empty()) {
            let (activations, routes) = b.encode(x, hidden);
            self.bytes.activations.fetch_add(activations.len() as u64, Ordering::Relaxed);
            self.bytes.routes.fetch_add(routes.len() as u64, Ordering::Relaxed);
            self.bytes.minimum.fetch_add((b.rows.len() * hidden * 4) as u64, Ordering::Relaxed);
            let (mut client, data) = {
                let workers = lock(&self.workers);
                (workers.clients[w].clone(), workers.data[w].clone())
            };
            let (layer, tokens) = (layer as u32, b.rows.len() as u32);
            let (deadline, requests) = (self.deadline, requests.clone());
            let (tls, credential) = (self.tls.clone(), self.credential.0.as_ref().map(|k| k.header()));
            let call = async move {
                let partial: Result<bytes::Bytes, tonic::Status> = match data {
                    Some(path) => {
                        let credential = credential.as_ref().map(|c| c.as_bytes());
                        let call = path.call(
                            tls.as_ref(),
                            credential,
                            layer,
                            tokens,
                            &requests,
                            &activations,
                            &routes,
                        );
                        match tokio::time::timeout(deadline, call).await {
                            Ok(partial) => partial.map(bytes::Bytes::from),
                            Err(_) => {
                                Err(tonic::Status::deadline_exceeded(format!("no answer in {deadline:?}")))
                            }
                        }
                    }
                    None => {
                        let request = DispatchRequest {
                            layer,
                            tokens,
                            activations: activations.into(),
                            routes: routes.into(),
                        };
                        let mut r = tonic::Request::new(request);
                        r.set_timeout(deadline);
                        kubemoe_api::trace::set_requests(r.metadata_mut(), &requests);
                        match tokio::time::timeout(deadline, client.dispatch(r)).await {
                            Ok(reply) => reply.map(|r| r.into_inner().partial),
                            Err(_) => {
                                Err(tonic::Status::deadline_exceeded(format!("no answer in {deadline:?}")))
                            }
                        }
                    }
                };
                partial
                    .map(|p| (w, p))
                    .map_err(|s| (w, tonic::Status::new(s.code(), format!("worker {w}: {}", s.message()))))
            };
            calls.spawn(tracing::Instrument::instrument(call, span.clone()));
        }
        self.runtime.block_on(calls.join_all())
    }
}

/// Ranks whose `live` flag is off.
fn down_of(live: &[bool]) -> Vec<usize> {
    live.iter().enumerate().filter(|(_, up)| !**up).map(|(w, _)| w).collect()
}

/// The first (layer, expert) `plan` places on worker `rank` that `info` does not report.
fn first_missing(plan: &PlacementPlan, rank: u32, info: &InfoResponse) -> Option<(u32, u32)> {
    plan.held(rank).into_iter().find_map(|(layer, wanted)| {
        let has = info.experts.iter().find(|l| l.layer == layer).map_or(&[][..], |l| l.experts.as_slice());
        wanted.iter().find(|e| !has.contains(e)).map(|e| (layer, *e))
    })
}

/// Asks each worker marked down for its `Info` every [`PROBE_EVERY`]; marks it live once it
/// answers as its rank holding every expert the plan in force places on it (a worker that
/// restarted on another placement stays down: it would compute the wrong experts). Ends when
/// the router drops its experts.
async fn probe(workers: std::sync::Weak<Mutex<Workers>>, switch: std::sync::Weak<Mutex<Switch>>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let (Some(workers), Some(switch)) = (workers.upgrade(), switch.upgrade()) else { return };
        // Ranks past the plan in force are left alone: a resize removed them.
        let placed = lock(&switch).committed.plan.workers as usize;
        let (down, clients) = {
            let w = lock(&workers);
            (down_of(&w.live).into_iter().filter(|&r| r < placed).collect::<Vec<_>>(), w.clients.clone())
        };
        for w in down {
            let mut client = clients[w].clone();
            let Ok(Ok(info)) = tokio::time::timeout(PROBE_EVERY, client.info(InfoRequest {})).await else {
                continue;
            };
            let info = info.into_inner();
            let routes = lock(&switch).committed.clone();
            let holds = info.loading.is_none() && first_missing(&routes.plan, w as u32, &info).is_none();
            if info.rank as usize == w && holds {
                tracing::info!(worker = w, epoch = routes.plan.epoch, "worker back; routing to it again");
                let mut workers = lock(&workers);
                workers.learn(w, info.data_port);
                workers.live[w] = true;
            }
        }
    }
}

/// A client of the worker at `url`.
fn client(
    tls: Option<&kubemoe_api::tls::Client>,
    credential: &kubemoe_api::auth::Bearer,
    url: &str,
) -> Result<Client> {
    let channel = kubemoe_api::channel(url, tls).map_err(|e| {
        Error::WorkerUrls(format!("{url} is not a worker URL: {}", kubemoe_placement::error_chain(&e)))
    })?;
    let max = kubemoe_api::MAX_MESSAGE_BYTES;
    Ok(ExpertClient::with_interceptor(channel, credential.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max))
}

/// `worker {rank}: loading weights: …` while the worker of `info` loads (it holds nothing yet).
fn still_loading(rank: usize, info: &InfoResponse) -> Option<String> {
    let progress = info.loading.as_ref()?;
    let described = kubemoe_api::loading::describe((progress.loaded_bytes, progress.total_bytes));
    Some(format!("worker {rank}: {described}"))
}

fn unavailable(layer: usize, status: tonic::Status) -> kubemoe_model::Error {
    kubemoe_model::Error::ExpertsUnavailable { layer, source: Box::new(status) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_a_list_or_one_rank_template() {
        let list = |urls: &[&str]| urls.iter().map(|u| u.to_string()).collect::<Vec<_>>();
        let template = Members::parse(&list(&["http://w-{rank}.svc:50052"])).unwrap();
        assert_eq!(
            template.urls(3).unwrap(),
            list(&["http://w-0.svc:50052", "http://w-1.svc:50052", "http://w-2.svc:50052"])
        );
        let two = Members::parse(&list(&["http://a:1", "http://b:2"])).unwrap();
        assert_eq!(two.urls(1).unwrap(), list(&["http://a:1"]));
        assert_eq!(two.urls(3), None, "a list reaches only the ranks it names");
        let mixed = Members::parse(&list(&["http://a:1", "http://w-{rank}:2"])).unwrap_err();
        assert!(mixed.to_string().contains("give it alone"), "{mixed}");
        assert!(Members::parse(&[]).unwrap_err().to_string().contains("no workers given"));
    }
}
