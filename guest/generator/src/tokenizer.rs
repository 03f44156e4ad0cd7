//! The model's tokenizer (Hugging Face `tokenizer.json`, via the `tokenizers` crate): encoding
//! with or without special-token parsing, and decoding.

use std::cell::OnceCell;
use std::ops::Range;

use crate::detok::Decode;
use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// A copy that reads special-token text as plain text; made when first needed.
    plain: OnceCell<tokenizers::Tokenizer>,
    /// Ids of the special added tokens (`"special": true`), sorted.
    special: Vec<u32>,
}

fn model_error(e: impl std::fmt::Display) -> Error {
    Error::model(format!("tokenizer: {e}"))
}

impl Tokenizer {
    pub fn from_bytes(json: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| Error::model(format!("tokenizer.json: {e}")))?;
        let mut special: Vec<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        special.sort_unstable();
        Ok(Tokenizer {
            inner,
            plain: OnceCell::new(),
            special,
        })
    }

    /// Token ids of `text`: no special tokens added (no BOS, no post-processor template);
    /// text that spells a special token becomes that token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(model_error)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with special-token text read as plain text ("<|im_start|>" becomes
    /// the tokens of its characters). Non-special added tokens are still recognised.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let plain = self.plain.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        });
        let enc = plain.encode(text, false).map_err(model_error)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` where special-token text inside the byte ranges `plain` is read as
    /// plain text, and everywhere else (as [`Tokenizer::encode`]) becomes the special token.
    ///
    /// `text` is tokenized whole; only the stretches between two special tokens kept as such
    /// that hold one found inside `plain` are tokenized again, as plain text. So when `plain`
    /// spells no special token, the ids are exactly those of [`Tokenizer::encode`].
    pub fn encode_with_plain(&self, text: &str, plain: &[Range<usize>]) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(model_error)?;
        let (ids, offsets) = (enc.get_ids(), enc.get_offsets());
        // A special token is forged when any non-space character of its match (which may take
        // in neighbouring spaces: lstrip/rstrip) lies in a plain range.
        let forged = |k: usize| {
            self.is_special(ids[k])
                && plain.iter().any(|r| {
                    let (start, end) = (r.start.max(offsets[k].0), r.end.min(offsets[k].1));
                    start < end
                        && text
                            .get(start..end)
                            .is_none_or(|s| s.chars().any(|c| !c.is_whitespace()))
                })
        };
        if !(0..ids.len()).any(&forged) {
            return Ok(ids.to_vec());
        }
        let mut out = Vec::with_capacity(ids.len());
        // The stretch since the last special token kept: its first token and first byte.
        let (mut first_token, mut first_byte) = (0, 0);
        let mut has_forged = false;
        for k in 0..=ids.len() {
            let kept = k == ids.len() || (self.is_special(ids[k]) && !forged(k));
            if !kept {
                has_forged |= forged(k);
                continue;
            }
            let end_byte = if k == ids.len() {
                text.len()
            } else {
                offsets[k].0
            };
            if has_forged {
                let stretch = text
                    .get(first_byte..end_byte)
                    .ok_or_else(|| model_error("token offsets off character boundaries"))?;
                out.extend(self.encode_plain(stretch)?);
            } else {
                out.extend_from_slice(&ids[first_token..k]);
            }
            if k < ids.len() {
                out.push(ids[k]);
                (first_token, first_byte) = (k + 1, offsets[k].1);
            }
            has_forged = false;
        }
        Ok(out)
    }

    /// Whether `id` is a special added token (such as "<|im_start|>").
    pub fn is_special(&self, id: u32) -> bool {
        self.special.binary_search(&id).is_ok()
    }

    /// Whether `text`, tokenized with special-token parsing, holds a special token.
    pub fn spells_special(&self, text: &str) -> Result<bool> {
        Ok(self.encode(text)?.iter().any(|&id| self.is_special(id)))
    }

    /// Text of `ids`; `skip_special` drops special tokens.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(model_error)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> u32 {
        self.inner.get_vocab_size(true) as u32
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

impl Decode for Tokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, true)
    }
}
