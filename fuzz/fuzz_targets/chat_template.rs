//! Chat messages from a hostile client through builtin:tiny's chat template (minijinja) and
//! tokenizer: NUL-separated role and content strings, any text in either (template syntax,
//! unknown roles, roles out of order, empty messages). Rendered or refused with a reason,
//! never a panic.
#![no_main]

use kubemoe_router::text::{Message, TextCodec};
use std::sync::OnceLock;

fn codec() -> &'static TextCodec {
    static CODEC: OnceLock<TextCodec> = OnceLock::new();
    CODEC.get_or_init(|| {
        let config = kubemoe_model::source::open("builtin:tiny", kubemoe_model::Experts::None)
            .expect("builtin:tiny")
            .config;
        TextCodec::load("builtin:tiny", config.vocab_size).expect("tokenizer").expect("builtin:tiny has one")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parts: Vec<&str> = text.split('\0').collect();
    let messages: Vec<Message> = parts
        .chunks(2)
        .map(|pair| Message { role: pair[0].to_string(), content: pair.get(1).unwrap_or(&"").to_string() })
        .collect();
    if let Ok(rendered) = codec().render_chat(&messages) {
        let _ = codec().encode(&rendered);
    }
});
