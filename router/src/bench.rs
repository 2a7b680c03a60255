//! `kubemoe bench-serving`: the distributed hot paths, each against a limit measured in the
//! same run:
//! - dispatch + combine bytes per decode step against the physical minimum
//!   (tokens × distinct destination workers × hidden × 4 bytes, each way; goal ≤ 1.05×);
//! - the data path's ([`kubemoe_api::data`]) and gRPC `Dispatch`'s throughput on a
//!   payload-only dispatch against raw loopback TCP moving the same bytes (goal ≥ 0.7×);
//! - decode tokens/s at batch 32 with the experts on the workers against the single-process
//!   engine (goal ≥ 0.8×);
//! - the same decode with each worker behind a [`crate::delay`] proxy adding a one-way delay
//!   to every segment (cross-node latency on one machine), against the run without it.

use crate::remote::RemoteExperts;
use crate::Result;
use kubemoe_api::auth::Bearer;
use kubemoe_api::channel;
use kubemoe_api::expert::expert_client::ExpertClient;
use kubemoe_api::expert::DispatchRequest;
use kubemoe_model::layers::RoutedExperts;
use kubemoe_model::{source, Experts, KvCache, Model, Sampler, SamplingParams};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub workers: usize,
    pub batch: usize,
    pub dispatch_bytes_per_step: f64,
    pub combine_bytes_per_step: f64,
    pub minimum_bytes_per_step: f64,
    /// (dispatch activations + routes + combine) / (2 × minimum).
    pub bytes_ratio_to_minimum: f64,
    pub transport_payload_bytes: usize,
    pub raw_tcp_gbps: f64,
    /// The data path (framed, persistent connection), what routers dispatch over.
    pub data_path_gbps: f64,
    pub data_path_ratio_to_raw_tcp: f64,
    /// gRPC `Dispatch`, for comparison.
    pub grpc_gbps: f64,
    pub grpc_ratio_to_raw_tcp: f64,
    pub single_process_decode_tps: f64,
    /// One micro-batch per step.
    pub distributed_decode_tps: f64,
    pub decode_ratio: f64,
    /// Two micro-batches per step ([`crate::engine::forward`]).
    pub overlapped_decode_tps: f64,
    /// Decode with injected delay, per one-way delay asked for.
    pub delayed: Vec<Delayed>,
}

/// Decode through delaying proxies, with one and two micro-batches per step.
#[derive(Debug, serde::Serialize)]
pub struct Delayed {
    pub one_way_us: u64,
    pub decode_tps: f64,
    /// Against `distributed_decode_tps` (no delay, one micro-batch).
    pub ratio_to_no_delay: f64,
    pub overlapped_decode_tps: f64,
    /// Against `overlapped_decode_tps` without delay.
    pub overlapped_ratio_to_no_delay: f64,
}

/// The workers at `urls` (each bound to 127.0.0.1) behind delaying proxies on 127.0.0.2 at
/// the same ports, gRPC and data path both: the proxies (kept while they serve) and the URLs
/// reaching the workers through them. The data port the router learns from a worker's `Info`
/// is then reached on the proxy's host too.
pub(crate) fn behind_proxies(
    runtime: &tokio::runtime::Runtime,
    urls: &[String],
    credential: &Bearer,
    delay: Duration,
) -> Result<(Vec<crate::delay::Proxy>, Vec<String>)> {
    let proxy_host = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let mut proxies = Vec::new();
    let mut proxied = Vec::new();
    for url in urls {
        let uri: tonic::codegen::http::Uri =
            url.parse().map_err(|e| crate::Error::Workers(format!("{url}: {e}")))?;
        let port = uri.port_u16().ok_or_else(|| crate::Error::Workers(format!("{url}: no port")))?;
        let mut client = ExpertClient::with_interceptor(channel(url, None)?, credential.clone());
        let info = runtime
            .block_on(client.info(kubemoe_api::expert::InfoRequest {}))
            .map_err(|s| crate::Error::Workers(s.to_string()))?
            .into_inner();
        for p in [port, info.data_port as u16].into_iter().filter(|p| *p != 0) {
            let upstream = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, p));
            let listen = std::net::SocketAddr::from((proxy_host, p));
            let proxy = crate::delay::start(listen, upstream, delay)
                .map_err(|e| crate::Error::Workers(format!("a delaying proxy on {listen}: {e}")))?;
            proxies.push(proxy);
        }
        proxied.push(format!("http://{proxy_host}:{port}"));
    }
    Ok((proxies, proxied))
}

/// Decode tokens/s of `batch` sequences for `steps` steps after a short prefill, in
/// `micro_batches` per step.
fn decode_rate(
    model: &Model,
    experts: &dyn RoutedExperts,
    batch: usize,
    steps: usize,
    micro_batches: usize,
) -> Result<f64> {
    let vocab = model.config.vocab_size;
    let mut caches: Vec<KvCache> = (0..batch).map(|_| KvCache::new(&model.config)).collect();
    let mut samplers: Vec<Sampler> =
        (0..batch).map(|_| Sampler::new(SamplingParams::default())).collect::<kubemoe_model::Result<_>>()?;
    let mut feed: Vec<Vec<u32>> =
        (0..batch).map(|s| (0..16).map(|i| ((s * 131 + i * 7) % vocab) as u32).collect()).collect();
    let mut started = Instant::now();
    for step in 0..=steps {
        if step == 1 {
            started = Instant::now(); // prefill excluded
        }
        let mut b: Vec<(&mut KvCache, &[u32])> =
            caches.iter_mut().zip(&feed).map(|(c, f)| (c, f.as_slice())).collect();
        let logits = crate::engine::forward(model, &mut b, experts, micro_batches, Model::forward_step_with)?;
        experts.end_step();
        for ((f, row), s) in feed.iter_mut().zip(logits.chunks(vocab)).zip(&mut samplers) {
            *f = vec![s.sample(row)?];
        }
    }
    Ok((batch * steps) as f64 / started.elapsed().as_secs_f64())
}

/// Raw loopback TCP: `bytes` one way and back per round, as a dispatch and its combine do.
async fn raw_tcp_gbps(bytes: usize, rounds: usize) -> std::io::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; bytes];
        for _ in 0..rounds {
            s.read_exact(&mut buf).await?;
            s.write_all(&buf).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    c.set_nodelay(true)?;
    let out = vec![1u8; bytes];
    let mut back = vec![0u8; bytes];
    let t = Instant::now();
    for _ in 0..rounds {
        c.write_all(&out).await?;
        c.read_exact(&mut back).await?;
    }
    let secs = t.elapsed().as_secs_f64();
    server.await.map_err(std::io::Error::other)??;
    Ok((2 * bytes * rounds) as f64 / secs / 1e9)
}

/// Payload-only dispatches (no routes: the worker sums nothing) to worker 0 over its data path.
async fn data_path_gbps(
    url: &str,
    credential: &Bearer,
    hidden: usize,
    layer: u32,
    tokens: usize,
    rounds: usize,
) -> Result<f64> {
    let status = |s: tonic::Status| crate::Error::Workers(s.to_string());
    let mut client = ExpertClient::with_interceptor(channel(url, None)?, credential.clone());
    let info = client.info(kubemoe_api::expert::InfoRequest {}).await.map_err(status)?.into_inner();
    let port = u16::try_from(info.data_port).ok().filter(|p| *p != 0).ok_or_else(|| {
        crate::Error::Workers(format!("worker 0 ({url}) names no data port: start it with --data-port"))
    })?;
    let uri: tonic::codegen::http::Uri =
        url.parse().map_err(|e| crate::Error::Workers(format!("{url}: {e}")))?;
    let host = uri.host().unwrap_or("127.0.0.1");
    let header = credential.0.as_ref().map(|k| k.header());
    let credential = header.as_ref().map(|h| h.as_bytes());
    let mut conn = kubemoe_api::data::Connection::open(host, port, None, credential).await.map_err(status)?;
    let activations = vec![0u8; tokens * hidden * 4];
    let t = Instant::now();
    for _ in 0..rounds {
        conn.call(layer, tokens as u32, "", &activations, &[], activations.len()).await.map_err(status)?;
    }
    Ok((2 * activations.len() * rounds) as f64 / t.elapsed().as_secs_f64() / 1e9)
}

/// Payload-only dispatches (no routes: the worker decodes, sums nothing, encodes) to worker 0.
async fn grpc_gbps(
    url: &str,
    credential: &Bearer,
    hidden: usize,
    layer: u32,
    tokens: usize,
    rounds: usize,
) -> Result<f64> {
    let max = kubemoe_api::MAX_MESSAGE_BYTES;
    let mut client = ExpertClient::with_interceptor(channel(url, None)?, credential.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let activations: bytes::Bytes = vec![0u8; tokens * hidden * 4].into();
    let t = Instant::now();
    for _ in 0..rounds {
        let r = DispatchRequest {
            layer,
            tokens: tokens as u32,
            activations: activations.clone(),
            routes: Default::default(),
        };
        client.dispatch(r).await.map_err(|s| crate::Error::Workers(s.to_string()))?;
    }
    Ok((2 * activations.len() * rounds) as f64 / t.elapsed().as_secs_f64() / 1e9)
}

/// The routed experts on the workers at `urls`, once each answers as it should for `model`.
pub(crate) fn connect(
    runtime: &tokio::runtime::Runtime,
    model: &str,
    config: &kubemoe_model::Config,
    urls: &[String],
    credential: &Bearer,
) -> Result<RemoteExperts> {
    let minute = Duration::from_secs(60);
    let remote = RemoteExperts::new(
        config,
        urls,
        None,
        credential.clone(),
        None,
        minute,
        minute,
        runtime.handle().clone(),
    )?;
    runtime.block_on(async {
        let started = Instant::now();
        while let Err(e) = remote.check_workers(model).await {
            if started.elapsed() > Duration::from_secs(120) {
                return Err(crate::Error::Workers(e));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(remote)
    })
}

/// Runs every measurement against the workers at `urls` (rank order, each on 127.0.0.1)
/// serving `model`, calling them with `credential` (their internal token); decode again
/// behind proxies delaying each way by each of `delays_us`.
pub fn run(
    model: &str,
    urls: &[String],
    credential: &Bearer,
    batch: usize,
    steps: usize,
    delays_us: &[u64],
) -> Result<Report> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let _entered = runtime.enter();
    let dense = source::open(model, Experts::None)?;
    let c = dense.config.clone();
    let remote_experts = |urls: &[String]| connect(&runtime, model, &c, urls, credential);
    let remote = remote_experts(urls)?;
    let distributed_decode_tps = decode_rate(&dense, &remote, batch, steps, 1)?;
    let steps_run = (steps + 1) as f64;
    let b = &remote.bytes;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let (sent, received, minimum) =
        (load(&b.activations) + load(&b.routes), load(&b.received), load(&b.minimum));
    let overlapped_decode_tps = decode_rate(&dense, &remote, batch, steps, 2)?;
    let mut delayed = Vec::new();
    for &us in delays_us {
        let (_proxies, proxied) = behind_proxies(&runtime, urls, credential, Duration::from_micros(us))?;
        let remote = remote_experts(&proxied)?;
        let decode_tps = decode_rate(&dense, &remote, batch, steps, 1)?;
        let overlapped = decode_rate(&dense, &remote, batch, steps, 2)?;
        delayed.push(Delayed {
            one_way_us: us,
            decode_tps,
            ratio_to_no_delay: decode_tps / distributed_decode_tps,
            overlapped_decode_tps: overlapped,
            overlapped_ratio_to_no_delay: overlapped / overlapped_decode_tps,
        });
    }
    drop(dense);
    let local = source::open(model, Experts::All)?;
    let single_process_decode_tps = decode_rate(&local, &local, batch, steps, 1)?;
    drop(local);
    // 512 tokens of activations per call: a large decode batch's dispatch to one worker.
    let tokens = 512;
    let payload = tokens * c.hidden_size * 4;
    let layer = c.moe_layers().next().unwrap_or(0) as u32;
    let (data, grpc, raw) = runtime.block_on(async {
        let data = data_path_gbps(&urls[0], credential, c.hidden_size, layer, tokens, 40).await?;
        let grpc = grpc_gbps(&urls[0], credential, c.hidden_size, layer, tokens, 40).await?;
        let raw = raw_tcp_gbps(payload, 40).await?;
        Ok::<_, crate::Error>((data, grpc, raw))
    })?;
    Ok(Report {
        workers: urls.len(),
        batch,
        dispatch_bytes_per_step: sent / steps_run,
        combine_bytes_per_step: received / steps_run,
        minimum_bytes_per_step: minimum / steps_run,
        bytes_ratio_to_minimum: (sent + received) / (2.0 * minimum),
        transport_payload_bytes: payload,
        raw_tcp_gbps: raw,
        data_path_gbps: data,
        data_path_ratio_to_raw_tcp: data / raw,
        grpc_gbps: grpc,
        grpc_ratio_to_raw_tcp: grpc / raw,
        single_process_decode_tps,
        distributed_decode_tps,
        decode_ratio: distributed_decode_tps / single_process_decode_tps,
        overlapped_decode_tps,
        delayed,
    })
}
