//! Router and workers as real processes over TCP (`kubemoe worker`, `kubemoe router`), against
//! the single-process engine and the reference fixture.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use kubemoe_api::auth::{Bearer, Internal};
use kubemoe_api::expert::balancer_client::BalancerClient;
use kubemoe_api::expert::expert_client::ExpertClient;
use kubemoe_api::inference::generate_request::Input;
use kubemoe_api::inference::inference_client::InferenceClient;
use kubemoe_api::inference::{FinishReason, GenerateRequest, ModelInfoRequest, TokenIds};
use kubemoe_kernels::rel_err;
use kubemoe_model::generate::{generate, Request};
use kubemoe_model::{source, Experts, KvCache, SamplingParams};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;

fn fixture() -> String {
    fixture_variant("deepseek-v3-tiny")
}

fn fixture_variant(name: &str) -> String {
    let base = std::env::var_os("KUBEMOE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    base.join(name).to_str().unwrap().to_string()
}

/// A `kubemoe` child process, killed when dropped.
struct Proc {
    child: Child,
    addr: String,
    /// The HTTP server's address, for a router started with `--http-port`.
    http: Option<String>,
    /// The internal port's address, for a router started with `--internal-port`.
    internal: Option<String>,
    /// The plaintext health port's address, with `--health-port`.
    health: Option<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[&str]) -> Proc {
    // Warnings only: the tests' output stays readable; a failing child still says why.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kubemoe"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut address = || {
        let line = lines.next().expect("child printed nothing").unwrap();
        line.split("listening on ").nth(1).expect("no address line").trim().to_string()
    };
    let addr = address();
    let http = args.contains(&"--http-port").then(&mut address);
    let internal = args.contains(&"--internal-port").then(&mut address);
    let health = args.contains(&"--health-port").then(&mut address);
    std::thread::spawn(move || lines.for_each(drop));
    Proc { child, addr, http, internal, health }
}

/// Waits until `proc` is ready (its gRPC health SERVING: weights loaded, and for a router every
/// worker answering), asking its plaintext health port when it has one.
fn ready(proc: &Proc) {
    let addr = proc.health.as_ref().unwrap_or(&proc.addr).clone();
    // A runtime of its own, on a thread of its own: callers may be inside one.
    let wait = move || {
        let ready = async {
            tokio::time::timeout(Duration::from_secs(60), kubemoe_api::health::until_serving(&addr)).await
        };
        rt().block_on(ready).unwrap_or_else(|_| panic!("{addr} not ready after a minute")).unwrap()
    };
    std::thread::spawn(wait).join().unwrap()
}

fn worker(model: &str, rank: usize, n: usize, port: u16) -> Proc {
    worker_with(model, rank, n, port, &[])
}

fn worker_with(model: &str, rank: usize, n: usize, port: u16, extra: &[&str]) -> Proc {
    let (rank, n, port) = (rank.to_string(), n.to_string(), port.to_string());
    let mut args = vec![
        "worker",
        "--model",
        model,
        "--rank",
        &rank,
        "--world-size",
        &n,
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--data-port",
        "0",
    ];
    args.extend_from_slice(extra);
    let worker = spawn(&args);
    ready(&worker);
    worker
}

/// Workers and a router sharing an internal token, as a deployment's pods do.
struct Cluster {
    workers: Vec<Proc>,
    router: Proc,
    /// The file of the internal token, and the token.
    token_file: String,
    token: String,
}

static TOKENS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Cluster {
    fn start(model: &str, n: usize, router_args: &[&str]) -> Self {
        Self::start_with(model, n, router_args, &[])
    }

    /// [`Cluster::start`] with arguments for both roles (`--tls-dir`, …).
    fn start_with(model: &str, n: usize, router_args: &[&str], both: &[&str]) -> Self {
        let token = kubemoe_api::auth::generate_token().unwrap();
        let unique = TOKENS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token_file = std::env::temp_dir().join(format!("kubemoe-token-{}-{unique}", std::process::id()));
        std::fs::write(&token_file, &token).unwrap();
        let token_file = token_file.to_str().unwrap().to_string();
        let mut internal = vec!["--internal-token-file", token_file.as_str()];
        internal.extend_from_slice(both);
        let workers: Vec<Proc> = (0..n).map(|r| worker_with(model, r, n, 0, &internal)).collect();
        let urls: Vec<String> = workers.iter().map(|w| format!("http://{}", w.addr)).collect();
        let urls = urls.join(",");
        let mut args =
            vec!["router", "--model", model, "--workers", &urls, "--host", "127.0.0.1", "--port", "0"];
        args.extend_from_slice(router_args);
        args.extend_from_slice(&internal);
        args.extend_from_slice(&["--internal-port", "0"]);
        let router = spawn(&args);
        ready(&router);
        Self { workers, router, token_file, token }
    }

    /// A client of the router's internal port presenting `token`.
    fn balancer(&self, token: Option<&str>) -> BalancerClient<Internal> {
        let channel = kubemoe_api::channel(self.router.internal.as_ref().unwrap(), None).unwrap();
        BalancerClient::with_interceptor(channel, bearer(token))
    }

    async fn client(&self) -> InferenceClient<tonic::transport::Channel> {
        InferenceClient::connect(format!("http://{}", self.router.addr)).await.unwrap()
    }
}

fn bearer(token: Option<&str>) -> Bearer {
    Bearer(token.map(|t| std::sync::Arc::new(kubemoe_api::auth::Keys::fixed(t).unwrap())))
}

/// A client of the worker at `url` presenting `token`.
fn expert_client(url: &str, token: Option<&str>) -> ExpertClient<Internal> {
    ExpertClient::with_interceptor(kubemoe_api::channel(url, None).unwrap(), bearer(token))
}

fn ids_request(ids: &[u32], max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        input: Some(Input::InputIds(TokenIds { ids: ids.to_vec() })),
        max_tokens,
        ..Default::default()
    }
}

/// One user message through the chat template, `max_tokens` new tokens, greedy.
fn chat_request(content: &str, max_tokens: u32) -> GenerateRequest {
    let message = kubemoe_api::inference::ChatMessage { role: "user".into(), content: content.into() };
    let chat = kubemoe_api::inference::ChatMessages { messages: vec![message] };
    GenerateRequest { input: Some(Input::Messages(chat)), max_tokens, ..Default::default() }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

const FIXTURE_SEQS: [(&[u32], [u32; 8]); 2] = [
    (&[1, 17, 301, 42, 7, 199, 3, 88, 250, 511, 64, 5], [130, 25, 42, 154, 87, 287, 150, 469]),
    (&[1, 400, 2, 2, 97, 13, 300], [321, 445, 462, 117, 154, 9, 207, 322]),
];

#[test]
fn greedy_tokens_on_1_2_and_4_workers_equal_the_fixture_and_the_engine() {
    let model = fixture();
    let local = source::open(&model, Experts::All).unwrap();
    rt().block_on(async {
        for n in [1, 2, 4] {
            let cluster = Cluster::start(&model, n, &[]);
            let mut client = cluster.client().await;
            for (prompt, greedy) in FIXTURE_SEQS {
                let got = client.generate(ids_request(prompt, 8)).await.unwrap().into_inner();
                assert_eq!(got.token_ids, greedy, "{n} workers");
                assert_eq!(got.finish_reason, FinishReason::Length as i32);
                assert_eq!(got.usage.unwrap().completion_tokens, 8);
                let alone = generate(
                    &local,
                    &[Request {
                        prompt: prompt.to_vec(),
                        max_new_tokens: 8,
                        sampling: SamplingParams::default(),
                    }],
                )
                .unwrap();
                assert_eq!(got.token_ids, alone[0]);
            }
        }
    });
}

/// Routers and workers holding their weights in bf16 and FP8 (the stored fixtures kept as
/// stored, and the f32 fixture converted at load) serve what one process holding them so
/// does, and the stored fixtures' greedy tokens are transformers'.
#[test]
fn workers_and_routers_in_bf16_and_fp8_equal_the_engine_in_the_same_precision() {
    let runs = [
        ("deepseek-v3-tiny-bf16", "auto", true),
        ("deepseek-v3-tiny-fp8", "auto", true),
        ("deepseek-v3-tiny", "bf16", false),
        ("deepseek-v3-tiny", "fp8", false),
    ];
    for (variant, dtype, stored) in runs {
        let model = fixture_variant(variant);
        // transformers' greedy tokens on the stored values, for the stored variants.
        let reference: Option<Vec<Vec<u32>>> = stored.then(|| {
            let text = std::fs::read_to_string(PathBuf::from(&model).join("reference.json")).unwrap();
            let json: serde_json::Value = serde_json::from_str(&text).unwrap();
            let seqs = json["sequences"].as_array().unwrap();
            seqs.iter().map(|s| serde_json::from_value(s["greedy"].clone()).unwrap()).collect()
        });
        let precision: kubemoe_model::Precision = dtype.parse().unwrap();
        let local = source::open_as(&model, Experts::All, precision).unwrap();
        let cluster = Cluster::start_with(&model, 2, &[], &["--dtype", dtype, "--http-port", "0"]);
        rt().block_on(async {
            let mut client = cluster.client().await;
            for (i, (prompt, _)) in FIXTURE_SEQS.iter().enumerate() {
                let got = client.generate(ids_request(prompt, 8)).await.unwrap().into_inner();
                let request = Request {
                    prompt: prompt.to_vec(),
                    max_new_tokens: 8,
                    sampling: SamplingParams::default(),
                };
                assert_eq!(got.token_ids, generate(&local, &[request]).unwrap()[0], "{variant} as {dtype}");
                if let Some(reference) = &reference {
                    assert_eq!(got.token_ids, reference[i], "{variant}: transformers' greedy tokens");
                }
            }
        });
        // What each process holds, by its `/metrics`: the experts all in the precision asked
        // for (or stored), the router the same but for what FP8 keeps in 16 bits (embeddings,
        // gate, head).
        let held = |proc: &Proc| -> Vec<String> {
            let text = http(proc.http.as_ref().unwrap(), "GET", "/metrics", None).1;
            let prefix = "kubemoe_weights_held_bytes{dtype=\"";
            text.lines()
                .filter_map(|l| Some(l.strip_prefix(prefix)?.split('"').next()?.to_string()))
                .collect()
        };
        let fp8 = dtype == "fp8" || variant.ends_with("fp8");
        let experts = if fp8 { ["fp8"].as_slice() } else { ["bf16"].as_slice() };
        for worker in &cluster.workers {
            assert_eq!(held(worker), experts, "{variant} as {dtype}: a worker's experts");
        }
        let router = if fp8 { ["bf16", "fp8"].as_slice() } else { ["bf16"].as_slice() };
        assert_eq!(held(&cluster.router), router, "{variant} as {dtype}: the router's matrices");
    }
}

#[test]
fn distributed_logits_equal_single_process_logits() {
    let model = fixture();
    let local = source::open(&model, Experts::All).unwrap();
    let dense = source::open(&model, Experts::None).unwrap();
    let runtime = rt();
    let _entered = runtime.enter();
    for n in [2, 4] {
        let workers: Vec<Proc> = (0..n).map(|r| worker(&model, r, n, 0)).collect();
        let urls: Vec<String> = workers.iter().map(|w| format!("http://{}", w.addr)).collect();
        let remote = kubemoe_router::remote::RemoteExperts::new(
            &dense.config,
            &urls,
            None,
            kubemoe_api::auth::Bearer(None),
            None,
            Duration::from_secs(10),
            Duration::from_secs(60),
            runtime.handle().clone(),
        )
        .unwrap();
        // Dispatches go over a worker's data path once its Info named it: with 4 workers the
        // router asks (as it does at its start), with 2 it never does and they go over gRPC.
        if n == 4 {
            runtime.block_on(remote.check_workers(&model)).unwrap();
        }
        let (prompt, greedy) = FIXTURE_SEQS[0];
        let (mut a, mut b) = (KvCache::new(&local.config), KvCache::new(&local.config));
        let mut feed = prompt.to_vec();
        for next in greedy {
            let want = local.forward_step(&mut [(&mut a, &feed)]).unwrap();
            let got = dense.forward_step_with(&mut [(&mut b, &feed)], &remote).unwrap();
            let err = rel_err(&got, &want);
            assert!(err < 1e-5, "{n} workers: relative error {err}");
            feed = vec![next];
        }
        // Each token's activations went once to each worker holding any of its experts, and
        // one partial sum per token came back from each.
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let b = &remote.bytes;
        let min = load(&b.minimum);
        assert!(min > 0);
        assert_eq!(load(&b.activations), min);
        assert_eq!(load(&b.received), min);
    }
}

#[test]
fn sixteen_concurrent_streams_finish_with_what_they_would_alone() {
    // Also with steps of 7 tokens: prompts of up to 46 tokens are prefilled in chunks between
    // the decode steps of the others, and give the same tokens; and in two micro-batches.
    for args in [&[][..], &["--max-batch-tokens", "7"], &["--micro-batches", "2", "--max-batch-tokens", "20"]]
    {
        sixteen_concurrent_streams(args);
    }
}

fn sixteen_concurrent_streams(router_args: &[&str]) {
    let model = "builtin:tiny";
    let local = source::open(model, Experts::All).unwrap();
    let cluster = Cluster::start(model, 2, router_args);
    let requests: Vec<(Vec<u32>, u32, f32, u64)> = (0..16u32)
        .map(|i| {
            let prompt = (0..1 + i * 3).map(|j| (j * 37 + i * 11) % 500 + 2).collect();
            (prompt, 4 + (i % 5) * 4, if i % 3 == 0 { 0.8 } else { 0.0 }, i as u64)
        })
        .collect();
    let results = rt().block_on(async {
        let mut tasks = Vec::new();
        for (prompt, max_tokens, temperature, seed) in requests.clone() {
            let mut client = cluster.client().await;
            tasks.push(tokio::spawn(async move {
                let mut r = ids_request(&prompt, max_tokens);
                r.temperature = temperature;
                r.seed = Some(seed);
                let mut stream = client.generate_stream(r).await.unwrap().into_inner();
                let mut ids = Vec::new();
                let mut finish = 0;
                while let Some(m) = stream.message().await.unwrap() {
                    ids.extend(m.token_ids);
                    finish = m.finish_reason;
                }
                (ids, finish)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for ((prompt, max_tokens, temperature, seed), (ids, finish)) in requests.into_iter().zip(results) {
        let sampling = SamplingParams { temperature, top_k: 0, top_p: 1.0, seed };
        let alone =
            generate(&local, &[Request { prompt, max_new_tokens: max_tokens as usize, sampling }]).unwrap();
        assert_eq!(ids, alone[0], "{router_args:?}");
        assert_ne!(finish, FinishReason::Unspecified as i32);
    }
}

/// kubemoe-tiny-chat, the trained model `up` serves by default (it has an MTP module).
fn tiny_chat() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/kubemoe-tiny-chat").to_str().unwrap().to_string()
}

#[test]
fn speculative_decoding_on_workers_gives_the_greedy_tokens_of_plain_decoding() {
    let model = tiny_chat();
    let local = source::open(&model, Experts::All).unwrap();
    let chat = |content: &str| {
        let mut ids = vec![0, 2];
        ids.extend(local_encode(&model, content));
        ids.push(3);
        ids
    };
    let prompts: Vec<Vec<u32>> =
        ["Tell me a story about the owl.", "Who is Ada?", "What is 6 + 9?", "Tell me about the frog."]
            .iter()
            .map(|c| chat(c))
            .chain((0..8u32).map(|i| (0..1 + i * 4).map(|j| (j * 37 + i * 11) % 800 + 4).collect()))
            .collect();
    for (k, prefix_cache) in [("mtp:1", "0"), ("mtp:3", "256")] {
        let cluster = Cluster::start(
            &model,
            2,
            &["--speculative", k, "--http-port", "0", "--prefix-cache-mib", prefix_cache],
        );
        // All at once (batched; the first twice).
        let got = rt().block_on(async {
            let mut tasks = Vec::new();
            for prompt in prompts.iter().chain(&prompts[..1]) {
                let mut client = cluster.client().await;
                let request = ids_request(prompt, 40);
                tasks.push(tokio::spawn(async move {
                    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
                    let mut ids = Vec::new();
                    while let Some(m) = stream.message().await.unwrap() {
                        ids.extend(m.token_ids);
                    }
                    ids
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        for (prompt, ids) in prompts.iter().chain(&prompts[..1]).zip(got) {
            let sampling = SamplingParams::default();
            let alone = generate(&local, &[Request { prompt: prompt.clone(), max_new_tokens: 40, sampling }])
                .unwrap();
            assert_eq!(ids, alone[0], "{k}");
        }
        // The drafts were verified and most of the first position's accepted.
        let text = http(cluster.router.http.as_ref().unwrap(), "GET", "/metrics", None).1;
        let name = format!("model_name=\"{model}\"");
        let drafts = series(&text, &format!("vllm:spec_decode_num_drafts_total{{{name}}}"));
        let first = series(
            &text,
            &format!("vllm:spec_decode_num_accepted_tokens_per_pos_total{{{name},position=\"0\"}}"),
        );
        assert!(drafts > 0.0 && first / drafts > 0.3, "{k}: {first} of {drafts}");
    }
}

/// `text`'s token ids under the tokenizer of the model directory `model`.
fn local_encode(model: &str, text: &str) -> Vec<u32> {
    let codec = kubemoe_router::text::TextCodec::load(model, usize::MAX).unwrap().unwrap();
    codec.encode(text).unwrap()
}

#[test]
fn a_router_refuses_to_speculate_without_an_mtp_module() {
    let out = Command::new(env!("CARGO_BIN_EXE_kubemoe"))
        .args([
            "router",
            "--model",
            "builtin:tiny",
            "--workers",
            "http://127.0.0.1:1",
            "--port",
            "0",
            "--speculative",
            "mtp:1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--speculative mtp:1: builtin:tiny has no MTP module"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_kubemoe"))
        .args(["router", "--speculative", "mtp:7"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not mtp:K with K from 1 to 4"));
}

/// `bench-speculative --delay-us`: the distributed runs again behind delaying proxies, each
/// with the tokens of decoding without speculation and no faster than the delay allows; a
/// delay without workers, or of 0, is refused.
#[test]
fn bench_speculative_across_a_delayed_link_keeps_the_tokens_of_plain_decoding() {
    let bench = |workers: &str, delay: &str| {
        Command::new(env!("CARGO_BIN_EXE_kubemoe"))
            .args(["bench-speculative", "--batch", "1,2", "--drafts", "2", "--max-tokens", "24"])
            .args(["--workers", workers, "--delay-us", delay])
            .output()
            .unwrap()
    };
    let out = bench("2", "2000");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let runs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let labels: Vec<(u64, u64)> =
        runs.iter().map(|r| (r["workers"].as_u64().unwrap(), r["delay_us"].as_u64().unwrap())).collect();
    // (experts, delay) × batch 1, 2 × drafts 0, 2.
    assert_eq!(labels, [(0, 0), (2, 0), (2, 2000)].iter().flat_map(|l| [*l; 4]).collect::<Vec<_>>());
    for r in &runs {
        assert_eq!(r["same_tokens"], true, "{r}");
        assert!(r["generated_tokens"].as_u64().unwrap() > 0, "{r}");
    }
    // Through the proxies: a decode step without drafts waits out a round trip (2 × 2 ms) for
    // each MoE layer, so batch 1 decodes no faster than that allows (the direct runs are ~10×).
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(tiny_chat()).join("config.json")).unwrap(),
    )
    .unwrap();
    let moe_layers =
        config["num_hidden_layers"].as_u64().unwrap() - config["first_k_dense_replace"].as_u64().unwrap();
    let delayed = &runs[8];
    assert_eq!((delayed["batch"].as_u64(), delayed["speculative_tokens"].as_u64()), (Some(1), Some(0)));
    let bound = 1.0 / (moe_layers as f64 * 2.0 * 2e-3);
    assert!(delayed["decode_tps"].as_f64().unwrap() < bound, "{delayed} (at most {bound} tok/s)");
    let out = bench("0", "2000");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("give workers (--workers) too"), "{stderr}");
    let out = bench("2", "0");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--delay-us 0"), "{stderr}");
}

/// A build without the `cuda` feature refuses a GPU for the experts before it starts or loads
/// anything, saying how to build one that has it (CI's build has no `cuda`).
#[cfg(not(feature = "cuda"))]
#[test]
fn a_gpu_device_is_refused_by_a_build_without_cuda() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kubemoe")).args(args).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run(&["up", "--model", "builtin:tiny", "--device", "cuda:0", "--grpc-port", "0"]);
    assert!(
        stderr.contains("--device cuda:0: this kubemoe was built without CUDA")
            && stderr.contains("--features cuda"),
        "{stderr}"
    );
    let stderr = run(&[
        "worker",
        "--model",
        "builtin:tiny",
        "--rank",
        "0",
        "--world-size",
        "1",
        "--port",
        "0",
        "--device",
        "cuda:1",
    ]);
    assert!(stderr.contains("--device cuda:1: this kubemoe was built without CUDA"), "{stderr}");
    let stderr = run(&["worker", "--model", "builtin:tiny", "--rank", "0", "--device", "gpu"]);
    assert!(stderr.contains("use cpu, cuda or cuda:N"), "{stderr}");
    let stderr = run(&["run", "--model", "/nonexistent", "--input-ids", "1,2", "--device", "cuda:0"]);
    assert!(stderr.contains("--device cuda:0: this kubemoe was built without CUDA"), "{stderr}");
}

#[test]
fn prompts_sharing_a_prefix_reuse_its_cached_rows_and_answer_what_they_would_without() {
    let model = "builtin:tiny";
    let local = source::open(model, Experts::All).unwrap();
    // Chunked too: a prompt's cached blocks were prefilled over several steps; and in two
    // micro-batches.
    let variants =
        [&["--http-port", "0"][..], &["--http-port", "0", "--max-batch-tokens", "7", "--micro-batches", "2"]];
    for router_args in variants {
        let cluster = Cluster::start(model, 2, router_args);
        let system: Vec<u32> = (0..40).map(|j| (j * 29 + 3) % 500 + 2).collect();
        let prompt = |i: u32| -> Vec<u32> {
            system.iter().copied().chain((0..1 + i % 5).map(|j| i * 7 + j + 2)).collect()
        };
        let ask = |prompts: Vec<(Vec<u32>, f32, u64)>| {
            rt().block_on(async {
                let mut tasks = Vec::new();
                for (prompt, temperature, seed) in prompts {
                    let mut client = cluster.client().await;
                    tasks.push(tokio::spawn(async move {
                        let mut r = ids_request(&prompt, 6);
                        (r.temperature, r.seed) = (temperature, Some(seed));
                        client.generate(r).await.unwrap().into_inner().token_ids
                    }));
                }
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await.unwrap());
                }
                out
            })
        };
        // The first prompt alone fills the cache; then eight at once, greedy and sampled, the
        // system prompt's two whole blocks found in it.
        let waves = [
            vec![(prompt(0), 0.0, 0)],
            (1..9u32).map(|i| (prompt(i), if i % 2 == 0 { 0.8 } else { 0.0 }, i as u64)).collect(),
        ];
        for wave in waves {
            let got = ask(wave.clone());
            for ((prompt, temperature, seed), ids) in wave.into_iter().zip(got) {
                let sampling = SamplingParams { temperature, top_k: 0, top_p: 1.0, seed };
                let alone = generate(&local, &[Request { prompt, max_new_tokens: 6, sampling }]).unwrap();
                assert_eq!(ids, alone[0], "{router_args:?}");
            }
        }
        let text = http(cluster.router.http.as_ref().unwrap(), "GET", "/metrics", None).1;
        let hits = series(&text, &format!("vllm:prefix_cache_hits_total{{model_name=\"{model}\"}}"));
        assert_eq!(hits, 8.0 * 32.0, "{router_args:?}: {text}");
        assert!(series(&text, "kubemoe_router_prefix_cache_bytes") > 0.0);
    }
}

#[test]
fn a_killed_worker_fails_its_requests_quickly_and_service_resumes_when_it_returns() {
    let model = "builtin:tiny";
    let mut cluster = Cluster::start(model, 2, &["--worker-deadline-ms", "2000"]);
    let port: u16 = cluster.workers[1].addr.rsplit(':').next().unwrap().parse().unwrap();
    rt().block_on(async {
        let mut client = cluster.client().await;
        let mut stream = client.generate_stream(ids_request(&[5, 6, 7], 240)).await.unwrap().into_inner();
        stream.message().await.unwrap().unwrap();
        let killed = Instant::now();
        let _ = cluster.workers[1].child.kill();
        let _ = cluster.workers[1].child.wait();
        let status = loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    assert_eq!(m.finish_reason, FinishReason::Unspecified as i32, "finished before the kill")
                }
                Ok(None) => panic!("stream ended without an error"),
                Err(s) => break s,
            }
        };
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(killed.elapsed() < Duration::from_secs(5), "took {:?}", killed.elapsed());
        // The router stays up and says why while the worker is away.
        client.model_info(ModelInfoRequest {}).await.unwrap();
        let err = client.generate(ids_request(&[5, 6, 7], 4)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        // The worker comes back on its address; requests succeed again.
        cluster.workers[1] = worker_with(model, 1, 2, port, &["--internal-token-file", &cluster.token_file]);
        let started = Instant::now();
        loop {
            match client.generate(ids_request(&[5, 6, 7], 4)).await {
                Ok(r) => break assert_eq!(r.into_inner().token_ids.len(), 4),
                Err(s) if started.elapsed() < Duration::from_secs(20) => {
                    assert_eq!(s.code(), Code::Unavailable);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(s) => panic!("still failing after the worker returned: {s:?}"),
            }
        }
    });
}

/// Sends raw bytes as the message: what a broken or hostile client can put on the wire.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

#[test]
fn malformed_protobuf_is_invalid_argument_on_every_service() {
    let c = Cluster::start("builtin:tiny", 1, &[]);
    // Field 1 with wire type 7 (none such), then a length running past the end.
    let garbage = [vec![0x0f, 0x01], vec![0x0a, 0xff, 0x01, 0x00]];
    let calls = [
        (c.router.addr.clone(), "/kubemoe.inference.v1.Inference/Generate"),
        (c.router.addr.clone(), "/kubemoe.inference.v1.Inference/GenerateStream"),
        (c.workers[0].addr.clone(), "/kubemoe.expert.v1.Expert/Prepare"),
        (c.workers[0].addr.clone(), "/kubemoe.expert.v1.Expert/Dispatch"),
        (c.router.internal.clone().unwrap(), "/kubemoe.expert.v1.Balancer/Commit"),
    ];
    rt().block_on(async {
        for (addr, path) in calls {
            for bytes in &garbage {
                let channel = kubemoe_api::channel(&addr, None).unwrap();
                let channel =
                    tonic::service::interceptor::InterceptedService::new(channel, bearer(Some(&c.token)));
                let mut grpc = tonic::client::Grpc::new(channel);
                grpc.ready().await.unwrap();
                let request = tonic::Request::new(bytes.clone());
                let path = http::uri::PathAndQuery::from_static(path);
                let status = grpc.unary(request, path.clone(), RawCodec).await.unwrap_err();
                assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
                assert!(status.message().contains("malformed protobuf"), "{path}: {}", status.message());
            }
        }
        // The servers still serve.
        c.client().await.generate(ids_request(&[1, 2, 3], 2)).await.unwrap();
    });
}

#[test]
fn bad_requests_are_invalid_argument_naming_the_field() {
    let cluster = Cluster::start(&fixture(), 1, &["--max-context", "64"]);
    rt().block_on(async {
        let mut client = cluster.client().await;
        let check = |r: GenerateRequest, field: &'static str| {
            let mut c = client.clone();
            async move {
                let s = c.generate(r).await.unwrap_err();
                assert_eq!(s.code(), Code::InvalidArgument, "{field}: {s:?}");
                assert!(s.message().starts_with(field), "{field}: {}", s.message());
            }
        };
        check(GenerateRequest::default(), "input").await;
        check(ids_request(&[], 4), "input").await;
        check(ids_request(&[1, 512], 4), "input_ids").await;
        check(ids_request(&[1, 2], 63), "max_tokens").await;
        check(GenerateRequest { temperature: -0.5, ..ids_request(&[1], 4) }, "temperature").await;
        check(GenerateRequest { top_p: Some(1.5), ..ids_request(&[1], 4) }, "top_p").await;
        check(GenerateRequest { top_p: Some(0.0), ..ids_request(&[1], 4) }, "top_p").await;
        // The fixture ships no tokenizer: text needs token ids instead.
        check(GenerateRequest { input: Some(Input::Prompt("hi".into())), ..Default::default() }, "prompt")
            .await;
        // A valid request still works.
        assert_eq!(client.generate(ids_request(&[1, 2], 62)).await.unwrap().into_inner().token_ids.len(), 62);
    });
}

#[test]
fn requests_past_the_concurrency_limit_are_refused_and_the_others_finish() {
    let cluster = Cluster::start("builtin:tiny", 1, &["--max-concurrent", "2"]);
    rt().block_on(async {
        let client = cluster.client().await;
        let mut streams = Vec::new();
        for _ in 0..2 {
            let mut c = client.clone();
            let mut s = c.generate_stream(ids_request(&[3, 4], 200)).await.unwrap().into_inner();
            s.message().await.unwrap().unwrap();
            streams.push(s);
        }
        let s = client.clone().generate(ids_request(&[3], 4)).await.unwrap_err();
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        for mut s in streams {
            let mut last = 0;
            while let Some(m) = s.message().await.unwrap() {
                last = m.finish_reason;
            }
            assert_eq!(last, FinishReason::Length as i32);
        }
        // Capacity is back.
        assert_eq!(
            client.clone().generate(ids_request(&[3], 4)).await.unwrap().into_inner().token_ids.len(),
            4
        );
    });
}

#[test]
fn text_prompts_and_chat_go_through_the_tokenizer_and_stop_strings_end_early() {
    let cluster = Cluster::start("builtin:tiny", 2, &[]);
    let local = source::open("builtin:tiny", Experts::All).unwrap();
    rt().block_on(async {
        let mut client = cluster.client().await;
        let r = GenerateRequest {
            input: Some(Input::Prompt("Hello".into())),
            max_tokens: 12,
            ..Default::default()
        };
        let got = client.generate(r).await.unwrap().into_inner();
        // "Hello" is 5 byte tokens (ids 2 + byte) in the generated tokenizer.
        let prompt: Vec<u32> = "Hello".bytes().map(|b| b as u32 + 2).collect();
        let alone =
            generate(&local, &[Request { prompt, max_new_tokens: 12, sampling: SamplingParams::default() }])
                .unwrap();
        assert_eq!(got.token_ids, alone[0]);
        assert!(!got.text.is_empty() || got.token_ids.iter().all(|t| *t < 2));
        // A stop string taken from the middle of that text ends the completion before it.
        let chars: Vec<char> = got.text.chars().collect();
        assert!(chars.len() >= 4, "the greedy completion {:?} is too short to cut", got.text);
        {
            let stop: String = chars[2..4].iter().collect();
            let r = GenerateRequest {
                input: Some(Input::Prompt("Hello".into())),
                max_tokens: 12,
                stop: vec![stop.clone()],
                ..Default::default()
            };
            let cut = client.generate(r).await.unwrap().into_inner();
            assert_eq!(cut.finish_reason, FinishReason::Stop as i32);
            assert!(
                got.text.starts_with(&cut.text) && !cut.text.contains(&stop),
                "{:?} vs {:?}",
                cut.text,
                got.text
            );
        }
        let got = client.generate(chat_request("hi", 3)).await.unwrap().into_inner();
        // Stop strings are bounded in number and length.
        for (stop, says) in [
            (vec!["x".to_string(); 17], "stop: 17 stop strings"),
            (vec!["y".repeat(513)], "stop: a stop string of 513 bytes"),
        ] {
            let r = GenerateRequest { input: Some(Input::Prompt("Hi".into())), stop, ..Default::default() };
            let status = client.generate(r).await.unwrap_err();
            assert!(
                status.code() == Code::InvalidArgument && status.message().starts_with(says),
                "{status:?}"
            );
        }
        // A prompt that cannot fit the context whatever its tokens is refused before it is
        // tokenised, and says so.
        let started = Instant::now();
        let huge = GenerateRequest { input: Some(Input::Prompt("a".repeat(3 << 20))), ..Default::default() };
        let status = client.generate(huge).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with("prompt: 3145728 bytes of text are at least"),
            "{}",
            status.message()
        );
        let status = client.generate(chat_request(&"a".repeat(3 << 20), 3)).await.unwrap_err();
        assert!(status.message().starts_with("messages: "), "{}", status.message());
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert_eq!(got.usage.unwrap().prompt_tokens, 1 + "<｜User｜>hi<｜Assistant｜>".len() as u32);
    });
}

#[test]
fn a_client_that_goes_away_frees_its_slot() {
    let cluster = Cluster::start("builtin:tiny", 1, &["--max-concurrent", "1"]);
    rt().block_on(async {
        let mut client = cluster.client().await;
        let full = Instant::now();
        client.generate(ids_request(&[3, 4], 240)).await.unwrap();
        let full = full.elapsed();
        let mut stream = client.generate_stream(ids_request(&[3, 4], 240)).await.unwrap().into_inner();
        stream.message().await.unwrap().unwrap();
        let dropped = Instant::now();
        drop(stream);
        // The abandoned sequence leaves the batch: the single slot is free again long before
        // its 240 tokens could have been generated.
        loop {
            match client.generate(ids_request(&[3], 2)).await {
                Ok(r) => break assert_eq!(r.into_inner().token_ids.len(), 2),
                Err(s) if s.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(s) => panic!("{s:?}"),
            }
        }
        assert!(
            dropped.elapsed() < full / 2,
            "slot freed after {:?}; a whole generation takes {full:?}",
            dropped.elapsed()
        );
    });
}

#[test]
fn up_serves_the_builtin_manifest_and_stops_its_children_on_sigterm() {
    let cache = std::env::temp_dir().join(format!("kubemoe-up-cache-{}", std::process::id()));
    let mut up = Command::new(env!("CARGO_BIN_EXE_kubemoe"))
        .args(["up", "--grpc-port", "0", "--http-port", "0"])
        .env("XDG_CACHE_HOME", &cache)
        // Workers log each dispatch at debug level.
        .env("RUST_LOG", "info,kubemoe_worker=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(up.stderr.take().unwrap());
    let logs = std::thread::spawn(move || stderr.lines().map_while(Result::ok).collect::<Vec<_>>());
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let (addr, lines_seen) = loop {
        let line = lines.next().expect("up exited early").unwrap();
        if let Some(rest) = line.split("gRPC at ").nth(1) {
            break (rest.split_whitespace().next().unwrap().to_string(), line.clone());
        }
    };
    let http_addr = serving_http(&lines_seen);
    // The internal token `up` made: readable by this user only.
    let internal = lines.next().unwrap().unwrap();
    let token_file = PathBuf::from(internal.split("token in ").nth(1).expect("no token line").trim());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{internal}");
    assert!(lines.next().unwrap().unwrap().starts_with("try: kubemoe generate"));
    // The OpenAI API serves the ModelDeployment's name.
    let (status, models) = http(&http_addr, "GET", "/v1/models", None);
    assert_eq!((status, json(&models)["data"][0]["id"].as_str()), (200, Some("tiny")));
    rt().block_on(async {
        let mut client = InferenceClient::connect(format!("http://{addr}")).await.unwrap();
        let info = client.model_info(ModelInfoRequest {}).await.unwrap().into_inner();
        // examples/tiny.yaml's 2 workers, serving the built-in trained model, unpacked.
        assert!(
            info.model.starts_with(cache.join("kubemoe/kubemoe-tiny-chat-").to_str().unwrap()),
            "{}",
            info.model
        );
        assert_eq!(info.workers, 2);
        // It writes text: a question about its small world gets an answer in the world's words
        // (about an animal of it; which one, an hour of training on 2 cores does not always
        // get right).
        let reply = client.generate(chat_request("Tell me about the fox.", 32)).await.unwrap().into_inner();
        let text = &reply.text;
        assert!(
            text.starts_with("The ") && text.contains(" animal. It lives ") && text.ends_with('.'),
            "{text:?}"
        );
        let r =
            GenerateRequest { input: Some(Input::Prompt("Hi".into())), max_tokens: 3, ..Default::default() };
        let mut r = tonic::Request::new(r);
        r.metadata_mut().insert("x-request-id", "trace-me-42".parse().unwrap());
        let reply = client.generate(r).await.unwrap();
        assert_eq!(reply.metadata().get("x-request-id").unwrap(), "trace-me-42");
        assert_eq!(reply.into_inner().token_ids.len(), 3);
    });
    Command::new("kill").args(["-TERM", &up.id().to_string()]).status().unwrap();
    let started = Instant::now();
    while up.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(15), "up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its router no longer answers, and its token is gone.
    assert!(std::net::TcpStream::connect(&addr).is_err());
    assert!(!token_file.exists());
    // The request is found by its id in the router's log lines and in a worker's, each line
    // prefixed with the process it came from.
    let logs = logs.join().unwrap();
    let with_id = |process: &str| logs.iter().any(|l| l.starts_with(process) && l.contains("trace-me-42"));
    assert!(with_id("[router]"), "{logs:#?}");
    assert!(with_id("[worker 0]") || with_id("[worker 1]"), "{logs:#?}");
    std::fs::remove_dir_all(&cache).unwrap();
}

/// Three clients sending `prompts` round-robin until `stop`, each output checked against
/// `expected`; each task returns how many requests it was served (a failed one panics it).
fn looping_clients(
    addr: &str,
    prompts: &[Vec<u32>],
    expected: &[Vec<u32>],
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<usize>> {
    (0..3)
        .map(|c| {
            let (addr, prompts, expected, stop) =
                (addr.to_string(), prompts.to_vec(), expected.to_vec(), stop.clone());
            tokio::spawn(async move {
                let mut client = InferenceClient::connect(format!("http://{addr}")).await.unwrap();
                let mut served = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let i = (served + c) % prompts.len();
                    let got = client.generate(ids_request(&prompts[i], 8)).await;
                    let got = got.unwrap_or_else(|e| panic!("request {served} of client {c} failed: {e:?}"));
                    assert_eq!(got.into_inner().token_ids, expected[i], "prompt {i} changed its output");
                    served += 1;
                }
                served
            })
        })
        .collect()
}

/// Tokens each worker's experts processed, per MoE layer: [worker][layer].
async fn worker_tokens(urls: &[String], token: &str) -> Vec<Vec<u64>> {
    let mut out = Vec::new();
    for url in urls {
        let mut c = expert_client(url, Some(token));
        let stats = c.stats(kubemoe_api::expert::StatsRequest {}).await.unwrap().into_inner();
        out.push(stats.layers.iter().map(|l| l.tokens.iter().sum()).collect());
    }
    out
}

/// Mean over max tokens per worker, token-weighted over the layers, of `b − a`.
fn measured_balance(a: &[Vec<u64>], b: &[Vec<u64>]) -> f64 {
    let layers = a[0].len();
    let (mut mean, mut max) = (0.0, 0.0);
    for l in 0..layers {
        let per_worker: Vec<f64> = a.iter().zip(b).map(|(a, b)| (b[l] - a[l]) as f64).collect();
        mean += per_worker.iter().sum::<f64>() / per_worker.len() as f64;
        max += per_worker.iter().cloned().fold(0.0, f64::max);
    }
    mean / max
}

/// `kubemoe up -f <manifest>` and what it printed: its workers, its router's gRPC, HTTP and
/// internal addresses, the internal token, and every later stdout line.
struct Up {
    up: Child,
    urls: Vec<String>,
    addr: String,
    http: String,
    internal: String,
    token: String,
    /// The directory of `up`'s files (token, placement), which only `up` removes.
    files: PathBuf,
    log: std::sync::mpsc::Receiver<String>,
}

impl Up {
    fn start(manifest: &std::path::Path, extra: &[&str]) -> Up {
        let mut up = Command::new(env!("CARGO_BIN_EXE_kubemoe"))
            .args(["up", "-f", manifest.to_str().unwrap(), "--grpc-port", "0", "--http-port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(up.stderr.take().unwrap());
        std::thread::spawn(move || stderr.lines().for_each(drop));
        let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
        let mut next_line = || lines.next().expect("up exited early").unwrap();
        let word_after = |line: &str, marker: &str| {
            line.split(marker).nth(1).unwrap().split_whitespace().next().unwrap().to_string()
        };
        let urls = word_after(&next_line(), "workers at ").split(',').map(String::from).collect();
        let serving = next_line();
        let (addr, http) = (word_after(&serving, "gRPC at "), word_after(&serving, "HTTP at "));
        // The internal port and the token `up` made for its processes.
        let internal = next_line();
        let internal_addr =
            internal.split("Balancer at ").nth(1).unwrap().split(')').next().unwrap().to_string();
        let token_file = PathBuf::from(internal.split("token in ").nth(1).unwrap().trim());
        let token = std::fs::read_to_string(&token_file).unwrap();
        let files = token_file.parent().unwrap().to_path_buf();
        // `try: …` once the router serves.
        while !next_line().starts_with("try: ") {}
        let (log_tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || lines.for_each(|l| drop(log_tx.send(l.unwrap_or_default()))));
        Up { up, urls, addr, http, internal: internal_addr, token, files, log }
    }
}

#[test]
fn skewed_load_is_rebalanced_live_without_failing_or_changing_a_request() {
    let dir = std::env::temp_dir().join(format!("kubemoe-skewed-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_kubemoe"))
        .args(["gen-model", "--preset", "tiny", "--skew", "3", "--out", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let manifest = dir.join("md.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: kubemoe.io/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: skewed}}\nspec:\n  \
             model: {{source: 'hostPath://{}'}}\n  workers: {{replicas: 4}}\n  experts: {{redundant: 4}}\n  \
             balancing: {{interval: 1s, window: 30s, imbalanceThreshold: 1.05, cooldown: 1h, \
             maxExpertsMovedPerRebalance: 12}}\n",
            dir.display()
        ),
    )
    .unwrap();
    let Up { mut up, urls, addr, http: metrics_addr, internal: internal_addr, token, files, log: log_rx } =
        Up::start(&manifest, &[]);
    let local = source::open(dir.to_str().unwrap(), Experts::All).unwrap();
    let prompts: Vec<Vec<u32>> =
        (0..6u32).map(|i| (0..5 + 3 * i).map(|j| (i * 37 + j * 11) % 500 + 2).collect()).collect();
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            generate(
                &local,
                &[Request { prompt: p.clone(), max_new_tokens: 8, sampling: SamplingParams::default() }],
            )
            .unwrap()
            .remove(0)
        })
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    rt().block_on(async {
        let before = worker_tokens(&urls, &token).await;
        let clients = looping_clients(&addr, &prompts, &expected, &stop);
        let channel = kubemoe_api::channel(&internal_addr, None).unwrap();
        let mut balancer = BalancerClient::with_interceptor(channel, bearer(Some(&token)));
        let started = Instant::now();
        loop {
            let load = balancer.load(kubemoe_api::expert::LoadRequest {}).await.unwrap().into_inner();
            if load.plan.unwrap().epoch >= 1 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(90), "no rebalance happened");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let switched = worker_tokens(&urls, &token).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = worker_tokens(&urls, &token).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut served = 0;
        for c in clients {
            served += c.await.expect("a request failed or changed its output");
        }
        let (was, now) = (measured_balance(&before, &switched), measured_balance(&switched, &after));
        eprintln!("{served} requests; measured balance {was:.3} before the rebalance, {now:.3} after");
        assert!(now > was, "balance {was:.3} before the rebalance, {now:.3} after");
        // Every worker released what the new epoch does not place on it.
        for url in &urls {
            let mut c = expert_client(url, Some(&token));
            let info = c.info(kubemoe_api::expert::InfoRequest {}).await.unwrap().into_inner();
            assert_eq!(info.epoch, 1);
            assert!(info.experts.iter().all(|l| l.experts.len() <= 5), "{:?}", info.experts);
        }
    });
    let log: Vec<String> = log_rx.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("rebalancing to epoch 1")), "{log:?}");
    // Prometheus sees the same: the epoch, the per-expert window counts, the imbalance left.
    let mut http = std::net::TcpStream::connect(&metrics_addr).unwrap();
    std::io::Write::write_all(&mut http, b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut http, &mut text).unwrap();
    assert!(text.contains("\nkubemoe_router_placement_epoch 1\n"), "{text}");
    assert!(text.contains("kubemoe_router_expert_tokens{layer=\"1\",expert=\"0\"} "));
    let imbalance: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("kubemoe_router_expert_imbalance "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(imbalance >= 1.0, "{imbalance}");
    // A worker killed after the rebalance comes back on its port, from the placement file `up`
    // rewrote: epoch 1, whose experts the router sends it.
    let children = children_of(up.id());
    assert_eq!(children.len(), 5, "{children:?}");
    let killed = worker_pid(up.id(), 1).unwrap();
    Command::new("kill").args(["-KILL", &killed.to_string()]).status().unwrap();
    let started = Instant::now();
    rt().block_on(async {
        loop {
            let back = worker_pid(up.id(), 1).is_some_and(|pid| pid != killed);
            if back {
                let mut c = expert_client(&urls[1], Some(&token));
                // It answers while it loads (at the epoch it loads); wait until it serves.
                if let Ok(info) = c.info(kubemoe_api::expert::InfoRequest {}).await {
                    let info = info.into_inner();
                    assert_eq!(info.epoch, 1, "the restarted worker is not at the epoch in force");
                    if info.loading.is_none() {
                        break;
                    }
                }
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the killed worker did not come back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("worker 1 back on its port at epoch 1 {:?} after SIGKILL", started.elapsed());
        let mut client = InferenceClient::connect(format!("http://{addr}")).await.unwrap();
        // The router takes it back within a probe interval.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (p, e) in prompts.iter().zip(&expected) {
            assert_eq!(&client.generate(ids_request(p, 8)).await.unwrap().into_inner().token_ids, e);
        }
    });
    let log: Vec<String> = log_rx.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("worker 1 exited")), "{log:?}");
    // SIGKILL: `up` cannot stop its children, which stop by themselves.
    let pids: Vec<u32> = children_of(up.id()).iter().map(|(pid, _)| *pid).collect();
    assert_eq!(pids.len(), 5);
    Command::new("kill").args(["-KILL", &up.id().to_string()]).status().unwrap();
    up.wait().unwrap();
    let started = Instant::now();
    while pids.iter().any(|&pid| alive(pid)) {
        assert!(started.elapsed() < Duration::from_secs(15), "children outlived up: {pids:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for url in &urls {
        assert!(std::net::TcpStream::connect(url.trim_start_matches("http://")).is_err(), "{url} still open");
    }
    // What `up` killed outright could not remove.
    std::fs::remove_dir_all(&files).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// The processes whose parent is `parent`, with their command lines (arguments NUL-separated).
fn children_of(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // `pid (comm) state ppid ...`: comm may hold spaces, so split after its `)`.
        let ppid = stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().parse::<u32>();
        if ppid == Ok(parent) {
            let cmd = std::fs::read_to_string(entry.path().join("cmdline")).unwrap_or_default();
            out.push((pid, cmd));
        }
    }
    out
}

/// Whether `pid` runs (a zombie left for a parent that does not reap it counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !matches!(stat.rsplit(')').next().unwrap().split_whitespace().next(), Some("Z" | "X"))
    })
}

/// One HTTP/1.0 exchange (the server closes the connection after the body): status and body.
fn http(addr: &str, method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, String) {
    http_with(addr, method, path, "", body)
}

/// [`http`] with extra header lines (each ending in `\r\n`).
fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: Option<&serde_json::Value>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: x\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The `data:` payloads of a server-sent event stream.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_string))
        .collect()
}

#[test]
fn the_openai_api_answers_what_the_grpc_path_answers_whole_and_streamed() {
    let c = Cluster::start("builtin:tiny", 2, &["--http-port", "0", "--served-model-name", "tiny-chat"]);
    let addr = c.router.http.clone().unwrap();
    assert_eq!(http(&addr, "GET", "/health", None).0, 200);
    let (status, models) = http(&addr, "GET", "/v1/models", None);
    assert_eq!((status, json(&models)["data"][0]["id"].as_str()), (200, Some("tiny-chat")));

    // The same greedy requests over gRPC, as the reference.
    let (completion, chat) = rt().block_on(async {
        let mut client = c.client().await;
        let prompt = GenerateRequest {
            input: Some(Input::Prompt("Hello".into())),
            max_tokens: 6,
            ..Default::default()
        };
        let chat = chat_request("Hi", 5);
        (
            client.generate(prompt).await.unwrap().into_inner(),
            client.generate(chat).await.unwrap().into_inner(),
        )
    });

    let request =
        serde_json::json!({"model": "tiny-chat", "prompt": "Hello", "max_tokens": 6, "temperature": 0});
    let (status, body) = http(&addr, "POST", "/v1/completions", Some(&request));
    let body = json(&body);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"].as_str().unwrap(), completion.text);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let usage = completion.usage.unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(body["usage"]["completion_tokens"], 6);
    assert_eq!(body["usage"]["total_tokens"], usage.prompt_tokens + 6);

    let mut streamed = request.clone();
    streamed["stream"] = true.into();
    streamed["stream_options"] = serde_json::json!({"include_usage": true});
    let (status, body) = http(&addr, "POST", "/v1/completions", Some(&streamed));
    assert_eq!(status, 200, "{body}");
    let data = events(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1].iter().map(|e| json(e)).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, completion.text);
    assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 6);

    let request = serde_json::json!({"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}],
        "max_completion_tokens": 5, "temperature": 0});
    let (status, body) = http(&addr, "POST", "/v1/chat/completions", Some(&request));
    let body = json(&body);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"].as_str().unwrap(), chat.text);
    assert_eq!(body["usage"]["completion_tokens"], chat.usage.unwrap().completion_tokens);
    let mut streamed = request.clone();
    streamed["stream"] = true.into();
    let (_, body) = http(&addr, "POST", "/v1/chat/completions", Some(&streamed));
    let data = events(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1].iter().map(|e| json(e)).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, chat.text);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()), "no usage chunk unless asked");

    // Errors in OpenAI's shape.
    let refused = |path: &str, request: serde_json::Value| {
        let (status, body) = http(&addr, "POST", path, Some(&request));
        (status, json(&body)["error"].clone())
    };
    let (status, error) = refused("/v1/completions", serde_json::json!({"model": "gpt-4", "prompt": "Hi"}));
    assert_eq!(
        (status, error["param"].as_str(), error["code"].as_str()),
        (404, Some("model"), Some("model_not_found"))
    );
    let (status, error) = refused(
        "/v1/completions",
        serde_json::json!({"model": "tiny-chat", "prompt": "Hi", "temperature": -1}),
    );
    assert_eq!((status, error["param"].as_str()), (400, Some("temperature")), "{error}");
    let (status, error) = refused(
        "/v1/chat/completions",
        serde_json::json!({"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "n": 2}),
    );
    assert_eq!((status, error["param"].as_str()), (400, Some("n")), "{error}");
    let (status, error) = refused("/v1/chat/completions", serde_json::json!({"model": "tiny-chat"}));
    assert!(status == 400 && error["message"].as_str().unwrap().contains("messages"), "{error}");
    for (field, value) in [("min_p", serde_json::json!(0.1)), ("max_tokens", serde_json::json!(0))] {
        let mut request = serde_json::json!({"model": "tiny-chat", "prompt": "Hi"});
        request[field] = value;
        let (status, error) = refused("/v1/completions", request);
        assert_eq!((status, error["param"].as_str()), (400, Some(field)), "{error}");
    }

    // What clients send: a prompt in a list of one, nulls for unset options.
    let request = serde_json::json!({"model": "tiny-chat", "prompt": ["Hello"], "max_tokens": 6,
        "temperature": 0, "stream": null, "stream_options": null});
    let (status, body) = http(&addr, "POST", "/v1/completions", Some(&request));
    assert_eq!(
        (status, json(&body)["choices"][0]["text"].as_str()),
        (200, Some(completion.text.as_str())),
        "{body}"
    );
    // Without a seed, sampling differs between requests; with one, it repeats.
    let sampled = |seed: Option<u64>| {
        let mut request = serde_json::json!({"model": "tiny-chat", "prompt": [5, 6, 7], "max_tokens": 12});
        if let Some(seed) = seed {
            request["seed"] = seed.into();
        }
        json(&http(&addr, "POST", "/v1/completions", Some(&request)).1)["choices"][0]["text"].clone()
    };
    assert_ne!(sampled(None), sampled(None));
    assert_eq!(sampled(Some(7)), sampled(Some(7)));
    // A chat without max_tokens may use the rest of the context, as vLLM's does.
    let request = serde_json::json!({"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}],
        "temperature": 0});
    let body = json(&http(&addr, "POST", "/v1/chat/completions", Some(&request)).1);
    let max_model_len = json(&models)["data"][0]["max_model_len"].as_u64().unwrap();
    let usage = &body["usage"];
    let finish = body["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(
        finish == "stop" || usage["total_tokens"].as_u64() == Some(max_model_len),
        "{body} (max_model_len {max_model_len})"
    );
    assert!(usage["completion_tokens"].as_u64().unwrap() > 16 || finish == "stop", "{body}");
}

#[test]
fn logprobs_are_the_models_log_softmax_over_grpc_and_both_openai_endpoints() {
    // Requests repeated below are compared bit for bit: no prefix reuse, whose rows come from
    // another batch shape and give logprobs equal only to float rounding (~1e-7).
    let c = Cluster::start("builtin:tiny", 2, &["--http-port", "0", "--prefix-cache-mib", "0"]);
    let addr = c.router.http.clone().unwrap();
    // The reference: the single-process model's logits for the prompt, then each greedy token.
    let local = source::open("builtin:tiny", Experts::All).unwrap();
    let prompt = [5u32, 6, 7];
    let (mut cache, mut feed, mut want) = (KvCache::new(&local.config), prompt.to_vec(), vec![]);
    for _ in 0..4 {
        let logits = local.forward_step(&mut [(&mut cache, &feed)]).unwrap();
        let token = kubemoe_model::sampling::argmax(&logits);
        want.push(kubemoe_model::Logprobs::of(&logits, token, 3));
        feed = vec![token];
    }
    let close = |got: f64, want: f32| (got - f64::from(want)).abs() < 1e-4;

    let grpc = rt().block_on(async {
        let request = GenerateRequest { logprobs: Some(3), ..ids_request(&prompt, 4) };
        c.client().await.generate(request).await.unwrap().into_inner()
    });
    assert_eq!(grpc.logprobs.len(), 4);
    for (got, want) in grpc.logprobs.iter().zip(&want) {
        assert_eq!(got.token_id, want.token);
        assert!(close(got.logprob.into(), want.logprob), "{got:?} {want:?}");
        let ids: Vec<u32> = got.top.iter().map(|t| t.token_id).collect();
        assert_eq!(ids, want.top.iter().map(|t| t.0).collect::<Vec<_>>());
    }
    // The CLI prints the same, a line per token after its summary.
    let cli = Command::new(env!("CARGO_BIN_EXE_kubemoe"))
        .args(["generate", "--endpoint", &format!("http://{}", c.router.addr), "--input-ids", "5,6,7"])
        .args(["--max-tokens", "4", "--logprobs", "3"])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{cli:?}");
    let lines: Vec<String> = String::from_utf8(cli.stderr).unwrap().lines().map(String::from).collect();
    let printed: Vec<&String> = lines.iter().filter(|l| l.starts_with("  token ")).collect();
    assert_eq!(printed.len(), 4, "{lines:?}");
    for (line, want) in printed.iter().zip(&want) {
        // `  token ID logprob LP; top: ID LP, ID LP, …`, log-probabilities to four decimals.
        let (head, top) = line.trim().split_once("; top: ").unwrap();
        let pairs: Vec<(u32, f64)> =
            std::iter::once(head.trim_start_matches("token ").replace(" logprob", ""))
                .chain(top.split(", ").map(String::from))
                .map(|pair| {
                    let (id, lp) = pair.split_once(' ').unwrap();
                    (id.parse().unwrap(), lp.parse().unwrap())
                })
                .collect();
        let expected = std::iter::once((want.token, want.logprob)).chain(want.top.iter().copied());
        for ((id, lp), (want_id, want_lp)) in pairs.iter().zip(expected) {
            assert_eq!(*id, want_id, "{line}");
            assert!((lp - f64::from(want_lp)).abs() < 1e-3, "{line}: {want_lp}");
        }
        assert_eq!(pairs.len(), 1 + want.top.len(), "{line}");
    }

    // Completions: `logprobs: N`, the alternatives and the chosen token by text.
    let request = serde_json::json!({"model": "builtin:tiny", "prompt": prompt, "max_tokens": 4,
        "temperature": 0, "logprobs": 3});
    let (status, body) = http(&addr, "POST", "/v1/completions", Some(&request));
    assert_eq!(status, 200, "{body}");
    let whole = json(&body)["choices"][0]["logprobs"].clone();
    let values: Vec<f64> =
        whole["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!(values.iter().zip(&want).all(|(g, w)| close(*g, w.logprob)), "{whole}");
    let tokens: Vec<&str> = whole["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let mut offset = 0;
    for (i, token) in tokens.iter().enumerate() {
        assert_eq!(whole["text_offset"][i], offset);
        offset += token.chars().count();
        // The greedy token is the most likely one: its value is the largest of the dict.
        let top = whole["top_logprobs"][i].as_object().unwrap();
        let best = top.values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert!(close(best, want[i].logprob) && top.contains_key(*token), "{top:?}");
    }
    // Streamed: the same log-probabilities, chunk by chunk, offsets running on.
    let mut streamed = request.clone();
    streamed["stream"] = true.into();
    let data = events(&http(&addr, "POST", "/v1/completions", Some(&streamed)).1);
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1].iter().map(|e| json(e)).collect();
    let field = |name: &str| -> Vec<serde_json::Value> {
        chunks
            .iter()
            .filter(|c| !c["choices"][0]["logprobs"].is_null())
            .flat_map(|c| c["choices"][0]["logprobs"][name].as_array().unwrap().clone())
            .collect()
    };
    assert_eq!(field("token_logprobs"), whole["token_logprobs"].as_array().unwrap().clone());
    assert_eq!(field("text_offset"), whole["text_offset"].as_array().unwrap().clone());

    // Chat: `logprobs: true` and `top_logprobs`, entries with bytes and alternatives.
    let request = serde_json::json!({"model": "builtin:tiny", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let body = json(&http(&addr, "POST", "/v1/chat/completions", Some(&request)).1);
    let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(content.len() as u64, body["usage"]["completion_tokens"].as_u64().unwrap(), "{body}");
    for entry in &content {
        let token = entry["token"].as_str().unwrap();
        assert_eq!(entry["bytes"], serde_json::json!(token.as_bytes()));
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["token"], entry["token"], "greedy takes the most likely: {entry}");
        assert!(
            top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64()
                && entry["logprob"].as_f64() <= Some(0.0)
        );
    }
    let mut streamed = request.clone();
    streamed["stream"] = true.into();
    let data = events(&http(&addr, "POST", "/v1/chat/completions", Some(&streamed)).1);
    let entries: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|e| json(e))
        .filter(|c| !c["choices"][0]["logprobs"].is_null())
        .flat_map(|c| c["choices"][0]["logprobs"]["content"].as_array().unwrap().clone())
        .collect();
    assert_eq!(entries, content);
    // Without the fields, none are returned.
    let request = serde_json::json!({"model": "builtin:tiny", "prompt": "Hi", "max_tokens": 2});
    let body = json(&http(&addr, "POST", "/v1/completions", Some(&request)).1);
    assert!(body["choices"][0]["logprobs"].is_null(), "{body}");

    // What is out of range is refused, naming the field.
    for (path, extra, field) in [
        ("/v1/completions", serde_json::json!({"logprobs": 21}), "logprobs"),
        ("/v1/completions", serde_json::json!({"top_logprobs": 2}), "top_logprobs"),
        ("/v1/chat/completions", serde_json::json!({"top_logprobs": 2}), "top_logprobs"),
        ("/v1/chat/completions", serde_json::json!({"logprobs": 3}), "logprobs"),
        ("/v1/chat/completions", serde_json::json!({"logprobs": true, "top_logprobs": -1}), "top_logprobs"),
    ] {
        let mut request = serde_json::json!({"model": "builtin:tiny", "prompt": "Hi",
            "messages": [{"role": "user", "content": "Hi"}]});
        request.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, body) = http(&addr, "POST", path, Some(&request));
        assert_eq!((status, json(&body)["error"]["param"].as_str()), (400, Some(field)), "{path} {body}");
    }
    rt().block_on(async {
        let request = GenerateRequest { logprobs: Some(21), ..ids_request(&prompt, 4) };
        let status = c.client().await.generate(request).await.unwrap_err();
        assert!(status.code() == Code::InvalidArgument && status.message().starts_with("logprobs"));
    });
}

#[test]
fn with_api_keys_only_callers_holding_one_are_served_and_keys_rotate() {
    let keys = std::env::temp_dir().join(format!("kubemoe-api-keys-{}", std::process::id()));
    std::fs::write(&keys, "# the team's keys\nsk-first\nsk-second\n").unwrap();
    let c =
        Cluster::start("builtin:tiny", 1, &["--http-port", "0", "--api-keys-file", keys.to_str().unwrap()]);
    let addr = c.router.http.clone().unwrap();
    let request = serde_json::json!({"model": "builtin:tiny", "prompt": [1, 2, 3], "max_tokens": 2});
    let call = |key: Option<&str>| {
        let header = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
        http_with(&addr, "POST", "/v1/completions", &header, Some(&request))
    };
    for key in [None, Some("sk-wrong"), Some("")] {
        let (status, body) = call(key);
        assert_eq!((status, json(&body)["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{body}");
    }
    assert_eq!(call(Some("sk-second")).0, 200);
    assert_eq!(http_with(&addr, "GET", "/v1/models", "Authorization: Bearer sk-first\r\n", None).0, 200);
    assert_eq!(http(&addr, "GET", "/v1/models", None).0, 401);
    // Health and metrics stay open; refused calls ran nothing.
    assert_eq!(http(&addr, "GET", "/health", None).0, 200);
    let metrics = http(&addr, "GET", "/metrics", None).1;
    assert_eq!(series(&metrics, "vllm:time_to_first_token_seconds_count{model_name=\"builtin:tiny\"}"), 1.0);
    rt().block_on(async {
        let mut client = c.client().await;
        for key in [None, Some("sk-wrong")] {
            let r = kubemoe_router::client::authorized(ids_request(&[1, 2], 2), key).unwrap();
            let status = client.generate(r).await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        }
        let r = kubemoe_router::client::authorized(ids_request(&[1, 2], 2), Some("sk-first")).unwrap();
        assert_eq!(client.generate(r).await.unwrap().into_inner().token_ids.len(), 2);
        // Model info is part of the API too.
        assert_eq!(client.model_info(ModelInfoRequest {}).await.unwrap_err().code(), Code::Unauthenticated);
    });
    // A rotated file takes effect without a restart.
    std::fs::write(&keys, "sk-third\n").unwrap();
    let file = std::fs::File::options().write(true).open(&keys).unwrap();
    file.set_modified(std::time::SystemTime::now() + Duration::from_secs(5)).unwrap();
    let started = Instant::now();
    while call(Some("sk-third")).0 != 200 {
        assert!(started.elapsed() < Duration::from_secs(10), "the new key was never accepted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(call(Some("sk-first")).0, 401);
    std::fs::remove_file(&keys).ok();
}

/// `up -f` with examples/tiny.yaml plus `extra` (as `name`.yaml): it must fail; its stderr
/// and the manifest's path.
fn up_refusing(name: &str, extra: &str) -> (String, String) {
    let manifest = std::env::temp_dir().join(format!("kubemoe-{name}-{}.yaml", std::process::id()));
    let tiny = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.yaml")).unwrap();
    std::fs::write(&manifest, format!("{tiny}{extra}")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kubemoe"))
        .args(["up", "-f", manifest.to_str().unwrap(), "--grpc-port", "0", "--http-port", "0"])
        .output()
        .unwrap();
    std::fs::remove_file(&manifest).ok();
    assert!(!out.status.success());
    (String::from_utf8_lossy(&out.stderr).into_owned(), manifest.to_str().unwrap().to_string())
}

#[test]
fn up_refuses_a_manifest_the_api_server_would_refuse() {
    for (extra, expected) in [
        ("  routr:\n    grpcPort: 5\n", "spec.routr: unknown field"),
        ("  router:\n    grpcPort: 0\n", "spec.router.grpcPort: 0 is less than 1"),
        ("  router:\n    grpcPort: 8080\n", "router.grpcPort and router.httpPort must differ"),
    ] {
        let (stderr, manifest) = up_refusing("strict", extra);
        assert!(stderr.contains(&manifest) && stderr.contains(expected), "{stderr}");
    }
}

#[test]
fn up_with_a_manifest_naming_a_key_secret_asks_for_the_keys_file() {
    let (stderr, _) = up_refusing("auth", "  auth:\n    apiKeysSecret: tiny-keys\n");
    assert!(stderr.contains("auth.apiKeysSecret") && stderr.contains("--api-keys-file"), "{stderr}");
}

#[test]
fn a_router_commits_only_plans_its_workers_hold() {
    let c = Cluster::start("builtin:tiny", 2, &[]);
    rt().block_on(async {
        let mut client = c.client().await;
        let before = client.generate(ids_request(&[1, 2, 3], 6)).await.unwrap().into_inner().token_ids;
        let mut balancer = c.balancer(Some(&c.token));
        let load = balancer.load(kubemoe_api::expert::LoadRequest {}).await.unwrap().into_inner();
        let current = kubemoe_placement::PlacementPlan::try_from(load.plan.unwrap()).unwrap();
        // The same plan with the workers' halves swapped: valid, but held by nobody.
        let mut swapped = current.clone();
        swapped.epoch = current.epoch + 1;
        let half = current.slots_per_worker as usize;
        for layer in &mut swapped.layers {
            layer.slots.rotate_left(half);
        }
        let commit = |plan: &kubemoe_placement::PlacementPlan| kubemoe_api::expert::CommitRequest {
            plan: Some(plan.into()),
            workers: Vec::new(),
        };
        let status = balancer.commit(commit(&swapped)).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("does not hold expert"), "{}", status.message());
        // An epoch past the largest is refused as invalid.
        let mut forged = current.clone();
        forged.epoch = u64::MAX;
        assert_eq!(balancer.commit(commit(&forged)).await.unwrap_err().code(), Code::InvalidArgument);
        // Worker URLs that do not fit the plan (one per rank), or that are no URLs, are refused.
        let mut one_url = commit(&current);
        one_url.workers = vec!["http://127.0.0.1:1".into()];
        let status = balancer.commit(one_url).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("send one per rank"), "{}", status.message());
        let mut bad = commit(&current);
        bad.workers = vec!["http://[::1".into(); current.workers as usize];
        assert_eq!(balancer.commit(bad).await.unwrap_err().code(), Code::InvalidArgument);
        // Nothing changed: the plan in force and the output.
        let load = balancer.load(kubemoe_api::expert::LoadRequest {}).await.unwrap().into_inner();
        assert_eq!(load.plan.unwrap().epoch, current.epoch);
        let after = client.generate(ids_request(&[1, 2, 3], 6)).await.unwrap().into_inner().token_ids;
        assert_eq!(after, before);
        // A plan the workers hold (the one in force, again) still commits.
        balancer.commit(commit(&current)).await.unwrap();
    });
}

#[test]
fn internal_calls_without_the_deployments_token_are_refused_and_change_nothing() {
    use kubemoe_api::expert::{
        CommitRequest, DispatchRequest, InfoRequest, LoadRequest, PrepareRequest, ReleaseRequest,
        StatsRequest,
    };
    let c = Cluster::start("builtin:tiny", 2, &[]);
    let url = format!("http://{}", c.workers[0].addr);
    rt().block_on(async {
        let mut client = c.client().await;
        let before = client.generate(ids_request(&[1, 2, 3], 6)).await.unwrap().into_inner().token_ids;
        let plan = c.balancer(Some(&c.token)).load(LoadRequest {}).await.unwrap().into_inner().plan.unwrap();
        let held = expert_client(&url, Some(&c.token)).info(InfoRequest {}).await.unwrap().into_inner();
        // A plan that moves experts, at the next epoch: what an attacker would prepare and commit.
        let mut moved = plan.clone();
        moved.epoch += 1;
        for layer in &mut moved.layers {
            layer.slots.reverse();
        }
        for token in [None, Some("not-the-token")] {
            let mut worker = expert_client(&url, token);
            let refused = [
                worker.prepare(PrepareRequest { plan: Some(moved.clone()) }).await.map(drop),
                worker.release(ReleaseRequest { epoch: moved.epoch }).await.map(drop),
                worker
                    .dispatch(DispatchRequest { layer: 1, tokens: 0, ..Default::default() })
                    .await
                    .map(drop),
                worker.info(InfoRequest {}).await.map(drop),
                worker.stats(StatsRequest {}).await.map(drop),
                c.balancer(token)
                    .commit(CommitRequest { plan: Some(moved.clone()), workers: Vec::new() })
                    .await
                    .map(drop),
                c.balancer(token).load(LoadRequest {}).await.map(drop),
            ];
            for (call, result) in refused.into_iter().enumerate() {
                let status = result.expect_err("an internal call without the token was served");
                assert_eq!(status.code(), Code::Unauthenticated, "call {call} with {token:?}: {status:?}");
            }
        }
        // The data path asks for the same token before it reads a call.
        assert_ne!(held.data_port, 0, "the worker names no data port");
        for credential in [None, Some(&b"Bearer not-the-token"[..])] {
            let port = held.data_port as u16;
            let open = kubemoe_api::data::Connection::open("127.0.0.1", port, None, credential).await;
            let status = open.err().expect("a data-path client without the token was served");
            assert_eq!(status.code(), Code::Unauthenticated, "{credential:?}: {status:?}");
        }
        // The Balancer is not on the public port, even with the token.
        let public = kubemoe_api::channel(&c.router.addr, None).unwrap();
        let mut balancer = BalancerClient::with_interceptor(public, bearer(Some(&c.token)));
        assert_eq!(balancer.load(LoadRequest {}).await.unwrap_err().code(), Code::Unimplemented);
        // Nothing changed: the worker's experts and epoch, the router's plan, the output.
        let after = expert_client(&url, Some(&c.token)).info(InfoRequest {}).await.unwrap().into_inner();
        assert_eq!((after.epoch, &after.experts), (held.epoch, &held.experts));
        let now = c.balancer(Some(&c.token)).load(LoadRequest {}).await.unwrap().into_inner().plan.unwrap();
        assert_eq!(now, plan);
        let again = client.generate(ids_request(&[1, 2, 3], 6)).await.unwrap().into_inner().token_ids;
        assert_eq!(again, before);
    });
}

#[test]
fn http_connections_that_send_no_request_head_in_time_are_closed() {
    use std::io::{Read, Write};
    let c = Cluster::start("builtin:tiny", 1, &["--http-port", "0", "--http-header-timeout", "500ms"]);
    let addr = c.router.http.clone().unwrap();
    let connect = || {
        let stream = std::net::TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream
    };
    // Closed by the server: the read ends (EOF or reset) well before the client's 10 s.
    let closed_within = |mut stream: std::net::TcpStream| {
        let started = Instant::now();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        started.elapsed()
    };
    let idle = connect();
    let mut slow = connect();
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n").unwrap();
    // A keep-alive connection after its first request.
    let mut kept = connect();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    kept.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    for (what, stream) in [("idle", idle), ("half a head", slow), ("kept alive", kept)] {
        let waited = closed_within(stream);
        assert!(waited < Duration::from_secs(5), "{what}: still open after {waited:?}");
    }
    // A body that stops arriving: 408 once the same time has passed, in OpenAI's shape.
    let mut trickle = connect();
    trickle
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"")
        .unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    let _ = trickle.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"type\":\"invalid_request_error\""), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // A body one byte over the limit (all of it read, so that the server closes no
    // connection with bytes unread): 413, in OpenAI's shape.
    let limit = kubemoe_router::openai::MAX_BODY_BYTES;
    let empty = serde_json::json!({"model": "builtin:tiny", "prompt": ""}).to_string().len();
    let huge = serde_json::json!({"model": "builtin:tiny", "prompt": "x".repeat(limit + 1 - empty)});
    let (status, body) = http(&addr, "POST", "/v1/completions", Some(&huge));
    assert_eq!(status, 413, "{body}");
    assert!(json(&body)["error"]["message"].as_str().unwrap().contains("bytes"), "{body}");
    // A prompt client is served as before.
    let request = serde_json::json!({"model": "builtin:tiny", "prompt": [1, 2, 3], "max_tokens": 2});
    assert_eq!(http(&addr, "POST", "/v1/completions", Some(&request)).0, 200);
}

#[test]
fn grpc_connections_are_asked_to_go_at_their_age_and_no_call_fails() {
    use std::io::{Read, Write};
    let c = Cluster::start("builtin:tiny", 1, &["--grpc-max-connection-age", "1s"]);
    // An HTTP/2 client that opens a connection and then idles (answering SETTINGS and PINGs,
    // as every client library does): closed soon after the connection's age, GOAWAY first.
    let mut idle = std::net::TcpStream::connect(&c.router.addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").unwrap();
    let started = Instant::now();
    let mut types = Vec::new();
    let mut head = [0u8; 9];
    while idle.read_exact(&mut head).is_ok() {
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        idle.read_exact(&mut payload).unwrap();
        let (kind, ack) = (head[3], head[4] & 1 == 1);
        types.push(kind);
        let reply = match (kind, ack) {
            (4, false) => [&[0, 0, 0, 4, 1, 0, 0, 0, 0][..]].concat(),
            (6, false) => [&[0, 0, 8, 6, 1, 0, 0, 0, 0][..], &payload].concat(),
            _ => continue,
        };
        // The server may have closed already.
        let _ = idle.write_all(&reply);
    }
    assert!(started.elapsed() < Duration::from_secs(5), "still open after {:?}", started.elapsed());
    assert!(types.contains(&7), "no GOAWAY; frame types {types:?}");
    // A client calling on across several ages of its connection: every call is served. One
    // sent in the instant its connection is asked to go can come back UNAVAILABLE unprocessed
    // (the client-side race every gRPC stack has with GOAWAY; seen once in ten runs of the
    // suite, some 600 calls, under full load): retried once, as a retry policy would, it is served.
    rt().block_on(async {
        let mut client = c.client().await;
        let until = Instant::now() + Duration::from_secs(3);
        let (mut calls, mut retried) = (0, 0);
        while Instant::now() < until {
            if let Err(status) = client.generate(ids_request(&[1, 2, 3], 2)).await {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                retried += 1;
                client.generate(ids_request(&[1, 2, 3], 2)).await.unwrap();
            }
            calls += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(calls > 10 && retried <= 1, "{calls} calls, {retried} retried");
    });
}

#[test]
fn idle_connections_do_not_stop_a_normal_request() {
    let c = Cluster::start("builtin:tiny", 1, &["--http-port", "0"]);
    let http_addr = c.router.http.clone().unwrap();
    // 200 connections on each port that send nothing (and one that sent half a request line).
    let mut idle: Vec<std::net::TcpStream> = (0..200)
        .flat_map(|_| [&c.router.addr, &http_addr])
        .map(|addr| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    std::io::Write::write_all(&mut idle[1], b"POST /v1/compl").unwrap();
    let started = Instant::now();
    let request = serde_json::json!({"model": "builtin:tiny", "prompt": [1, 2, 3], "max_tokens": 4});
    assert_eq!(http(&http_addr, "POST", "/v1/completions", Some(&request)).0, 200);
    let got = rt().block_on(async { c.client().await.generate(ids_request(&[1, 2, 3], 4)).await.unwrap() });
    assert_eq!(got.into_inner().token_ids.len(), 4);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    drop(idle);
}

/// The HTTP address in `kubemoe up`'s serving line.
fn serving_http(line: &str) -> String {
    line.split("HTTP at ").nth(1).unwrap().split_whitespace().next().unwrap().to_string()
}

#[test]
fn reflection_v1alpha_lists_the_inference_service_for_older_clients() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    let c = Cluster::start("builtin:tiny", 1, &[]);
    let services = rt().block_on(async {
        let mut client = ServerReflectionClient::new(kubemoe_api::channel(&c.router.addr, None).unwrap());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies =
            client.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
        match replies.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("{other:?}"),
        }
    });
    assert!(services.iter().any(|s| s == "kubemoe.inference.v1.Inference"), "{services:?}");
    // Only what this port serves: the Balancer and the workers' service are not listed here.
    assert!(!services.iter().any(|s| s.starts_with("kubemoe.expert")), "{services:?}");
}

#[test]
fn an_http_client_that_leaves_a_stream_frees_its_slot() {
    use std::io::{Read, Write};
    let c = Cluster::start("builtin:tiny", 1, &["--http-port", "0", "--max-concurrent", "1"]);
    let addr = c.router.http.clone().unwrap();
    let mut long = serde_json::json!({"model": "builtin:tiny", "prompt": [3, 4], "max_tokens": 240});
    let full = Instant::now();
    assert_eq!(http(&addr, "POST", "/v1/completions", Some(&long)).0, 200);
    let full = full.elapsed();
    long["stream"] = true.into();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    let body = long.to_string();
    write!(stream, "POST /v1/completions HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut first = [0u8; 64];
    let n = stream.read(&mut first).unwrap();
    assert!(std::str::from_utf8(&first[..n]).unwrap().starts_with("HTTP/1.0 200"));
    let dropped = Instant::now();
    drop(stream);
    // The abandoned sequence leaves the batch: the single slot is free again long before its
    // 240 tokens could have been generated.
    let short = serde_json::json!({"model": "builtin:tiny", "prompt": [3], "max_tokens": 2});
    loop {
        let (status, body) = http(&addr, "POST", "/v1/completions", Some(&short));
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{body}");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        dropped.elapsed() < full / 2,
        "slot freed after {:?}; a whole generation takes {full:?}",
        dropped.elapsed()
    );
}

/// The value of the series `name{labels}` in a Prometheus exposition.
fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name_and_labels} in {text}"))
        .parse()
        .unwrap()
}

#[test]
fn vllm_named_metrics_count_what_was_served() {
    let c = Cluster::start("builtin:tiny", 1, &["--http-port", "0", "--served-model-name", "m"]);
    let addr = c.router.http.clone().unwrap();
    let (mut prompt, mut generated) = (0.0, 0.0);
    for n in [3, 5, 7] {
        let request =
            serde_json::json!({"model": "m", "prompt": [1, 2, 3, n], "max_tokens": n, "temperature": 0});
        let body = json(&http(&addr, "POST", "/v1/completions", Some(&request)).1);
        prompt += body["usage"]["prompt_tokens"].as_f64().unwrap();
        generated += body["usage"]["completion_tokens"].as_f64().unwrap();
    }
    let text = http(&addr, "GET", "/metrics", None).1;
    let m = |name: &str| series(&text, &format!("vllm:{name}{{model_name=\"m\"}}"));
    assert_eq!(m("time_to_first_token_seconds_count"), 3.0);
    assert_eq!(m("e2e_request_latency_seconds_count"), 3.0);
    assert_eq!(m("inter_token_latency_seconds_count"), generated - 3.0);
    assert_eq!(m("prompt_tokens_total"), prompt);
    assert_eq!(m("generation_tokens_total"), generated);
    let success = |reason: &str| {
        series(&text, &format!("vllm:request_success_total{{model_name=\"m\",finished_reason=\"{reason}\"}}"))
    };
    assert_eq!(success("stop") + success("length"), 3.0);
    // The batch loop publishes its gauges between steps: idle again shortly after the last reply.
    let started = Instant::now();
    loop {
        let text = http(&addr, "GET", "/metrics", None).1;
        let g = |name: &str| series(&text, &format!("vllm:{name}{{model_name=\"m\"}}"));
        if (g("num_requests_running"), g("num_requests_waiting"), g("kv_cache_usage_perc")) == (0.0, 0.0, 0.0)
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{text}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(m("e2e_request_latency_seconds_sum") >= m("time_to_first_token_seconds_sum"));
    assert_eq!(series(&text, "vllm:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"+Inf\"}"), 3.0);
}

#[test]
fn worker_metrics_add_up_to_the_load_the_router_measured() {
    let model = "builtin:tiny";
    let workers: Vec<Proc> = (0..2).map(|r| worker_with(model, r, 2, 0, &["--http-port", "0"])).collect();
    let urls = workers.iter().map(|w| format!("http://{}", w.addr)).collect::<Vec<_>>().join(",");
    let router = spawn(&[
        "router",
        "--model",
        model,
        "--workers",
        &urls,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--http-port",
        "0",
    ]);
    ready(&router);
    let router_http = router.http.clone().unwrap();
    for n in [2, 5] {
        let request = serde_json::json!({"model": model, "prompt": [1, 2, 3, n], "max_tokens": n});
        assert_eq!(http(&router_http, "POST", "/v1/completions", Some(&request)).0, 200);
    }
    // A dispatch for a layer without routed experts is refused, and counted.
    rt().block_on(async {
        let mut c =
            kubemoe_api::expert::expert_client::ExpertClient::connect(format!("http://{}", workers[0].addr))
                .await
                .unwrap();
        let bad = kubemoe_api::expert::DispatchRequest { layer: 0, tokens: 0, ..Default::default() };
        assert_eq!(c.dispatch(bad).await.unwrap_err().code(), Code::InvalidArgument);
    });
    let router_text = http(&router_http, "GET", "/metrics", None).1;
    let epoch = series(&router_text, "kubemoe_router_placement_epoch");
    let mut summed = std::collections::BTreeMap::<String, f64>::new();
    for (rank, w) in workers.iter().enumerate() {
        let addr = w.http.clone().unwrap();
        assert_eq!(http(&addr, "GET", "/health", None).0, 200);
        let text = http(&addr, "GET", "/metrics", None).1;
        assert!(text.contains(&format!(
            "kubemoe_worker_info{{model=\"{model}\",rank=\"{rank}\",world_size=\"2\"}} 1"
        )));
        assert_eq!(series(&text, "kubemoe_worker_placement_epoch"), epoch);
        assert!(series(&text, "kubemoe_worker_experts_held") > 0.0, "{text}");
        assert!(series(&text, "kubemoe_worker_dispatch_duration_seconds_count") > 0.0, "{text}");
        assert_eq!(series(&text, "kubemoe_worker_dispatch_refused_total"), if rank == 0 { 1.0 } else { 0.0 });
        // The router dispatched over the data path; gRPC computed none (it refused one above).
        assert_eq!(series(&text, "kubemoe_worker_dispatches_total{transport=\"grpc\"}"), 0.0);
        assert!(series(&text, "kubemoe_worker_dispatches_total{transport=\"data\"}") > 0.0, "{text}");
        for line in text.lines().filter(|l| l.starts_with("kubemoe_worker_expert_tokens_total{")) {
            let (labels, value) =
                line.trim_start_matches("kubemoe_worker_expert_tokens_total").rsplit_once(' ').unwrap();
            *summed.entry(labels.to_string()).or_default() += value.parse::<f64>().unwrap();
        }
    }
    // Every token the router routed to an expert was computed by exactly one worker.
    let routed: Vec<(String, f64)> = router_text
        .lines()
        .filter_map(|l| l.strip_prefix("kubemoe_router_expert_tokens"))
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let (labels, value) = l.rsplit_once(' ').unwrap();
            (labels.to_string(), value.parse::<f64>().unwrap())
        })
        .collect();
    assert!(routed.iter().any(|(_, v)| *v > 0.0));
    for (labels, tokens) in routed {
        assert_eq!(summed.get(&labels).copied().unwrap_or(0.0), tokens, "{labels}");
    }
}

#[test]
fn a_chat_template_that_opens_think_puts_the_answer_in_reasoning_content() {
    let dir = std::env::temp_dir().join(format!("kubemoe-think-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_kubemoe"))
        .args(["gen-model", "--preset", "tiny", "--out", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    // DeepSeek-R1's templates end the generation prompt with `<think>\n`.
    let config = dir.join("tokenizer_config.json");
    let mut tokenizer_config = json(&std::fs::read_to_string(&config).unwrap());
    tokenizer_config["chat_template"] =
        "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}<think>\n{% endif %}".into();
    std::fs::write(&config, tokenizer_config.to_string()).unwrap();
    let model = dir.to_str().unwrap();
    let c = Cluster::start(model, 1, &["--http-port", "0", "--served-model-name", "r1"]);
    let addr = c.router.http.clone().unwrap();
    let reference = rt().block_on(async {
        c.client().await.generate(chat_request("Hi", 8)).await.unwrap().into_inner().text
    });
    assert!(!reference.contains("</think>"), "the random model closed its reasoning: {reference:?}");
    let request = serde_json::json!({"model": "r1", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8, "temperature": 0});
    let body = json(&http(&addr, "POST", "/v1/chat/completions", Some(&request)).1);
    let message = &body["choices"][0]["message"];
    assert_eq!(message["reasoning_content"].as_str(), Some(reference.as_str()), "{body}");
    assert!(message["content"].is_null(), "{body}");
    let mut streamed = request.clone();
    streamed["stream"] = true.into();
    let data = events(&http(&addr, "POST", "/v1/chat/completions", Some(&streamed)).1);
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1].iter().map(|e| json(e)).collect();
    let reasoning: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str()).collect();
    assert_eq!(reasoning, reference);
    assert!(
        chunks.iter().all(|c| c["choices"][0]["delta"].get("content").is_none_or(|v| v == "")),
        "{data:?}"
    );
    drop(c);
    std::fs::remove_dir_all(&dir).ok();
}

/// A CA and a certificate it issued for `localhost` and 127.0.0.1, written as cert-manager
/// writes a Secret (`tls.crt`, `tls.key`, `ca.crt`) into a directory of their own.
struct Certs {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

static CERT_DIRS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Certs {
    fn new() -> Self {
        let unique = CERT_DIRS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kubemoe-tls-{}-{unique}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "kubemoe test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        Certs { dir, ca, ca_key }
    }

    /// A new certificate and key for the servers (not yet written).
    fn issue(&self) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        (params.signed_by(&key, &self.ca, &self.ca_key).unwrap(), key)
    }

    /// Writes `tls.crt` and `tls.key`, dated a second later than any write before (the
    /// servers look at modification times once a second).
    fn install(&self, cert: &rcgen::Certificate, key: &rcgen::KeyPair) {
        for (name, pem) in [("tls.crt", cert.pem()), ("tls.key", key.serialize_pem())] {
            let path = self.dir.join(name);
            std::fs::write(&path, pem).unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(std::time::SystemTime::now() + Duration::from_secs(1)).unwrap();
        }
    }

    fn client(&self) -> kubemoe_api::tls::Client {
        let pem = std::fs::read(self.dir.join("ca.crt")).unwrap();
        kubemoe_api::tls::Client::from_ca_pem(&pem, None).unwrap()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The certificate a server presents to a new client (one that resumes no earlier session).
async fn presented(certs: &Certs, addr: &str) -> Vec<u8> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let stream = certs.client().connect(host, port.parse().unwrap()).await.unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// `GET path` over HTTPS (HTTP/1.0), trusting the CA certificate `ca` (DER): the status and
/// body.
fn https_get(ca: Vec<u8>, addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.into()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    let mut stream = rustls::Stream::new(&mut connection, &mut tcp);
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut bytes = Vec::new();
    // The server may close without close_notify once the answer is sent.
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8(bytes).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.split_whitespace().nth(1).unwrap().parse().unwrap(), body.to_string())
}

#[test]
fn with_tls_every_port_is_encrypted_internal_calls_need_the_token_and_a_rotation_keeps_serving() {
    use kubemoe_api::expert::{
        CommitRequest, DispatchRequest, InfoRequest, LoadRequest, PrepareRequest, ReleaseRequest,
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let certs = Certs::new();
    let (first, first_key) = certs.issue();
    certs.install(&first, &first_key);
    let dir = certs.dir.to_str().unwrap().to_string();
    let tls = ["--tls-dir", dir.as_str(), "--health-port", "0"];
    let c = Cluster::start_with("builtin:tiny", 2, &["--http-port", "0"], &tls);
    let client = certs.client();
    let local = source::open("builtin:tiny", Experts::All).unwrap();
    let alone = |prompt: &[u32]| {
        let request =
            Request { prompt: prompt.to_vec(), max_new_tokens: 6, sampling: SamplingParams::default() };
        generate(&local, &[request]).unwrap().remove(0)
    };
    let worker = format!("http://{}", c.workers[0].addr);
    let over_tls = |addr: &str| kubemoe_api::channel(addr, Some(&client)).unwrap();
    rt().block_on(async {
        // The API over TLS (and the router's calls to the workers): the engine's tokens.
        let mut api = InferenceClient::new(over_tls(&c.router.addr));
        let got = api.generate(ids_request(&[1, 2, 3], 6)).await.unwrap().into_inner().token_ids;
        assert_eq!(got, alone(&[1, 2, 3]));
        // Plaintext clients get no answer from any TLS port.
        for addr in [&c.router.addr, c.router.internal.as_ref().unwrap(), &c.workers[0].addr] {
            let mut health = HealthClient::new(kubemoe_api::channel(addr, None).unwrap());
            let refused = health.check(HealthCheckRequest { service: String::new() }).await;
            assert!(refused.is_err(), "{addr} answered a plaintext client");
        }
        // The health ports answer in plaintext, health alone.
        for proc in c.workers.iter().chain([&c.router]) {
            let plain = kubemoe_api::channel(proc.health.as_ref().unwrap(), None).unwrap();
            let status = HealthClient::new(plain.clone())
                .check(HealthCheckRequest { service: String::new() })
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::Serving as i32);
            let mut expert = ExpertClient::with_interceptor(plain, bearer(Some(&c.token)));
            assert_eq!(expert.info(InfoRequest {}).await.unwrap_err().code(), Code::Unimplemented);
        }
        // TLS clients without the deployment's token are refused, and nothing changes.
        let internal = over_tls(c.router.internal.as_ref().unwrap());
        let plan = BalancerClient::with_interceptor(internal.clone(), bearer(Some(&c.token)))
            .load(LoadRequest {})
            .await
            .unwrap()
            .into_inner()
            .plan
            .unwrap();
        let mut moved = plan.clone();
        moved.epoch += 1;
        for layer in &mut moved.layers {
            layer.slots.reverse();
        }
        let held = ExpertClient::with_interceptor(over_tls(&worker), bearer(Some(&c.token)))
            .info(InfoRequest {})
            .await
            .unwrap()
            .into_inner();
        for token in [None, Some("not-the-token")] {
            let mut expert = ExpertClient::with_interceptor(over_tls(&worker), bearer(token));
            let mut balancer = BalancerClient::with_interceptor(internal.clone(), bearer(token));
            let refused = [
                expert.prepare(PrepareRequest { plan: Some(moved.clone()) }).await.map(drop),
                expert.release(ReleaseRequest { epoch: moved.epoch }).await.map(drop),
                expert
                    .dispatch(DispatchRequest { layer: 1, tokens: 0, ..Default::default() })
                    .await
                    .map(drop),
                balancer
                    .commit(CommitRequest { plan: Some(moved.clone()), workers: Vec::new() })
                    .await
                    .map(drop),
            ];
            for (call, result) in refused.into_iter().enumerate() {
                let status = result.expect_err("an internal call without the token was served");
                assert_eq!(status.code(), Code::Unauthenticated, "call {call} with {token:?}: {status:?}");
            }
        }
        let after = ExpertClient::with_interceptor(over_tls(&worker), bearer(Some(&c.token)))
            .info(InfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!((after.epoch, &after.experts), (held.epoch, &held.experts));
        // The OpenAI API's port speaks HTTPS.
        let http = c.router.http.clone().unwrap();
        let ca = certs.ca.der().to_vec();
        let (status, body) =
            tokio::task::spawn_blocking(move || https_get(ca, &http, "/health")).await.unwrap();
        assert_eq!(status, 200, "{body}");

        // Rotation. A half-written pair (new certificate, old key) is not used: the old
        // certificate keeps serving.
        assert_eq!(presented(&certs, &c.router.addr).await, first.der().to_vec());
        let (second, second_key) = certs.issue();
        certs.install(&second, &first_key);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(presented(&certs, &c.router.addr).await, first.der().to_vec());
        // The whole new pair: new connections to every port get it, without a restart.
        certs.install(&second, &second_key);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for addr in
            [&c.router.addr, c.router.internal.as_ref().unwrap(), &c.workers[0].addr, &c.workers[1].addr]
        {
            assert_eq!(presented(&certs, addr).await, second.der().to_vec(), "{addr}");
        }
        // Serving went on: over the connection opened before, and over a new one.
        let got = api.generate(ids_request(&[1, 2, 3], 6)).await.unwrap().into_inner().token_ids;
        assert_eq!(got, alone(&[1, 2, 3]));
        let mut fresh = InferenceClient::new(over_tls(&c.router.addr));
        let got = fresh.generate(ids_request(&[4, 5], 6)).await.unwrap().into_inner().token_ids;
        assert_eq!(got, alone(&[4, 5]));
    });
}

#[test]
fn a_router_whose_kv_cache_cannot_hold_one_whole_context_refuses_to_start() {
    // builtin:v3-shape: 4 layers x (64 + 16) x 4 bytes = 1280 bytes a token; 1 MiB holds 819.
    let out = Command::new(env!("CARGO_BIN_EXE_kubemoe"))
        .args(["router", "--model", "builtin:v3-shape", "--workers", "127.0.0.1:1", "--host", "127.0.0.1"])
        .args(["--port", "0", "--max-context", "100000", "--kv-budget-mib", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kv-budget-mib 1 holds 819 tokens"), "{err}");
    assert!(err.contains("raise --kv-budget-mib to at least 123"), "{err}");
}

/// A port free on loopback now (for a process that must come back on the same one).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A placement file (in a new directory named after `test`) where both of two `tiny` workers
/// hold all 16 experts of both MoE layers (16 slots each); the directory and the file's path.
fn replicated_placement(test: &str) -> (PathBuf, String) {
    let plan = kubemoe_placement::PlacementPlan::initial(2, 16, 16, &[1, 2]);
    let dir = std::env::temp_dir().join(format!("kubemoe-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let placement = dir.join("placement.json");
    std::fs::write(&placement, serde_json::to_string(&plan).unwrap()).unwrap();
    (dir, placement.to_str().unwrap().to_string())
}

/// A router (with an HTTP port) of the workers on loopback `ports`, in rank order.
fn router_on(model: &str, ports: &[u16], extra: &[&str]) -> Proc {
    let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let urls = urls.join(",");
    let mut args = vec!["router", "--model", model, "--workers", &urls, "--host", "127.0.0.1"];
    args.extend(["--port", "0", "--http-port", "0"]);
    args.extend(extra);
    spawn(&args)
}

/// `kubemoe_router_workers_down` of a router's `/metrics`.
fn workers_down(http_addr: &str) -> u32 {
    let (_, text) = http(http_addr, "GET", "/metrics", None);
    let line = text.lines().find(|l| l.starts_with("kubemoe_router_workers_down ")).unwrap();
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_dead_worker_is_routed_around_through_replicas_and_rejoins_when_back() {
    let model = "builtin:tiny";
    let local = source::open(model, Experts::All).unwrap();
    let alone = |prompt: &[u32]| {
        let request =
            Request { prompt: prompt.to_vec(), max_new_tokens: 8, sampling: SamplingParams::default() };
        generate(&local, &[request]).unwrap().remove(0)
    };
    let (dir, placement) = replicated_placement("replicated");
    let placement = placement.as_str();
    let ports = [free_port(), free_port()];
    let start = |rank: usize| worker_with(model, rank, 2, ports[rank], &["--placement", placement]);
    let mut workers: Vec<Option<Proc>> = vec![Some(start(0)), Some(start(1))];
    let router = router_on(model, &ports, &["--placement", placement, "--worker-deadline-ms", "3000"]);
    ready(&router);
    let http_addr = router.http.clone().unwrap();
    let prompts: [&[u32]; 3] = [&[1, 2, 3], &[4, 5, 6, 7], &[9]];
    rt().block_on(async {
        let mut client = InferenceClient::connect(format!("http://{}", router.addr)).await.unwrap();
        for p in prompts {
            assert_eq!(client.generate(ids_request(p, 8)).await.unwrap().into_inner().token_ids, alone(p));
        }
        // Worker 1 dies: no request fails, every output is the engine's.
        workers[1] = None;
        for _ in 0..3 {
            for p in prompts {
                let got =
                    client.generate(ids_request(p, 8)).await.expect("a request failed with a worker down");
                assert_eq!(got.into_inner().token_ids, alone(p));
            }
        }
        assert_eq!(workers_down(&http_addr), 1);
        // It comes back on its port: routed to again within the probe period.
        workers[1] = Some(start(1));
        let back = Instant::now();
        while workers_down(&http_addr) != 0 {
            assert!(back.elapsed() < Duration::from_secs(10), "worker 1 not back in the plan");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for p in prompts {
            assert_eq!(client.generate(ids_request(p, 8)).await.unwrap().into_inner().token_ids, alone(p));
        }
        // Frozen (SIGSTOP): down once a dispatch passes the 3 s deadline, the request served by
        // the replicas; thawed (SIGCONT): back.
        let pid = workers[1].as_ref().unwrap().child.id().to_string();
        let signal =
            |name: &str| assert!(Command::new("kill").args([name, &pid]).status().unwrap().success());
        signal("-STOP");
        let got =
            client.generate(ids_request(prompts[0], 8)).await.expect("a request failed with a worker frozen");
        assert_eq!(got.into_inner().token_ids, alone(prompts[0]));
        assert_eq!(workers_down(&http_addr), 1);
        signal("-CONT");
        let thawed = Instant::now();
        while workers_down(&http_addr) != 0 {
            assert!(thawed.elapsed() < Duration::from_secs(10), "worker 1 not back after SIGCONT");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    drop(workers);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn requests_needing_an_expert_whose_only_worker_is_down_fail_at_once() {
    // The minimal placement: each expert on one worker.
    let ports = [free_port(), free_port()];
    let mut workers: Vec<Option<Proc>> =
        (0..2).map(|rank| Some(worker_with("builtin:tiny", rank, 2, ports[rank], &[]))).collect();
    let router = router_on("builtin:tiny", &ports, &["--worker-deadline-ms", "5000"]);
    ready(&router);
    // Enough tokens that some route reaches worker 1's experts.
    let prompt: Vec<u32> = (1..=24).collect();
    rt().block_on(async {
        let mut client = InferenceClient::connect(format!("http://{}", router.addr)).await.unwrap();
        client.generate(ids_request(&prompt, 4)).await.unwrap();
        workers[1] = None;
        for attempt in 0..3 {
            let started = Instant::now();
            let status = client.generate(ids_request(&prompt, 4)).await.unwrap_err();
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            // Well within the 5 s deadline: refused connections and known-down workers.
            assert!(started.elapsed() < Duration::from_secs(2), "attempt {attempt}: {:?}", started.elapsed());
            if attempt > 0 {
                assert!(status.message().contains("is down"), "{}", status.message());
            }
        }
    });
}

#[test]
fn a_router_started_before_its_workers_answers_at_once_and_serves_once_they_are_up() {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let model = "builtin:tiny";
    let ports = [free_port(), free_port()];
    let router = router_on(model, &ports, &[]);
    let http_addr = router.http.clone().unwrap();
    // grpc.health.v1 status of `service` (1 SERVING, 2 NOT_SERVING).
    let serving = |service: &str| {
        let request = HealthCheckRequest { service: service.into() };
        let mut health = HealthClient::new(kubemoe_api::channel(&router.addr, None).unwrap());
        async move { health.check(request).await.unwrap().into_inner().status }
    };
    rt().block_on(async {
        let mut client = InferenceClient::connect(format!("http://{}", router.addr)).await.unwrap();
        let ask = Instant::now();
        // Alive, not ready; a request is refused at once, saying what the router waits for:
        // its weights to load, then the workers.
        assert_eq!(serving("liveness").await, 1);
        assert_eq!(serving("").await, 2);
        let refused = loop {
            let refused = client.generate(ids_request(&[5, 6], 2)).await.unwrap_err();
            assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
            if !refused.message().starts_with("loading weights: ") {
                break refused;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(refused.message().contains("waiting for the workers: worker 0"), "{}", refused.message());
        assert_eq!(http(&http_addr, "GET", "/health", None).0, 503);
        assert!(ask.elapsed() < Duration::from_secs(2), "answers took {:?}", ask.elapsed());

        // A worker of the wrong rank is named as soon as it answers.
        let wrong = worker(model, 1, 2, ports[0]);
        let started = Instant::now();
        loop {
            let e = client.generate(ids_request(&[5, 6], 2)).await.unwrap_err();
            if e.message().contains("worker 0 reports rank 1;") {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "{}", e.message());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(wrong);

        // The right workers: serving within a second of the last one being ready (loaded).
        let _w0 = worker(model, 0, 2, ports[0]);
        let _w1 = worker(model, 1, 2, ports[1]);
        let up = Instant::now();
        while serving("").await != 1 {
            assert!(up.elapsed() < Duration::from_secs(10), "not serving");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = up.elapsed();
        eprintln!("serving {took:?} after the last worker was ready");
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert_eq!(http(&http_addr, "GET", "/health", None).0, 200);
        let local = source::open(model, Experts::All).unwrap();
        let request = Request { prompt: vec![5, 6], max_new_tokens: 4, sampling: SamplingParams::default() };
        let expected = generate(&local, &[request]).unwrap().remove(0);
        let got = client.generate(ids_request(&[5, 6], 4)).await.unwrap().into_inner().token_ids;
        assert_eq!(got, expected);
    });
}

/// A `tiny` manifest for `up` on 4 workers with the given `experts` fields; load-driven
/// rebalancing is kept out of the way (threshold 100), so only recovery epochs move experts.
fn failover_manifest(name: &str, experts: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kubemoe-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("md.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: kubemoe.io/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: {name}}}\nspec:\n  \
             model: {{source: 'builtin:tiny'}}\n  workers: {{replicas: 4}}\n  experts: {{{experts}}}\n  \
             balancing: {{interval: 1s, window: 30s, imbalanceThreshold: 100, cooldown: 1h}}\n"
        ),
    )
    .unwrap();
    manifest
}

/// Prompts and what the single-process engine answers to each (8 new tokens).
fn tiny_prompts() -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let local = source::open("builtin:tiny", Experts::All).unwrap();
    let prompts: Vec<Vec<u32>> =
        (0..8u32).map(|i| (0..4 + 3 * i).map(|j| (i * 41 + j * 13) % 500 + 2).collect()).collect();
    let expected = prompts
        .iter()
        .map(|p| {
            let request =
                Request { prompt: p.clone(), max_new_tokens: 8, sampling: SamplingParams::default() };
            generate(&local, &[request]).unwrap().remove(0)
        })
        .collect();
    (prompts, expected)
}

/// The pid of `up`'s worker of `rank`, while it has one.
fn worker_pid(up: u32, rank: usize) -> Option<u32> {
    let flag = format!("--rank\0{rank}\0");
    children_of(up)
        .into_iter()
        .find(|(_, cmd)| cmd.contains("worker") && cmd.contains(&flag))
        .map(|(pid, _)| pid)
}

#[test]
fn with_min_replicas_2_a_worker_killed_mid_stream_fails_no_request() {
    let manifest = failover_manifest("replicated", "redundant: 16, minReplicas: 2");
    // A killed worker resets its connections: found at once, whatever the deadline, which is
    // long so that a live worker slowed by a loaded machine is never taken for dead.
    let Up { mut up, addr, http, log, .. } = Up::start(&manifest, &["--worker-deadline-ms", "10000"]);
    let (prompts, expected) = tiny_prompts();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (served, back_after) = rt().block_on(async {
        let clients = looping_clients(&addr, &prompts, &expected, &stop);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Command::new("kill").args(["-KILL", &worker_pid(up.id(), 1).unwrap().to_string()]).status().unwrap();
        let killed = Instant::now();
        // The router routes around it, `up` starts it again, the router takes it back.
        tokio::time::sleep(Duration::from_millis(500)).await;
        while workers_down(&http) != 0 {
            assert!(killed.elapsed() < Duration::from_secs(60), "worker 1 never came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let back_after = killed.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut served = 0;
        for c in clients {
            served += c.await.expect("a request failed or changed its output");
        }
        (served, back_after)
    });
    eprintln!(
        "{served} requests, none failed; worker 1 SIGKILLed, back in the routing within {back_after:?}"
    );
    let log: Vec<String> = log.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("worker 1 exited")), "{log:?}");
    Command::new("kill").args(["-TERM", &up.id().to_string()]).status().unwrap();
    up.wait().unwrap();
}

#[test]
fn a_frozen_workers_lost_experts_are_placed_on_live_ones_by_a_recovery_epoch() {
    // 24 slots, 6 per worker: 0-5, 6-11, 12-15 0 1, 2-7. Worker 1 alone holds 8-11.
    let manifest = failover_manifest("recovering", "redundant: 8");
    let Up { mut up, addr, http, log, .. } = Up::start(&manifest, &["--worker-deadline-ms", "1000"]);
    let (prompts, expected) = tiny_prompts();
    let frozen = worker_pid(up.id(), 1).unwrap().to_string();
    Command::new("kill").args(["-STOP", &frozen]).status().unwrap();
    let stopped = Instant::now();
    let (mut failed, mut last_failure, mut clean_rounds) = (0, None, 0);
    rt().block_on(async {
        let mut client = InferenceClient::connect(format!("http://{addr}")).await.unwrap();
        // Requests needing experts 8-11 fail (after one deadline, then at once) until the
        // recovery epoch is committed; then none fail.
        while clean_rounds < 3 {
            assert!(stopped.elapsed() < Duration::from_secs(60), "no recovery: {failed} failures");
            let mut clean = true;
            for (p, e) in prompts.iter().zip(&expected) {
                match client.generate(ids_request(p, 8)).await {
                    Ok(got) => assert_eq!(&got.into_inner().token_ids, e),
                    Err(status) => {
                        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                        (failed, last_failure, clean) = (failed + 1, Some(stopped.elapsed()), false);
                    }
                }
            }
            clean_rounds = if clean { clean_rounds + 1 } else { 0 };
        }
    });
    let log: Vec<String> = log.try_iter().collect();
    let recovery = log.iter().find(|l| l.contains("recovery epoch 1: workers 1 down"));
    assert!(recovery.is_some(), "{log:?}");
    assert!(
        log.iter().any(|l| l.contains("workers down: 1; every expert has a copy on a live worker")),
        "{log:?}"
    );
    eprintln!("SIGSTOP worker 1: {failed} requests failed, the last {last_failure:?} after; none since");
    // Resumed: holds what epoch 1 places on it (its slots did not change), so it is taken back.
    Command::new("kill").args(["-CONT", &frozen]).status().unwrap();
    let resumed = Instant::now();
    while workers_down(&http) != 0 {
        assert!(resumed.elapsed() < Duration::from_secs(10), "worker 1 not taken back");
        std::thread::sleep(Duration::from_millis(50));
    }
    rt().block_on(async {
        let mut client = InferenceClient::connect(format!("http://{addr}")).await.unwrap();
        for (p, e) in prompts.iter().zip(&expected) {
            assert_eq!(&client.generate(ids_request(p, 8)).await.unwrap().into_inner().token_ids, e);
        }
    });
    Command::new("kill").args(["-TERM", &up.id().to_string()]).status().unwrap();
    up.wait().unwrap();
}

#[test]
fn a_router_started_while_a_replicated_worker_is_dead_serves_around_it() {
    let model = "builtin:tiny";
    // Worker 0 alone can serve.
    let (dir, placement) = replicated_placement("dead-at-start");
    let placement = placement.as_str();
    let ports = [free_port(), free_port()];
    let _w0 = worker_with(model, 0, 2, ports[0], &["--placement", placement]);
    let router = router_on(model, &ports, &["--placement", placement]);
    ready(&router);
    let http_addr = router.http.clone().unwrap();
    let (prompts, expected) = tiny_prompts();
    rt().block_on(async {
        let mut client = InferenceClient::connect(format!("http://{}", router.addr)).await.unwrap();
        for (p, e) in prompts.iter().zip(&expected) {
            assert_eq!(&client.generate(ids_request(p, 8)).await.unwrap().into_inner().token_ids, e);
        }
    });
    assert_eq!(workers_down(&http_addr), 1);
    // Worker 1 starts: taken back at the next probe.
    let _w1 = worker_with(model, 1, 2, ports[1], &["--placement", placement]);
    let started = Instant::now();
    while workers_down(&http_addr) != 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "worker 1 not taken back");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits for a line of `up`'s containing `text`, keeping what it read in `seen`.
fn await_line(log: &std::sync::mpsc::Receiver<String>, seen: &mut Vec<String>, text: &str) -> Duration {
    let started = Instant::now();
    while !seen.iter().any(|l| l.contains(text)) {
        let left = Duration::from_secs(90).saturating_sub(started.elapsed());
        match log.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("no line with {text:?} in 90 s: {seen:?}"),
        }
    }
    started.elapsed()
}

#[test]
fn resizing_2_4_3_workers_under_load_fails_no_request_and_restarts_no_worker() {
    // 16 experts + 8 redundant slots: 12, 6, then 8 per worker.
    let manifest = failover_manifest("resized", "redundant: 8");
    let write = |replicas: u32| {
        let text = std::fs::read_to_string(&manifest).unwrap();
        let old = text.split("replicas: ").nth(1).unwrap().split('}').next().unwrap().to_string();
        std::fs::write(
            &manifest,
            text.replace(&format!("replicas: {old}}}"), &format!("replicas: {replicas}}}")),
        )
        .unwrap();
    };
    write(2);
    let Up { mut up, addr, log, .. } = Up::start(&manifest, &["--worker-deadline-ms", "10000"]);
    let pids = |ranks: std::ops::Range<usize>| ranks.map(|r| worker_pid(up.id(), r)).collect::<Vec<_>>();
    let first = pids(0..2);
    let (prompts, expected) = tiny_prompts();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut seen = Vec::new();
    let (served, times, workers) = rt().block_on(async {
        let clients = looping_clients(&addr, &prompts, &expected, &stop);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        write(4);
        let up4 = await_line(&log, &mut seen, "placement epoch 1 in force");
        let added = pids(2..4);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        write(3);
        let down3 = await_line(&log, &mut seen, "placement epoch 2 in force");
        await_line(&log, &mut seen, "worker 3 stopped");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut served = 0;
        for c in clients {
            served += c.await.expect("a request failed or changed its output");
        }
        let mut client = InferenceClient::connect(format!("http://{addr}")).await.unwrap();
        let info = client.model_info(ModelInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(pids(0..3), [&first[..], &added[..1]].concat(), "a worker that stays was restarted");
        assert_eq!(pids(3..4), [None]);
        (served, (up4, down3), info.workers)
    });
    assert_eq!(workers, 3);
    assert!(seen.iter().any(|l| l.contains("resizing to epoch 1: 2 -> 4 workers, 6 slots each")), "{seen:?}");
    assert!(seen.iter().any(|l| l.contains("resizing to epoch 2: 4 -> 3 workers, 8 slots each")), "{seen:?}");
    eprintln!(
        "resized 2 -> 4 -> 3 workers under 3 looping clients: {served} requests, none failed; \
         in force {:?} and {:?} after each edit",
        times.0, times.1
    );
    Command::new("kill").args(["-TERM", &up.id().to_string()]).status().unwrap();
    up.wait().unwrap();
}
