//! Reasoning output of DeepSeek-R1 and its distills: when the chat template opens a `<think>`
//! block in the generation prompt, the answer is the reasoning up to `</think>`, then the
//! content. The OpenAI API returns them apart (`reasoning_content` and `content`), as
//! DeepSeek's own API and vLLM's `deepseek_r1` parser do; without `</think>` everything
//! generated is reasoning. Pure: text in, the two parts out, in whole responses and in stream
//! deltas alike (a `</think>` split across deltas is held back until it is known).

/// Where the prompt leaves the model: `true` when the rendered chat prompt ends inside an
/// opened `<think>` block.
pub fn opens_reasoning(prompt: &str) -> bool {
    prompt.trim_end().ends_with("<think>")
}

const END: &str = "</think>";

/// Splits generated text into reasoning and content as it arrives.
#[derive(Debug, Default)]
pub struct Splitter {
    thinking: bool,
    /// A tail of the reasoning that may be the start of `</think>`.
    held: String,
}

/// The parts of some generated text.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parts {
    pub reasoning: String,
    pub content: String,
}

impl Splitter {
    /// `thinking`: the prompt opened a `<think>` block ([`opens_reasoning`]).
    pub fn new(thinking: bool) -> Self {
        Splitter { thinking, held: String::new() }
    }

    /// The parts of the next piece of text.
    pub fn push(&mut self, text: &str) -> Parts {
        if !self.thinking {
            return Parts { reasoning: String::new(), content: text.to_string() };
        }
        let buf = std::mem::take(&mut self.held) + text;
        if let Some(at) = buf.find(END) {
            self.thinking = false;
            return Parts { reasoning: buf[..at].to_string(), content: buf[at + END.len()..].to_string() };
        }
        // Hold back the longest tail that could still become `</think>`.
        let hold = (1..END.len()).rev().find(|&n| buf.ends_with(&END[..n])).unwrap_or(0);
        self.held = buf[buf.len() - hold..].to_string();
        Parts { reasoning: buf[..buf.len() - hold].to_string(), content: String::new() }
    }

    /// What is still held back, once the answer is over.
    pub fn finish(&mut self) -> Parts {
        Parts { reasoning: std::mem::take(&mut self.held), content: String::new() }
    }

    /// Whether the text so far is still reasoning.
    pub fn thinking(&self) -> bool {
        self.thinking
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(opened: bool, chunks: &[&str]) -> (String, String) {
        let mut s = Splitter::new(opened);
        let mut all = Parts::default();
        let mut parts: Vec<Parts> = chunks.iter().map(|c| s.push(c)).collect();
        parts.push(s.finish());
        for part in parts {
            all.reasoning.push_str(&part.reasoning);
            all.content.push_str(&part.content);
        }
        (all.reasoning, all.content)
    }

    #[test]
    fn reasoning_and_content_split_at_the_end_tag_however_it_is_chunked() {
        let text = "Let me think.\n</think>\n\nThe answer is 4.";
        let want = ("Let me think.\n".to_string(), "\n\nThe answer is 4.".to_string());
        assert_eq!(split(true, &[text]), want);
        // Every split of the text into two chunks, the tag cut anywhere.
        for cut in 1..text.len() {
            assert_eq!(split(true, &[&text[..cut], &text[cut..]]), want, "cut at {cut}");
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        assert_eq!(split(true, &chars.iter().map(String::as_str).collect::<Vec<_>>()), want);
    }

    #[test]
    fn without_the_end_tag_everything_is_reasoning_and_without_the_open_tag_content() {
        assert_eq!(split(true, &["still thinking </thi"]), ("still thinking </thi".into(), String::new()));
        assert_eq!(split(false, &["plain </think> answer"]), (String::new(), "plain </think> answer".into()));
        assert!(opens_reasoning("<|Assistant|><think>\n"));
        assert!(!opens_reasoning("<|Assistant|>"));
    }

    #[test]
    fn a_held_tail_that_was_not_the_tag_is_released() {
        let mut s = Splitter::new(true);
        assert_eq!(s.push("a </t").reasoning, "a ");
        assert_eq!(s.push("able").reasoning, "</table");
        assert!(s.thinking());
    }
}
