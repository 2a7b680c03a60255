//! `kubemoe bench-api`: a bounded load on a running router, `clients` concurrent clients each
//! streaming `requests` greedy completions, once through the OpenAI-compatible HTTP API and once
//! through gRPC `GenerateStream` (the limit: the same batch loop without the HTTP layer). Prints
//! throughput, time to first token and inter-token latency (p50, p99) of both, and the HTTP
//! path's throughput as a ratio of gRPC's.
//!
//! Inter-token latency is the gap between two streamed messages: one token each over gRPC; over
//! HTTP a chunk may carry more than one token when the detokenizer held text back, so its gaps
//! are a little coarser.

use crate::{Error, Result};
use kubemoe_api::inference::generate_request::Input;
use kubemoe_api::inference::inference_client::InferenceClient;
use kubemoe_api::inference::{GenerateRequest, TokenIds};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What one path measured.
#[derive(Debug, serde::Serialize)]
pub struct PathReport {
    pub requests: usize,
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub clients: usize,
    pub requests_per_client: usize,
    pub max_tokens: u32,
    pub http: PathReport,
    pub grpc: PathReport,
    pub http_throughput_ratio_to_grpc: f64,
}

/// Timings of one streamed request: its first message and the gaps after it.
struct Timings {
    ttft: Duration,
    gaps: Vec<Duration>,
    tokens: u64,
}

/// A prompt of `len` token ids that differs per request (no two requests share a prefix).
fn prompt(client: usize, request: usize, len: usize) -> Vec<u32> {
    (0..len).map(|i| ((client * 131 + request * 17 + i * 7) % 200 + 3) as u32).collect()
}

/// Runs the load on both paths; `http` and `grpc` are `host:port`, `model` the served name.
pub async fn run(
    http: &str,
    grpc: &str,
    model: &str,
    clients: usize,
    requests: usize,
    max_tokens: u32,
    api_key: Option<&str>,
) -> Result<Report> {
    let http_report = load(clients, requests, |c, r| {
        let (http, model, key) = (http.to_string(), model.to_string(), api_key.map(String::from));
        async move { http_request(&http, &model, &prompt(c, r, 16), max_tokens, key.as_deref()).await }
    })
    .await?;
    let grpc_url = if grpc.contains("://") { grpc.to_string() } else { format!("http://{grpc}") };
    let channel = kubemoe_api::channel(&grpc_url, None)
        .map_err(|source| Error::Connect { endpoint: grpc_url, source })?;
    let grpc_report = load(clients, requests, |c, r| {
        let client = InferenceClient::new(channel.clone());
        let key = api_key.map(String::from);
        async move { grpc_request(client, &prompt(c, r, 16), max_tokens, key.as_deref()).await }
    })
    .await?;
    let ratio = http_report.tokens_per_second / grpc_report.tokens_per_second.max(f64::MIN_POSITIVE);
    Ok(Report {
        clients,
        requests_per_client: requests,
        max_tokens,
        http: http_report,
        grpc: grpc_report,
        http_throughput_ratio_to_grpc: ratio,
    })
}

/// `clients` tasks, each running `requests` requests one after the other.
async fn load<F, Fut>(clients: usize, requests: usize, request: F) -> Result<PathReport>
where
    F: Fn(usize, usize) -> Fut,
    Fut: std::future::Future<Output = Result<Timings>> + Send + 'static,
{
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let runs: Vec<Fut> = (0..requests).map(|r| request(c, r)).collect();
        tasks.spawn(async move {
            let mut all = Vec::with_capacity(runs.len());
            for run in runs {
                all.push(run.await?);
            }
            Ok::<_, Error>(all)
        });
    }
    let mut timings = Vec::new();
    while let Some(done) = tasks.join_next().await {
        timings.extend(done.map_err(|e| Error::Workers(format!("load task: {e}")))??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let tokens: u64 = timings.iter().map(|t| t.tokens).sum();
    let mut ttft: Vec<f64> = timings.iter().map(|t| t.ttft.as_secs_f64() * 1e3).collect();
    let mut gaps: Vec<f64> =
        timings.iter().flat_map(|t| t.gaps.iter().map(|g| g.as_secs_f64() * 1e3)).collect();
    Ok(PathReport {
        requests: timings.len(),
        tokens,
        seconds,
        tokens_per_second: tokens as f64 / seconds,
        ttft_p50_ms: percentile(&mut ttft, 0.5),
        ttft_p99_ms: percentile(&mut ttft, 0.99),
        itl_p50_ms: percentile(&mut gaps, 0.5),
        itl_p99_ms: percentile(&mut gaps, 0.99),
    })
}

/// The `p` quantile of `xs` (0 for none).
pub(crate) fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

async fn grpc_request(
    mut client: InferenceClient<tonic::transport::Channel>,
    ids: &[u32],
    max_tokens: u32,
    api_key: Option<&str>,
) -> Result<Timings> {
    let request = GenerateRequest {
        input: Some(Input::InputIds(TokenIds { ids: ids.to_vec() })),
        max_tokens,
        ..Default::default()
    };
    let request = crate::client::authorized(request, api_key)?;
    let started = Instant::now();
    let mut stream = client.generate_stream(request).await.map_err(Error::Call)?.into_inner();
    let (mut first, mut last, mut gaps, mut tokens) = (None, started, Vec::new(), 0);
    while let Some(m) = stream.message().await.map_err(Error::Call)? {
        if m.token_ids.is_empty() {
            continue;
        }
        let now = Instant::now();
        match first {
            None => first = Some(now - started),
            Some(_) => gaps.push(now - last),
        }
        last = now;
        tokens += m.token_ids.len() as u64;
    }
    Ok(Timings { ttft: first.unwrap_or_default(), gaps, tokens })
}

/// One streamed completion over HTTP/1.0 (the server closes the connection after it).
async fn http_request(
    addr: &str,
    model: &str,
    ids: &[u32],
    max_tokens: u32,
    api_key: Option<&str>,
) -> Result<Timings> {
    let body = serde_json::json!({"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true}})
    .to_string();
    let io = |e: std::io::Error| Error::Workers(format!("HTTP to {addr}: {e}"));
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
    let authorization = api_key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let head = format!(
        "POST /v1/completions HTTP/1.0\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    stream.write_all(body.as_bytes()).await.map_err(io)?;
    let (mut first, mut last, mut gaps, mut tokens) = (None, started, Vec::new(), 0);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        // Whole events only: `data: …\n\n`.
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
            let Ok(value) = serde_json::from_str::<serde_json::Value>(data) else { continue };
            if let Some(n) = value["usage"]["completion_tokens"].as_u64() {
                tokens = n;
                continue;
            }
            if value["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
                let now = Instant::now();
                match first {
                    None => first = Some(now - started),
                    Some(_) => gaps.push(now - last),
                }
                last = now;
            }
        }
    }
    if tokens == 0 {
        return Err(Error::Workers(format!(
            "HTTP to {addr}: no usage in the stream (is it a kubemoe router?)"
        )));
    }
    Ok(Timings { ttft: first.unwrap_or_default(), gaps, tokens })
}
