//! A client of the inference API: `kubemoe generate`.

use crate::{Error, Result};
use kubemoe_api::inference::inference_client::InferenceClient;
use kubemoe_api::inference::{FinishReason, GenerateRequest};
use std::io::Write;

/// `request` carrying `authorization: Bearer <api_key>` when a key is given ([`kubemoe_api::auth`]).
pub fn authorized<T>(request: T, api_key: Option<&str>) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(request);
    if let Some(key) = api_key {
        let value = format!("Bearer {key}")
            .parse()
            .map_err(|_| Error::Text("the API key holds characters a header cannot carry".into()))?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

/// Streams one completion from the router at `endpoint` (over TLS when `tls` is given),
/// writing its text to `out` as it arrives; returns a summary line (finish reason, token
/// counts and ids), then one line per token with its log-probability and alternatives when
/// the request asked for them.
pub async fn stream(
    endpoint: &str,
    tls: Option<&kubemoe_api::tls::Client>,
    request: GenerateRequest,
    api_key: Option<&str>,
    out: &mut impl Write,
) -> Result<String> {
    let channel = kubemoe_api::channel(endpoint, tls)
        .map_err(|source| Error::Connect { endpoint: endpoint.to_string(), source })?;
    let mut client = InferenceClient::new(channel).max_decoding_message_size(kubemoe_api::MAX_MESSAGE_BYTES);
    let request = authorized(request, api_key)?;
    let mut stream = client.generate_stream(request).await.map_err(Error::Call)?.into_inner();
    let mut ids: Vec<u32> = Vec::new();
    let mut summary = String::new();
    let mut logprobs = String::new();
    while let Some(m) = stream.message().await.map_err(Error::Call)? {
        ids.extend(&m.token_ids);
        for t in &m.logprobs {
            let top: Vec<String> = t.top.iter().map(|a| format!("{} {:.4}", a.token_id, a.logprob)).collect();
            logprobs.push_str(&format!(
                "\n  token {} logprob {:.4}; top: {}",
                t.token_id,
                t.logprob,
                top.join(", ")
            ));
        }
        write!(out, "{}", m.text).and_then(|()| out.flush()).map_err(Error::Output)?;
        if let Some(u) = m.usage {
            let reason = FinishReason::try_from(m.finish_reason).map(|r| r.as_str_name()).unwrap_or("?");
            summary = format!(
                "[{reason}; {} prompt + {} completion tokens; ids {ids:?}]",
                u.prompt_tokens, u.completion_tokens
            );
        }
    }
    Ok(summary + &logprobs)
}
