//! A request as a client sends it to either of a router's APIs: the first byte picks a
//! `/v1/completions` body, a `/v1/chat/completions` body or a protobuf `GenerateRequest` (the
//! gRPC API), the rest is the body. It goes through every check the router makes before a
//! request is admitted ([`kubemoe_router::openai::request_of`], then
//! [`kubemoe_router::service::Admission::prepare`], which tokenises prompts and renders chat
//! messages through builtin:tiny's tokenizer and chat template). Admitted or refused with a
//! reason, never a panic.
#![no_main]

use kubemoe_router::openai::{request_of, Kind};
use kubemoe_router::service::{Admission, Unset};
use prost::Message;
use std::sync::OnceLock;

fn admission() -> &'static Admission {
    static ADMISSION: OnceLock<Admission> = OnceLock::new();
    ADMISSION.get_or_init(|| {
        let config = kubemoe_model::source::open("builtin:tiny", kubemoe_model::Experts::None)
            .expect("builtin:tiny")
            .config;
        let text = kubemoe_router::text::TextCodec::load("builtin:tiny", config.vocab_size)
            .expect("builtin:tiny's tokenizer")
            .map(std::sync::Arc::new);
        Admission {
            model_name: "builtin:tiny".into(),
            vocab_size: config.vocab_size,
            text,
            max_context: config.max_position_embeddings,
        }
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let [pick, body @ ..] = data else { return };
    let admission = admission();
    match pick % 3 {
        0 | 1 => {
            let kind = if pick % 3 == 0 { Kind::Completion } else { Kind::Chat };
            let unset = if kind == Kind::Chat { Unset::RestOfContext } else { Unset::Default };
            if let Ok((request, _)) = request_of(kind, body, "builtin:tiny", admission) {
                let _ = admission.prepare(request, unset);
            }
        }
        _ => {
            if let Ok(request) = kubemoe_api::inference::GenerateRequest::decode(body) {
                let _ = admission.prepare(request, Unset::Default);
            }
        }
    }
});
