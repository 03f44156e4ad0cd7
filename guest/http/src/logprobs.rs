//! Log probabilities in OpenAI's shapes: chat's `logprobs: {content: [...], refusal}` and text
//! completions' `logprobs: {tokens, token_logprobs, top_logprobs, text_offset}`, for a whole
//! response or one streamed chunk (the tokens of that chunk).

use serde_json::{json, Map, Value};

use crate::bindings::edge::slm::types::{GeneratedToken, TokenLogprob};

/// JSON has no -inf: OpenAI writes such log probabilities as -9999.0.
const FLOOR: f32 = -9999.0;

fn logprob(x: f32) -> f32 {
    if x.is_nan() || x < FLOOR {
        FLOOR
    } else {
        x
    }
}

/// A token's text: its bytes, lossily (a token holding part of a UTF-8 character shows U+FFFD;
/// chat's `bytes` keeps the bytes).
fn text(t: &TokenLogprob) -> String {
    String::from_utf8_lossy(&t.bytes).into_owned()
}

/// `{token, logprob, bytes}`.
fn chat_entry(t: &TokenLogprob) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("token".into(), json!(text(t)));
    m.insert("logprob".into(), json!(logprob(t.logprob)));
    m.insert("bytes".into(), json!(t.bytes));
    m
}

/// Chat's `logprobs`: `content`, one entry per token with its `top_logprobs`.
pub fn chat(tokens: &[GeneratedToken]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut m = chat_entry(&t.chosen);
            let top: Vec<Value> = t.top.iter().map(|a| Value::Object(chat_entry(a))).collect();
            m.insert("top_logprobs".into(), Value::Array(top));
            Value::Object(m)
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Character offsets of byte offsets into a text that only grows, for offsets that never
/// decrease (a cursor, so a long response costs one pass).
#[derive(Default)]
pub struct Offsets {
    byte: usize,
    chars: usize,
}

impl Offsets {
    /// The number of characters of `text` before byte `offset` (rounded down to a character
    /// boundary; at most the whole text).
    pub fn chars(&mut self, text: &str, offset: usize) -> usize {
        let mut end = offset.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        if end > self.byte {
            self.chars += text[self.byte..end].chars().count();
            self.byte = end;
        }
        self.chars
    }
}

/// Completions' `logprobs` for `tokens`, whose text offsets are into `text` (the generated
/// text so far). `top_logprobs` maps each alternative's text to its log probability, the
/// chosen token included (so up to n + 1 entries, as OpenAI documents).
pub fn completion(tokens: &[GeneratedToken], text_so_far: &str, offsets: &mut Offsets) -> Value {
    let mut texts = vec![];
    let mut logprobs = vec![];
    let mut tops = vec![];
    let mut text_offset = vec![];
    for t in tokens {
        texts.push(json!(text(&t.chosen)));
        logprobs.push(json!(logprob(t.chosen.logprob)));
        let mut top = Map::new();
        for a in t.top.iter().chain(std::iter::once(&t.chosen)) {
            top.entry(text(a))
                .or_insert_with(|| json!(logprob(a.logprob)));
        }
        tops.push(Value::Object(top));
        text_offset.push(json!(offsets.chars(text_so_far, t.text_offset as usize)));
    }
    json!({
        "tokens": texts,
        "token_logprobs": logprobs,
        "top_logprobs": tops,
        "text_offset": text_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: u32, bytes: &[u8], lp: f32) -> TokenLogprob {
        TokenLogprob {
            token: id,
            bytes: bytes.to_vec(),
            logprob: lp,
        }
    }

    fn generated(chosen: TokenLogprob, offset: u32, top: Vec<TokenLogprob>) -> GeneratedToken {
        GeneratedToken {
            chosen,
            text_offset: offset,
            top,
        }
    }

    #[test]
    fn chat_shape() {
        let v = chat(&[generated(
            token(3, &[0xC3], -0.5),
            0,
            vec![token(3, &[0xC3], -0.5), token(9, b" a", f32::NEG_INFINITY)],
        )]);
        assert_eq!(
            v,
            json!({"content": [{"token": "\u{FFFD}", "logprob": -0.5, "bytes": [0xC3],
                "top_logprobs": [{"token": "\u{FFFD}", "logprob": -0.5, "bytes": [0xC3]},
                                 {"token": " a", "logprob": -9999.0, "bytes": [32, 97]}]}],
                "refusal": null})
        );
        assert_eq!(chat(&[]), json!({"content": [], "refusal": null}));
    }

    #[test]
    fn completion_shape_and_character_offsets() {
        // "é" (2 bytes) then " a": the second token starts at byte 2, character 1.
        let text = "é a";
        let tokens = [
            generated(token(1, "é".as_bytes(), -0.25), 0, vec![]),
            generated(
                token(2, b" a", -2.0),
                2,
                vec![token(5, b"b", -1.0), token(6, b"c", -1.5)],
            ),
        ];
        let v = completion(&tokens, text, &mut Offsets::default());
        assert_eq!(
            v,
            json!({"tokens": ["é", " a"], "token_logprobs": [-0.25, -2.0],
                "top_logprobs": [{"é": -0.25}, {"b": -1.0, "c": -1.5, " a": -2.0}],
                "text_offset": [0, 1]})
        );
        // In chunks: the cursor carries over.
        let mut o = Offsets::default();
        let first = completion(&tokens[..1], "é", &mut o);
        let second = completion(&tokens[1..], text, &mut o);
        assert_eq!(first["text_offset"], json!([0]));
        assert_eq!(second["text_offset"], json!([1]));
        assert_eq!(o.chars("é a", 99), 3);
    }
}
