//! Text in and out: the model's `tokenizer.json` (Hugging Face `tokenizers`), its chat
//! template (`tokenizer_config.json`, rendered with minijinja as transformers does with
//! Jinja2), incremental detokenisation and stop strings.

use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;
use tokenizers::Tokenizer;

pub struct TextCodec {
    tokenizer: Tokenizer,
    /// Twice the longest token of the vocabulary in bytes of its stored form, which covers at
    /// least as many bytes of text in byte-level, metaspace, byte-fallback and WordPiece
    /// vocabularies (doubled for normalisers that shrink text): no prompt of B bytes is fewer
    /// than B / `bytes_per_token` tokens.
    bytes_per_token: usize,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
}

/// A chat turn.
#[derive(serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

fn special(config: &Value, key: &str) -> String {
    match &config[key] {
        Value::String(s) => s.clone(),
        Value::Object(o) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl TextCodec {
    /// The tokenizer of `model` (a directory or `builtin:<preset>`), or `None` when the
    /// directory has no `tokenizer.json`.
    pub fn load(model: &str, vocab_size: usize) -> Result<Option<Self>> {
        let (tokenizer_json, config) = if model.starts_with("builtin:") {
            let t = kubemoe_model::synth::tokenizer_json(vocab_size).to_string();
            (t, kubemoe_model::synth::tokenizer_config_json())
        } else {
            let dir = Path::new(model);
            let path = dir.join("tokenizer.json");
            if !path.exists() {
                return Ok(None);
            }
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|e| Error::Text(format!("{}: {e}", p.display())))
            };
            let config_path = dir.join("tokenizer_config.json");
            let config = if config_path.exists() {
                serde_json::from_str(&read(&config_path)?)
                    .map_err(|e| Error::Text(format!("{}: {e}", config_path.display())))?
            } else {
                Value::Null
            };
            (read(&path)?, config)
        };
        let tokenizer = Tokenizer::from_bytes(tokenizer_json.as_bytes())
            .map_err(|e| Error::Text(format!("{model}/tokenizer.json: {e}")))?;
        let chat_template = match &config["chat_template"] {
            Value::String(s) => Some(s.clone()),
            // A list of named templates: the default one.
            Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(String::from),
            _ => None,
        };
        let longest = tokenizer.get_vocab(true).keys().map(String::len).max().unwrap_or(1);
        Ok(Some(Self {
            tokenizer,
            bytes_per_token: 2 * longest.max(1),
            chat_template,
            bos_token: special(&config, "bos_token"),
            eos_token: special(&config, "eos_token"),
        }))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Fewest tokens `bytes` of text can encode to: a prompt that cannot fit the context is
    /// refused before it is tokenised (tokenising megabytes costs seconds and gigabytes).
    pub fn min_tokens(&self, bytes: usize) -> usize {
        bytes / self.bytes_per_token
    }

    /// Token ids of `text` (special tokens written in the text are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, false).map_err(|e| Error::Text(e.to_string()))?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| Error::Text(e.to_string()))
    }

    /// One token alone as text, special tokens written out (log-probabilities name tokens so).
    pub fn token_text(&self, id: u32) -> Result<String> {
        self.tokenizer.decode(&[id], false).map_err(|e| Error::Text(e.to_string()))
    }

    /// The prompt text of `messages` under the model's chat template, ready for an answer.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Text("the model has no chat_template in tokenizer_config.json".into()))?;
        let mut env = minijinja::Environment::new();
        env.add_template("chat", template).map_err(|e| Error::Text(format!("chat_template: {e}")))?;
        let ctx = minijinja::context! {
            messages => messages,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            add_generation_prompt => true,
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| Error::Text(format!("chat_template: {e}")))
    }
}

/// Turns a growing list of generated ids into text increments, holding back an incomplete
/// UTF-8 character and any suffix that could still become a stop string.
pub struct Detokenizer {
    ids: Vec<u32>,
    emitted: usize,
    stop: Vec<String>,
}

/// What the next token added.
#[derive(Debug, PartialEq, Eq)]
pub struct Delta {
    pub text: String,
    /// A stop string was found; `text` ends where it began.
    pub stopped: bool,
}

impl Detokenizer {
    pub fn new(stop: Vec<String>) -> Self {
        Self { ids: Vec::new(), emitted: 0, stop }
    }

    pub fn push(&mut self, codec: &TextCodec, id: u32) -> Result<Delta> {
        self.ids.push(id);
        let full = codec.decode(&self.ids)?;
        let tail = full.get(self.emitted..).unwrap_or_default();
        if let Some(at) = self.stop.iter().filter_map(|s| tail.find(s.as_str())).min() {
            let text = tail[..at].to_string();
            self.emitted += at;
            return Ok(Delta { text, stopped: true });
        }
        // Hold back a trailing replacement character (a split multi-byte character) and the
        // longest suffix that could still grow into a stop string.
        let end = full.trim_end_matches('\u{FFFD}').len();
        let mut safe = end;
        for s in &self.stop {
            let partial = (1..s.len())
                .rev()
                .filter(|c| s.is_char_boundary(*c))
                .find(|c| full[..end].ends_with(&s[..*c]));
            if let Some(cut) = partial {
                safe = safe.min(end - cut);
            }
        }
        let safe = safe.max(self.emitted);
        let text = full.get(self.emitted..safe).unwrap_or_default().to_string();
        self.emitted = safe;
        Ok(Delta { text, stopped: false })
    }

    /// Whatever was held back, at the end of the sequence.
    pub fn flush(&mut self, codec: &TextCodec) -> Result<String> {
        let full = codec.decode(&self.ids)?;
        let text = full.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = full.len();
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> TextCodec {
        TextCodec::load("builtin:tiny", 512).unwrap().unwrap()
    }

    #[test]
    fn text_round_trips_and_chat_renders() {
        let c = codec();
        let ids = c.encode("Hello, wörld").unwrap();
        assert_eq!(c.decode(&ids).unwrap(), "Hello, wörld");
        let prompt = c.render_chat(&[Message { role: "user".into(), content: "hi".into() }]).unwrap();
        assert_eq!(prompt, "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>");
        assert_eq!(c.encode(&prompt).unwrap()[0], 0, "the BOS special token is recognised");
    }

    #[test]
    fn detokenizer_holds_back_stop_prefixes_and_split_characters() {
        let c = codec();
        let ids = c.encode("ab END cd").unwrap();
        let mut d = Detokenizer::new(vec![" END".into()]);
        let mut out = String::new();
        let mut stopped = false;
        for id in ids {
            let delta = d.push(&c, id).unwrap();
            out.push_str(&delta.text);
            if delta.stopped {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(out, "ab");
        // "ö" is two bytes, two tokens: nothing is emitted after the first.
        let ids = c.encode("ö").unwrap();
        assert_eq!(ids.len(), 2);
        let mut d = Detokenizer::new(vec![]);
        assert_eq!(d.push(&c, ids[0]).unwrap().text, "");
        assert_eq!(d.push(&c, ids[1]).unwrap().text, "ö");
    }
}
