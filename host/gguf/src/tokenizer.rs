//! A GGUF's vocabulary as Hugging Face tokenizer files (`tokenizer.json`,
//! `tokenizer_config.json`), which the guest's `tokenizers` reads.
//!
//! Byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) map one to one: the tokens, the
//! merges in rank order, control and user-defined tokens as added tokens, and the pre-tokenizer
//! llama.cpp names in `tokenizer.ggml.pre`. SentencePiece vocabularies (`"llama"`: Llama 2,
//! Gemma) become a BPE whose merges rank as llama.cpp merges them, by the merged token's score,
//! with byte fallback for characters the vocabulary lacks; spaces are `▁`, with one in front of
//! the text when `add_space_prefix` says so.

use std::collections::HashMap;

use serde_json::{json, Map, Value as Json};

use crate::{Gguf, GgufError, Value};

/// GGUF token types (llama.cpp's `llama_token_type`).
const NORMAL: u64 = 1;
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// Qwen2's pre-tokenizer split (llama.cpp's `qwen2`): Llama 3's with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's pre-tokenizer split (llama.cpp's `llama-bpe`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenization a vocabulary uses.
pub enum TokenizerModel {
    /// Byte-level BPE (`gpt2`): merges in rank order, and llama.cpp's pre-tokenizer name.
    ByteLevelBpe { merges: Vec<String>, pre: String },
    /// SentencePiece (`llama`): each token's score (merges prefer the highest-scoring result),
    /// and whether a space goes in front of the text.
    SentencePiece {
        scores: Vec<f32>,
        add_space_prefix: bool,
    },
}

/// The vocabulary and its special tokens, read from the metadata.
pub struct Vocabulary {
    pub tokens: Vec<String>,
    /// GGUF token types: 1 normal, 3 control, 4 user-defined.
    pub types: Vec<u64>,
    /// How text becomes tokens.
    pub model: TokenizerModel,
    pub bos: Option<u64>,
    pub eos: Option<u64>,
    pub pad: Option<u64>,
    pub unk: Option<u64>,
    /// End of turn and end of message (`tokenizer.ggml.eot_token_id`, `eom_token_id`): chat
    /// models stop on them as on EOS.
    pub eot: Option<u64>,
    pub eom: Option<u64>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

impl Vocabulary {
    pub fn read(file: &Gguf) -> Result<Vocabulary, GgufError> {
        let tokens = strings(file, "tokenizer.ggml.tokens")?;
        let model = match file.get_str("tokenizer.ggml.model")? {
            "gpt2" => TokenizerModel::ByteLevelBpe {
                merges: strings(file, "tokenizer.ggml.merges")?,
                pre: match file.get("tokenizer.ggml.pre") {
                    None => "default".into(),
                    Some(_) => file.get_str("tokenizer.ggml.pre")?.into(),
                },
            },
            "llama" => {
                let scores = floats(file, "tokenizer.ggml.scores")?;
                if scores.len() != tokens.len() {
                    return Err(GgufError::BadMetadata {
                        key: "tokenizer.ggml.scores".into(),
                        problem: format!("{} scores for {} tokens", scores.len(), tokens.len()),
                    });
                }
                TokenizerModel::SentencePiece {
                    scores,
                    // llama.cpp's default for SentencePiece vocabularies.
                    add_space_prefix: file
                        .get("tokenizer.ggml.add_space_prefix")
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                }
            }
            other => {
                return Err(GgufError::BadMetadata {
                    key: "tokenizer.ggml.model".into(),
                    problem: format!(
                        "'{other}' vocabularies are not supported (supported: gpt2, byte-level \
                         BPE; llama, SentencePiece)"
                    ),
                })
            }
        };
        let types = match file.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(_) => integers(file, "tokenizer.ggml.token_type")?,
        };
        if types.len() != tokens.len() {
            return Err(GgufError::BadMetadata {
                key: "tokenizer.ggml.token_type".into(),
                problem: format!("{} types for {} tokens", types.len(), tokens.len()),
            });
        }
        let id = |key: &str| -> Result<Option<u64>, GgufError> {
            match file.get(key) {
                None => Ok(None),
                Some(_) => {
                    let id = file.get_u64(key)?;
                    match (id as usize) < tokens.len() {
                        true => Ok(Some(id)),
                        false => Err(GgufError::BadMetadata {
                            key: key.into(),
                            problem: format!(
                                "token {id} is outside the vocabulary of {}",
                                tokens.len()
                            ),
                        }),
                    }
                }
            }
        };
        Ok(Vocabulary {
            model,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            eot: id("tokenizer.ggml.eot_token_id")?,
            eom: id("tokenizer.ggml.eom_token_id")?,
            add_bos: file
                .get("tokenizer.ggml.add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            chat_template: file
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(String::from),
            tokens,
            types,
        })
    }

    /// Control and user-defined tokens: matched whole, before the BPE runs.
    fn specials(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.tokens.len()).filter(|&i| matches!(self.types[i], CONTROL | USER_DEFINED))
    }

    fn token(&self, id: Option<u64>) -> Json {
        id.map_or(Json::Null, |i| {
            Json::String(self.tokens[i as usize].clone())
        })
    }

    /// `tokenizer.json`.
    pub fn tokenizer_json(&self) -> Result<Json, GgufError> {
        let added: Vec<Json> = self
            .specials()
            .map(|i| {
                json!({"id": i, "content": self.tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": self.types[i] == CONTROL})
            })
            .collect();
        let vocab: Map<String, Json> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let (normalizer, pre_tokenizer, post_processor, decoder, model) = match &self.model {
            TokenizerModel::ByteLevelBpe { merges, pre } => (
                Json::Null,
                pre_tokenizer(pre)?,
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}),
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
                json!({
                    "type": "BPE",
                    "dropout": null,
                    "unk_token": null,
                    "continuing_subword_prefix": null,
                    "end_of_word_suffix": null,
                    "fuse_unk": false,
                    "byte_fallback": false,
                    "ignore_merges": false,
                    "vocab": vocab,
                    "merges": merges,
                }),
            ),
            TokenizerModel::SentencePiece {
                scores,
                add_space_prefix,
            } => {
                // Spaces become `▁`; llama.cpp puts one in front of every stretch of text between
                // special tokens (the start counts as one), even one that starts with a space:
                // a normalizer, which runs on each stretch that added tokens leave, does that.
                let replace =
                    json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
                let normalizer = if *add_space_prefix {
                    json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
                } else {
                    replace
                };
                let mut decoders = vec![
                    json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if *add_space_prefix {
                    decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                (
                    normalizer,
                    Json::Null,
                    Json::Null,
                    json!({"type": "Sequence", "decoders": decoders}),
                    json!({
                        "type": "BPE",
                        "dropout": null,
                        "unk_token": self.token(self.unk),
                        "continuing_subword_prefix": null,
                        "end_of_word_suffix": null,
                        "fuse_unk": true,
                        "byte_fallback": true,
                        "ignore_merges": false,
                        "vocab": vocab,
                        "merges": self.spm_merges(scores),
                    }),
                )
            }
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": decoder,
            "model": model,
        }))
    }

    /// A SentencePiece vocabulary's merges, in the order llama.cpp applies them: every split of a
    /// normal token into two normal tokens, ranked by the merged token's score (highest first),
    /// then by its id, then by where it splits. Written as `"left right"` strings unless a token
    /// holds a space: `tokenizers` reads a pair form with twice the strings, and Gemma's 513k
    /// merges then took 390 MB to load instead of 190 (in wasm, memory that is never returned).
    fn spm_merges(&self, scores: &[f32]) -> Json {
        let merges = self.spm_merge_pairs(scores);
        if merges.iter().flatten().any(|t| t.contains(' ')) {
            return json!(merges);
        }
        json!(merges
            .iter()
            .map(|[l, r]| format!("{l} {r}"))
            .collect::<Vec<_>>())
    }

    fn spm_merge_pairs(&self, scores: &[f32]) -> Vec<[String; 2]> {
        let normal = |i: usize| self.types[i] == NORMAL;
        let ids: HashMap<&str, usize> = (0..self.tokens.len())
            .filter(|&i| normal(i))
            .map(|i| (self.tokens[i].as_str(), i))
            .collect();
        let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
        for (&text, &id) in &ids {
            for (at, _) in text.char_indices().skip(1) {
                let (left, right) = text.split_at(at);
                if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                    merges.push((scores[id], id, l, r));
                }
            }
        }
        merges.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then(a.1.cmp(&b.1))
                .then(self.tokens[a.2].len().cmp(&self.tokens[b.2].len()))
        });
        merges
            .into_iter()
            .map(|(_, _, l, r)| [self.tokens[l].clone(), self.tokens[r].clone()])
            .collect()
    }

    /// `tokenizer_config.json`, with the model's context length and chat template.
    pub fn tokenizer_config(&self, context: u64) -> Json {
        let decoder: Map<String, Json> = self
            .specials()
            .map(|i| {
                let entry = json!({"content": self.tokens[i], "special": self.types[i] == CONTROL, "normalized": false,
                                   "lstrip": false, "rstrip": false, "single_word": false});
                (i.to_string(), entry)
            })
            .collect();
        let control: Vec<&str> = self
            .specials()
            .filter(|&i| self.types[i] == CONTROL)
            .map(|i| &*self.tokens[i])
            .collect();
        let class = match self.model {
            TokenizerModel::ByteLevelBpe { .. } => "GPT2Tokenizer",
            TokenizerModel::SentencePiece { .. } => "LlamaTokenizer",
        };
        json!({
            "tokenizer_class": class,
            "model_max_length": context,
            "add_bos_token": self.add_bos,
            "add_prefix_space": false,
            "clean_up_tokenization_spaces": false,
            "bos_token": self.token(self.bos),
            "eos_token": self.token(self.eos),
            "pad_token": self.token(self.pad),
            "unk_token": self.token(self.unk),
            "additional_special_tokens": control,
            "added_tokens_decoder": decoder,
            "chat_template": self.chat_template,
        })
    }

    /// The ids that end a generation: the declared EOS, end of turn and end of message, and an
    /// end-of-text control token when the vocabulary has one (chat models end turns with it).
    pub fn eos_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = Vec::new();
        for id in [self.eos, self.eot, self.eom].into_iter().flatten() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        for i in self.specials() {
            let end = matches!(
                &*self.tokens[i],
                "<|endoftext|>" | "<|eot_id|>" | "<|end_of_text|>" | "<end_of_turn>"
            );
            if end && !ids.contains(&(i as u64)) {
                ids.push(i as u64);
            }
        }
        ids
    }
}

/// The Hugging Face pre-tokenizer equal to llama.cpp's of this name.
fn pre_tokenizer(pre: &str) -> Result<Json, GgufError> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    Ok(match pre {
        // Every digit alone, then GPT-2's split.
        "smollm" => {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]})
        }
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]}),
        other => {
            return Err(GgufError::BadMetadata {
                key: "tokenizer.ggml.pre".into(),
                problem: format!(
                "pre-tokenizer '{other}' is not supported (supported: smollm, gpt-2, llama-bpe, qwen2)"
            ),
            })
        }
    })
}

fn array<'a>(file: &'a Gguf, key: &str) -> Result<&'a [Value], GgufError> {
    let value = file.get(key).ok_or_else(|| GgufError::BadMetadata {
        key: key.into(),
        problem: "missing".into(),
    })?;
    value.as_array().ok_or_else(|| GgufError::BadMetadata {
        key: key.into(),
        problem: format!("is a {}, not an array", value.type_name()),
    })
}

/// The array `key`, each value converted by `convert`; `kind` names what it must hold.
fn values<T>(
    file: &Gguf,
    key: &str,
    convert: impl Fn(&Value) -> Option<T>,
    kind: &str,
) -> Result<Vec<T>, GgufError> {
    array(file, key)?
        .iter()
        .map(convert)
        .collect::<Option<_>>()
        .ok_or_else(|| GgufError::BadMetadata {
            key: key.into(),
            problem: format!("holds values that are not {kind}"),
        })
}

fn strings(file: &Gguf, key: &str) -> Result<Vec<String>, GgufError> {
    values(file, key, |v| v.as_str().map(String::from), "strings")
}

fn floats(file: &Gguf, key: &str) -> Result<Vec<f32>, GgufError> {
    values(file, key, Value::as_f32, "numbers")
}

fn integers(file: &Gguf, key: &str) -> Result<Vec<u64>, GgufError> {
    values(file, key, Value::as_u64, "integers")
}
