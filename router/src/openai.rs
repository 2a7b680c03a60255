//! The OpenAI-compatible HTTP API on the router's HTTP port: `GET /v1/models`,
//! `POST /v1/completions` and `POST /v1/chat/completions` (whole responses, or server-sent
//! events ending with `data: [DONE]`, usage in a last chunk with
//! `stream_options.include_usage`), and `GET /health`.
//!
//! Requests go through the validation, admission and batch loop of the gRPC service
//! ([`InferenceService::start`]); only the shapes differ. Fields of OpenAI's API that would
//! change the output but are not built (`n` > 1, `echo`, penalties, `logit_bias`,
//! tools and functions, JSON response formats, `suffix`, and vLLM's sampling extensions) are
//! refused with a 400 naming them, never ignored. As OpenAI's and vLLM's servers do, a request
//! without `seed` samples with a fresh one, `temperature` defaults to 1, and a chat completion
//! without `max_tokens` may use the rest of the context (a completion: 16 tokens). When the
//! chat template opens a `<think>` block, the answer is split into `reasoning_content` and
//! `content` ([`crate::reasoning`]). `logprobs` (chat: `logprobs` + `top_logprobs`; completions:
//! `logprobs: N`) return the log-softmax of the raw logits of each generated token and its
//! most likely alternatives, as vLLM does by default, in each endpoint's shape. Errors have
//! OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad field, 404
//! for an unknown model, 429 over the concurrency limit, 503 while the router cannot serve,
//! 401 without a valid API key when the router has keys ([`kubemoe_api::auth`]).
//! Request bodies are limited to axum's default 2 MiB.

use crate::reasoning::Splitter;
use crate::service::{Admission, InferenceService, Unset, MAX_LOGPROBS};
use crate::text::TextCodec;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kubemoe_api::inference::generate_request::Input;
use kubemoe_api::inference::{
    ChatMessage, ChatMessages, FinishReason, GenerateRequest, GenerateResponse, TokenIds, TokenLogprobs,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// What the handlers share.
pub struct Api {
    pub service: Arc<InferenceService>,
    /// The name clients send as `model` and see in `/v1/models`.
    pub served_name: String,
    pub shutdown: CancellationToken,
    /// When this router started (`created` of the model).
    pub started: u64,
    /// API keys `/v1/*` requires ([`kubemoe_api::auth`]); none: open.
    pub keys: Option<Arc<kubemoe_api::auth::Keys>>,
    /// How long a request's body may take to arrive once its head has.
    pub body_timeout: std::time::Duration,
}

/// The largest request body `/v1/*` reads (axum's default limit): a context of 128k tokens is
/// well under 1 MiB of text.
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// The routes of the API, to merge into the router's HTTP server.
pub fn routes(api: Arc<Api>) -> axum::Router {
    let v1 = axum::Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        // Layers run outside in: the key is checked before the body is read.
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), read_body))
        .route_layer(axum::middleware::from_fn_with_state(api.keys.clone(), authenticate));
    axum::Router::new().route("/health", get(health)).merge(v1).with_state(api)
}

/// What the HTTP port serves while the model loads ([`kubemoe_api::loading::app`]), `/v1/*`
/// behind the same key check as the API: a caller without a key learns nothing, and one with a
/// wrong key gets its 401 now rather than a 503 to retry.
pub fn loading(
    progress: kubemoe_api::loading::Progress,
    keys: Option<Arc<kubemoe_api::auth::Keys>>,
) -> axum::Router {
    let app = kubemoe_api::loading::app(progress);
    axum::Router::new()
        .route("/v1/{*path}", axum::routing::any_service(app.clone()))
        .route_layer(axum::middleware::from_fn_with_state(keys, authenticate))
        .merge(app)
}

/// Refuses a `/v1/*` request without a valid API key with OpenAI's 401, before its body is read.
async fn authenticate(
    State(keys): State<Option<Arc<kubemoe_api::auth::Keys>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(keys) = &keys {
        let header = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
        if let Err(denied) = keys.check(header) {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: denied.to_string(),
                kind: "invalid_request_error",
                param: None,
                code: Some("invalid_api_key"),
            }
            .into_response();
        }
    }
    next.run(request).await
}

/// Reads a `/v1/*` request's body within `body_timeout` (a client that sends its head and then
/// trickles or withholds the body would otherwise hold a connection and a task for as long as
/// it likes) and at most [`MAX_BODY_BYTES`] of it, answering 408 or 413 in OpenAI's shape.
async fn read_body(
    State(api): State<Arc<Api>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let error = |status, message: String| ApiError {
        status,
        message,
        kind: "invalid_request_error",
        param: None,
        code: None,
    };
    let bytes = match tokio::time::timeout(api.body_timeout, axum::body::to_bytes(body, MAX_BODY_BYTES)).await
    {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e))
            if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) =>
        {
            let message = format!("the request body is over {MAX_BODY_BYTES} bytes");
            return error(StatusCode::PAYLOAD_TOO_LARGE, message).into_response();
        }
        Ok(Err(e)) => {
            return error(StatusCode::BAD_REQUEST, format!("reading the request body: {e}")).into_response()
        }
        Err(_) => {
            let message = format!("the request body did not arrive within {:?}", api.body_timeout);
            return error(StatusCode::REQUEST_TIMEOUT, message).into_response();
        }
    };
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// The HTTP form of the gRPC path's status (the message of INVALID_ARGUMENT starts with the
    /// field it names).
    fn from_status(status: &tonic::Status) -> Self {
        let message = status.message().to_string();
        let (code, kind, status) = match status.code() {
            Code::InvalidArgument => (None, "invalid_request_error", StatusCode::BAD_REQUEST),
            Code::ResourceExhausted => {
                (Some("rate_limit_exceeded"), "rate_limit_error", StatusCode::TOO_MANY_REQUESTS)
            }
            Code::Unavailable => (None, "service_unavailable", StatusCode::SERVICE_UNAVAILABLE),
            _ => (None, "internal_error", StatusCode::INTERNAL_SERVER_ERROR),
        };
        let param = (status == StatusCode::BAD_REQUEST)
            .then(|| message.split(':').next().map(|field| openai_field(field.trim())))
            .flatten();
        ApiError { status, message, kind, param, code }
    }
}

/// The OpenAI name of a field the gRPC validation names.
fn openai_field(grpc: &str) -> String {
    match grpc {
        "input" | "input_ids" => "prompt".into(),
        other => other.into(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }});
        (self.status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
    }
}

fn json_response(value: &Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

async fn health(State(api): State<Arc<Api>>) -> StatusCode {
    if api.shutdown.is_cancelled() || api.service.waiting.borrow().is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn models(State(api): State<Arc<Api>>) -> Response {
    json_response(&json!({"object": "list", "data": [{
        "id": api.served_name, "object": "model", "created": api.started, "owned_by": "kubemoe",
        "max_model_len": api.service.admission.max_context,
    }]}))
}

/// A prompt: text, or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    /// A batch of prompts (one text or id list each): refused, one prompt per request is built.
    Batch(Vec<Value>),
}

/// `stop`: one string or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// The fields both endpoints share. Unknown fields are ignored, as OpenAI's server does.
#[derive(Deserialize)]
pub struct Common {
    model: String,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
    echo: Option<bool>,
    best_of: Option<u32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    tools: Option<Vec<Value>>,
    response_format: Option<Value>,
    /// Everything else: checked for fields that would change the output ([`NOT_BUILT`]).
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

/// Fields of OpenAI's API or vLLM's extensions that change the output, are not built, and are
/// refused unless they hold their no-op value (`None`: any non-null value is refused).
const NOT_BUILT: [(&str, Option<Value>, &str); 14] = [
    ("suffix", None, "a suffix"),
    ("functions", None, "function calling"),
    ("function_call", None, "function calling"),
    ("min_p", Some(Value::Null), "min-p sampling"),
    ("repetition_penalty", Some(Value::Null), "a repetition penalty"),
    ("min_tokens", Some(Value::Null), "a minimum length"),
    ("ignore_eos", Some(Value::Bool(false)), "ignoring the end of sequence"),
    ("stop_token_ids", Some(Value::Null), "stop token ids"),
    ("use_beam_search", Some(Value::Bool(false)), "beam search"),
    ("prompt_logprobs", None, "returning log-probabilities"),
    ("guided_json", None, "guided decoding"),
    ("guided_regex", None, "guided decoding"),
    ("guided_choice", None, "guided decoding"),
    ("guided_grammar", None, "guided decoding"),
];

/// Whether `value` of `field` is its no-op value.
fn is_noop(field: &str, value: &Value, noop: &Option<Value>) -> bool {
    match (field, value) {
        (_, Value::Null) => true,
        ("min_p" | "min_tokens", v) => v.as_f64() == Some(0.0),
        ("repetition_penalty", v) => v.as_f64() == Some(1.0),
        ("stop_token_ids", Value::Array(a)) => a.is_empty(),
        (_, v) => noop.as_ref() == Some(v),
    }
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<OpenAiMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct OpenAiMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// A seed for a request that gives none.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // The standard library's per-instance random keys: a fresh seed without an RNG of our own.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(now());
    hasher.finish()
}

/// Message content: a string, or parts of which only text is built.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        // serde names the missing or mistyped field in its message.
        ApiError::invalid("body", format!("the request body is not a valid request: {e}"))
    })
}

impl Common {
    /// Refuses what is not built; checks the model name.
    fn check(&self, served_name: &str, admission: &Admission) -> Result<(), ApiError> {
        if self.model != served_name {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model `{}` does not exist; this server serves `{}`",
                    self.model, served_name
                ),
                kind: "invalid_request_error",
                param: Some("model".into()),
                code: Some("model_not_found"),
            });
        }
        let not_built = |param: &str, what: &str| {
            Err(ApiError::invalid(param, format!("{param}: {what} is not supported by this server yet")))
        };
        if self.n.is_some_and(|n| n != 1) {
            return not_built("n", "more than one choice per request");
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return not_built("best_of", "more than one candidate per request");
        }
        if self.echo == Some(true) {
            return not_built("echo", "echoing the prompt");
        }
        for (param, value) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if value.is_some_and(|v| v != 0.0) {
                return not_built(param, "a repetition penalty");
            }
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return not_built("logit_bias", "biasing logits");
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return not_built("tools", "tool calling");
        }
        if let Some(format) = &self.response_format {
            if format.get("type").and_then(Value::as_str).is_some_and(|t| t != "text") {
                return not_built("response_format", "a structured response format");
            }
        }
        for (field, noop, what) in &NOT_BUILT {
            if self.other.get(*field).is_some_and(|v| !is_noop(field, v, noop)) {
                return not_built(field, what);
            }
        }
        if self.max_completion_tokens.or(self.max_tokens) == Some(0) {
            let field =
                if self.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
            return Err(ApiError::invalid(field, format!("{field}: must be at least 1")));
        }
        if admission.text.is_none() {
            return Err(ApiError::invalid(
                "model",
                format!(
                    "{}: the model has no tokenizer.json, which the OpenAI API needs to answer in text",
                    self.model
                ),
            ));
        }
        Ok(())
    }

    /// Alternatives per token of the log-probabilities asked for, `None` when none are. Chat
    /// takes `logprobs: true` and `top_logprobs: N`; completions take `logprobs: N`.
    fn logprobs(&self, kind: Kind) -> Result<Option<u32>, ApiError> {
        let count = |field: &str, value: &Value| {
            value.as_u64().filter(|n| *n <= u64::from(MAX_LOGPROBS)).map(|n| n as u32).ok_or_else(|| {
                ApiError::invalid(
                    field,
                    format!("{field}: {value} must be an integer from 0 to {MAX_LOGPROBS}"),
                )
            })
        };
        let given = |v: &Option<Value>| v.clone().filter(|v| !v.is_null());
        match kind {
            Kind::Completion => {
                if given(&self.top_logprobs).is_some() {
                    return Err(ApiError::invalid(
                        "top_logprobs",
                        "top_logprobs: completions take `logprobs: N` for N alternatives per token",
                    ));
                }
                given(&self.logprobs).map(|v| count("logprobs", &v)).transpose()
            }
            Kind::Chat => {
                let on = match given(&self.logprobs) {
                    None => false,
                    Some(Value::Bool(on)) => on,
                    Some(other) => {
                        return Err(ApiError::invalid(
                            "logprobs",
                            format!("logprobs: {other} must be true or false (top_logprobs sets how many alternatives)"),
                        ))
                    }
                };
                let top = given(&self.top_logprobs).map(|v| count("top_logprobs", &v)).transpose()?;
                match (on, top) {
                    (false, Some(n)) if n > 0 => {
                        Err(ApiError::invalid("top_logprobs", "top_logprobs: needs `logprobs: true`"))
                    }
                    (false, _) => Ok(None),
                    (true, top) => Ok(Some(top.unwrap_or(0))),
                }
            }
        }
    }

    /// The gRPC request with `input`, as the batch loop takes it.
    fn request(&self, input: Input, kind: Kind) -> Result<GenerateRequest, ApiError> {
        let top_k = match self.top_k {
            None => 0,
            // vLLM's "no top-k" is -1; 0 means the same here.
            Some(k) if k <= 0 => 0,
            Some(k) => u32::try_from(k).map_err(|_| ApiError::invalid("top_k", "top_k is too large"))?,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(s)) => s.clone(),
        };
        Ok(GenerateRequest {
            input: Some(input),
            max_tokens: self.max_completion_tokens.or(self.max_tokens).unwrap_or(0),
            // OpenAI's default temperature is 1.
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p,
            top_k,
            seed: Some(self.seed.unwrap_or_else(random_seed)),
            stop,
            logprobs: self.logprobs(kind)?,
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false)
    }
}

async fn completions(State(api): State<Arc<Api>>, headers: HeaderMap, body: Bytes) -> Response {
    serve(&api, &headers, Kind::Completion, &body).await
}

async fn chat_completions(State(api): State<Arc<Api>>, headers: HeaderMap, body: Bytes) -> Response {
    serve(&api, &headers, Kind::Chat, &body).await
}

async fn serve(api: &Api, headers: &HeaderMap, kind: Kind, body: &[u8]) -> Response {
    let run = async {
        let (request, common) = request_of(kind, body, &api.served_name, &api.service.admission)?;
        generate(api, headers, request, &common, kind).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// A `/v1/completions` or `/v1/chat/completions` body as the request the batch loop takes
/// (then checked by [`Admission::prepare`], as gRPC requests are), with the options of its
/// answer: every check of the body itself, each refusal in OpenAI's shape.
pub fn request_of(
    kind: Kind,
    body: &[u8],
    served_name: &str,
    admission: &Admission,
) -> Result<(GenerateRequest, Common), ApiError> {
    match kind {
        Kind::Completion => {
            let r: CompletionRequest = parse(body)?;
            r.common.check(served_name, admission)?;
            let input = match r.prompt {
                Prompt::Text(text) => Input::Prompt(text),
                Prompt::Ids(ids) => Input::InputIds(TokenIds { ids }),
                // One prompt in a list, as many clients send it.
                Prompt::Batch(mut prompts) if prompts.len() == 1 => match prompts.remove(0) {
                    Value::String(text) => Input::Prompt(text),
                    ids => Input::InputIds(TokenIds {
                        ids: serde_json::from_value(ids).map_err(|_| {
                            ApiError::invalid(
                                "prompt",
                                "prompt: a text, a list of token ids, or a list of one of them",
                            )
                        })?,
                    }),
                },
                Prompt::Batch(prompts) => {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!(
                            "prompt: one prompt per request is supported, not a batch of {}",
                            prompts.len()
                        ),
                    ))
                }
            };
            let request = r.common.request(input, Kind::Completion)?;
            Ok((request, r.common))
        }
        Kind::Chat => {
            let r: ChatRequest = parse(body)?;
            r.common.check(served_name, admission)?;
            let mut messages = Vec::with_capacity(r.messages.len());
            for (i, m) in r.messages.into_iter().enumerate() {
                let content = match m.content {
                    None => String::new(),
                    Some(Content::Text(text)) => text,
                    Some(Content::Parts(parts)) => {
                        if let Some(other) = parts.iter().find(|p| p.kind != "text") {
                            return Err(ApiError::invalid(
                                "messages",
                                format!(
                                    "messages[{i}].content: parts of type `{}` are not supported; send text",
                                    other.kind
                                ),
                            ));
                        }
                        parts.into_iter().map(|p| p.text).collect::<Vec<_>>().join("\n")
                    }
                };
                // OpenAI's newer name for the system role; chat templates know `system`.
                let role = if m.role == "developer" { "system".to_string() } else { m.role };
                messages.push(ChatMessage { role, content });
            }
            let request = r.common.request(Input::Messages(ChatMessages { messages }), Kind::Chat)?;
            Ok((request, r.common))
        }
    }
}

/// The two endpoints that generate.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Kind {
    Completion,
    Chat,
}

/// Runs `request` through the service; answers whole or as a stream.
async fn generate(
    api: &Api,
    headers: &HeaderMap,
    request: GenerateRequest,
    common: &Common,
    kind: Kind,
) -> Result<Response, ApiError> {
    let client_id = headers
        .get(kubemoe_api::trace::REQUEST_ID_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(kubemoe_api::trace::valid_request_id);
    let (id, span) = api.service.identify(client_id);
    let unset = match kind {
        Kind::Completion => Unset::Default,
        Kind::Chat => Unset::RestOfContext,
    };
    let logprobs = request.logprobs.is_some();
    let started = span
        .in_scope(|| api.service.start(id.clone(), request, unset))
        .map_err(|s| ApiError::from_status(&s))?;
    let mut rx = started.responses;
    let meta = Meta {
        id: match kind {
            Kind::Completion => format!("cmpl-{id}"),
            Kind::Chat => format!("chatcmpl-{id}"),
        },
        created: now(),
        model: api.served_name.clone(),
        kind,
        reasoning: started.reasoning,
    };
    // `check` refused the request unless the model has a tokenizer.
    let codec = api
        .service
        .admission
        .text
        .clone()
        .ok_or_else(|| ApiError::from_status(&tonic::Status::internal("the model has no tokenizer")))?;
    let mut logprobs = logprobs.then(|| LogprobsWriter { codec, kind, offset: 0 });
    if !common.stream.unwrap_or(false) {
        let mut text = String::new();
        let mut tokens = Vec::new();
        while let Some(message) = rx.recv().await {
            let message = message.map_err(|s| ApiError::from_status(&s))?;
            text.push_str(&message.text);
            tokens.extend(message.logprobs.iter().cloned());
            if let Some(finish) = finished(&message) {
                let logprobs = logprobs.as_mut().map_or(Ok(Value::Null), |w| w.render(&tokens))?;
                let usage = usage(&message);
                let mut response = json_response(&meta.whole(&text, finish, usage, logprobs));
                set_id(&mut response, &id);
                return Ok(response);
            }
        }
        return Err(ApiError::from_status(&tonic::Status::internal(
            "the sequence ended without a finish reason",
        )));
    }
    let include_usage = common.include_usage();
    let (tx, events) = tokio::sync::mpsc::channel::<Event>(16);
    tokio::spawn(async move {
        let send = |value: Value| tx.send(Event::default().data(value.to_string()));
        let error = |e: ApiError| {
            let ApiError { message, kind, code, .. } = e;
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        };
        let mut splitter = Splitter::new(meta.reasoning);
        if kind == Kind::Chat
            && send(meta.chunk(json!({"role": "assistant", "content": ""}), None, Value::Null)).await.is_err()
        {
            return;
        }
        loop {
            // A client that leaves stops its sequence at once (dropping `rx` ends it in the
            // batch loop), even while no text is due.
            let message = tokio::select! {
                message = rx.recv() => message,
                () = tx.closed() => return,
            };
            let message = match message {
                Some(Ok(m)) => m,
                Some(Err(status)) => {
                    let _ = send(error(ApiError::from_status(&status))).await;
                    break;
                }
                // Ended without a finish (the router is stopping): never a truncated success.
                None => {
                    let stopped = tonic::Status::unavailable("the router stopped the request");
                    let _ = send(error(ApiError::from_status(&stopped))).await;
                    break;
                }
            };
            let finish = finished(&message);
            let (delta, empty) = match kind {
                Kind::Chat => {
                    let mut parts = splitter.push(&message.text);
                    if finish.is_some() {
                        parts.reasoning.push_str(&splitter.finish().reasoning);
                    }
                    let mut delta = serde_json::Map::new();
                    if !parts.reasoning.is_empty() {
                        delta.insert("reasoning_content".into(), parts.reasoning.into());
                    }
                    if !parts.content.is_empty() {
                        delta.insert("content".into(), parts.content.into());
                    }
                    let empty = delta.is_empty();
                    (Value::Object(delta), empty)
                }
                Kind::Completion => (json!(message.text), message.text.is_empty()),
            };
            // A token's log-probabilities go out with it, even while its text is held back.
            let logprobs = match logprobs.as_mut().filter(|_| !message.logprobs.is_empty()) {
                None => Value::Null,
                Some(w) => match w.render(&message.logprobs) {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = send(error(e)).await;
                        break;
                    }
                },
            };
            let due = !empty || finish.is_some() || !logprobs.is_null();
            if due && send(meta.chunk(delta, finish, logprobs)).await.is_err() {
                return; // the client left: dropping `rx` stops the sequence
            }
            if finish.is_some() {
                if include_usage {
                    let _ = send(meta.usage_chunk(usage(&message))).await;
                }
                break;
            }
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    let stream = ReceiverStream::new(events).map(Ok::<_, std::convert::Infallible>);
    let mut response = Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    set_id(&mut response, &id);
    Ok(response)
}

/// Writes log-probabilities in the shape of each endpoint: chat's
/// `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`, completions'
/// `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}` (the
/// alternatives and the chosen token, as vLLM answers). Tokens are named by their text alone.
struct LogprobsWriter {
    codec: Arc<TextCodec>,
    kind: Kind,
    /// Characters of token text written so far (completions' `text_offset`).
    offset: usize,
}

impl LogprobsWriter {
    fn render(&mut self, tokens: &[TokenLogprobs]) -> Result<Value, ApiError> {
        let text = |id: u32| {
            self.codec
                .token_text(id)
                .map_err(|e| ApiError::from_status(&tonic::Status::internal(e.to_string())))
        };
        match self.kind {
            Kind::Chat => {
                let entry = |id: u32, logprob: f32| -> Result<Value, ApiError> {
                    let token = text(id)?;
                    Ok(json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()}))
                };
                let content = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(t.token_id, t.logprob)?;
                        let top = t
                            .top
                            .iter()
                            .map(|a| entry(a.token_id, a.logprob))
                            .collect::<Result<Vec<_>, _>>()?;
                        e["top_logprobs"] = top.into();
                        Ok(e)
                    })
                    .collect::<Result<Vec<_>, ApiError>>()?;
                Ok(json!({"content": content}))
            }
            Kind::Completion => {
                let (mut names, mut values, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
                for t in tokens {
                    let token = text(t.token_id)?;
                    let mut top = serde_json::Map::new();
                    for a in &t.top {
                        top.insert(text(a.token_id)?, a.logprob.into());
                    }
                    top.insert(token.clone(), t.logprob.into());
                    offsets.push(self.offset);
                    self.offset += token.chars().count();
                    names.push(token);
                    values.push(t.logprob);
                    tops.push(top);
                }
                Ok(json!({"tokens": names, "token_logprobs": values, "top_logprobs": tops,
                          "text_offset": offsets}))
            }
        }
    }
}

fn set_id(response: &mut Response, id: &str) {
    if let Ok(value) = header::HeaderValue::from_str(id) {
        response.headers_mut().insert(kubemoe_api::trace::REQUEST_ID_KEY, value);
    }
}

/// OpenAI's `finish_reason` of the last message, `None` before it.
fn finished(m: &GenerateResponse) -> Option<&'static str> {
    match FinishReason::try_from(m.finish_reason) {
        Ok(FinishReason::Stop) => Some("stop"),
        Ok(FinishReason::Length) => Some("length"),
        _ => None,
    }
}

fn usage(m: &GenerateResponse) -> Value {
    let u = m.usage.unwrap_or_default();
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.prompt_tokens + u.completion_tokens})
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What every object of one response carries.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    /// The chat template opened a `<think>` block ([`crate::reasoning`]).
    reasoning: bool,
}

impl Meta {
    fn whole(&self, text: &str, finish: &str, usage: Value, logprobs: Value) -> Value {
        let (object, mut choice) = match (self.kind, self.reasoning) {
            (Kind::Completion, _) => ("text_completion", json!({"index": 0, "text": text})),
            (Kind::Chat, false) => {
                ("chat.completion", json!({"index": 0, "message": {"role": "assistant", "content": text}}))
            }
            (Kind::Chat, true) => {
                let mut splitter = Splitter::new(true);
                let mut parts = splitter.push(text);
                parts.reasoning.push_str(&splitter.finish().reasoning);
                // No content until `</think>`, as vLLM's parser answers.
                let content = (!parts.content.is_empty() || !splitter.thinking()).then_some(parts.content);
                let message = json!({"role": "assistant", "content": content,
                                     "reasoning_content": parts.reasoning});
                ("chat.completion", json!({"index": 0, "message": message}))
            }
        };
        choice["finish_reason"] = finish.into();
        choice["logprobs"] = logprobs;
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": [choice], "usage": usage})
    }

    fn chunk(&self, delta: Value, finish: Option<&str>, logprobs: Value) -> Value {
        let (object, field) = match self.kind {
            Kind::Completion => ("text_completion", "text"),
            Kind::Chat => ("chat.completion.chunk", "delta"),
        };
        let choice = json!({"index": 0, field: delta, "finish_reason": finish, "logprobs": logprobs});
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": [choice]})
    }

    /// The last chunk with `stream_options.include_usage`: no choices, the usage.
    fn usage_chunk(&self, usage: Value) -> Value {
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": [], "usage": usage})
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tower_service::Service;

    #[tokio::test]
    async fn while_loading_the_api_asks_for_a_key_first_and_health_and_metrics_stay_open() {
        let keys = Some(Arc::new(kubemoe_api::auth::Keys::fixed("sk-test").unwrap()));
        let mut app = loading(|| (1 << 20, 4 << 20), keys);
        let mut get = |path: &str, key: Option<&str>| {
            let mut request = axum::http::Request::get(path);
            if let Some(key) = key {
                request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
            }
            app.call(request.body(axum::body::Body::empty()).unwrap())
        };
        assert_eq!(get("/v1/models", None).await.unwrap().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            get("/v1/chat/completions", Some("sk-other")).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
        let loading = get("/v1/models", Some("sk-test")).await.unwrap();
        assert_eq!(loading.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(loading.into_body(), 1 << 16).await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["message"], "loading weights: 1.0 of 4.0 MiB (25%)");
        assert_eq!(body["error"]["code"], Value::Null);
        assert_eq!(get("/health", None).await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(get("/metrics", None).await.unwrap().status(), StatusCode::OK);
    }
}
