//! Constrained decoding: the output matches a JSON Schema, a regular expression or a Lark
//! grammar because, at every step, the tokens that cannot continue it are masked out before
//! sampling (llguidance's Earley parser over the model's token trie).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// What the output must match (the WIT `options.format`).
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this JSON Schema (JSON text).
    JsonSchema(String),
    /// Text matching this regular expression, whole.
    Regex(String),
    /// Text matching this Lark grammar (llguidance's dialect: `start` is the start rule).
    Lark(String),
}

/// How generated JSON is laid out, unless the schema says otherwise (an `x-guidance` key): as
/// the model likes (models are trained on pretty-printed JSON, and forcing another layout
/// worsens what they write), but at most 64 whitespace characters between two tokens of JSON,
/// so a model cannot loop on newlines.
pub(crate) fn json_layout() -> Value {
    json!({ "whitespace_pattern": r"[\x20\x0A\x0D\x09]{1,64}" })
}

/// The per-model half: the token trie, built once per model (tens of milliseconds).
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// `eos` is the token that ends a constrained output (the model's first end-of-sequence id).
    pub fn new(tokenizer: &Tokenizer, vocab_size: u32, eos: u32) -> Result<Self> {
        // Special tokens are marked with a leading 0xFF, as the trie expects: a grammar never
        // spells them out of text.
        let words: Vec<Vec<u8>> = (0..vocab_size)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id);
                if tokenizer.is_special(id) {
                    [&[0xFF][..], &bytes].concat()
                } else {
                    bytes
                }
            })
            .collect();
        let trie = TokTrie::from(&TokRxInfo::new(vocab_size, eos), &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| Error::model(format!("cannot set up constrained decoding: {e}")))?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// Compile a format for one generation. A bad schema, regex or grammar is an invalid option.
    pub fn compile(&self, format: &Format) -> Result<Constraint> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            Error::invalid_option("format", format!("invalid {what}: {e}"))
        };
        let grammar = match format {
            Format::JsonObject => {
                TopLevelGrammar::from_json_schema(with_layout(json!({"type": "object"})))
            }
            Format::JsonSchema(text) => {
                let schema: Value =
                    serde_json::from_str(text).map_err(|e| bad("JSON schema (not JSON)", &e))?;
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(Error::invalid_option(
                        "format",
                        "invalid JSON schema: it must be a JSON object",
                    ));
                }
                TopLevelGrammar::from_json_schema(with_layout(schema))
            }
            Format::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Format::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        };
        let what = match format {
            Format::JsonObject | Format::JsonSchema(_) => "JSON schema",
            Format::Regex(_) => "regular expression",
            Format::Lark(_) => "Lark grammar",
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| bad(what, &e))?;
        Ok(Constraint {
            matcher: Matcher::new(Ok(parser)),
        })
    }
}

fn with_layout(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        if !map.contains_key("x-guidance") {
            map.insert("x-guidance".into(), json_layout());
        }
    }
    schema
}

/// One generation's parser state.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Set the logits of the tokens the format does not allow next to -inf. When the format
    /// allows the output to end here, every id in `eos_ids` stays allowed.
    pub fn mask(&mut self, logits: &mut [f32], eos_ids: &[u32]) -> Result<()> {
        let allowed: SimpleVob = self.matcher.compute_mask_or_eos().map_err(fail)?;
        let ends = eos_ids.iter().any(|&id| allowed.is_allowed(id));
        for (id, logit) in logits.iter_mut().enumerate() {
            let id = id as u32;
            let ok = if eos_ids.contains(&id) {
                ends
            } else {
                id < allowed.len() as u32 && allowed.is_allowed(id)
            };
            if !ok {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// A token was chosen (not an end-of-sequence token).
    pub fn advance(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(fail)
    }

    /// The format is complete and nothing may follow: generation ends here.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}

fn fail(e: impl std::fmt::Display) -> Error {
    Error::backend(format!("constrained decoding failed: {e}"))
}
