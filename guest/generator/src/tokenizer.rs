//! The model's tokenizer (Hugging Face `tokenizer.json`, via the `tokenizers` crate): encoding
//! with or without special-token parsing, decoding, the bytes one token stands for, and how many
//! bytes of text one token can stand for at most (so a prompt far too long is refused before it
//! is tokenized).

use std::cell::OnceCell;
use std::ops::Range;

use serde_json::Value as Json;
use tokenizers::Model;

use crate::tokenizer_file::Inner;

use crate::detok::Decode;
use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: Inner,
    /// A copy that reads special-token text as plain text; made when first needed.
    plain: OnceCell<Inner>,
    /// Ids of the special added tokens (`"special": true`), sorted.
    special: Vec<u32>,
    /// The content of every added token, by id.
    added: std::collections::HashMap<u32, String>,
    /// How the decoder turns one vocabulary entry into bytes.
    token_text: Vec<Step>,
    size_bound: Option<SizeBound>,
}

/// One step of a decoder, applied to a single token's vocabulary entry (see
/// [`Tokenizer::token_bytes`]).
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// GPT-2's byte-to-character alphabet, reversed.
    ByteLevel,
    /// `<0xHH>` is the byte HH.
    ByteFallback,
    /// Replace a string (sentencepiece's "▁" with a space).
    Replace(String, String),
    /// Anything else (WordPiece, CTC...): decode the token alone.
    Decode,
}

/// How few tokens a text can have: at least its bytes, less those the tokenizer drops, divided
/// by `per_token`.
#[derive(Debug, Clone, PartialEq)]
pub struct SizeBound {
    /// The most bytes of input text one token stands for.
    pub per_token: usize,
    /// Bytes the tokenizer drops (a ByteLevel vocabulary without a token for them: SmolLM2
    /// has none for 21 bytes, control characters and bytes that never occur in UTF-8).
    dropped: [bool; 256],
}

impl SizeBound {
    /// The bytes of `text` that become tokens.
    pub fn kept_bytes(&self, text: &str) -> usize {
        if !self.dropped.contains(&true) {
            return text.len();
        }
        text.bytes().filter(|&b| !self.dropped[b as usize]).count()
    }

    /// The least number of tokens `text` can have.
    pub fn min_tokens(&self, text: &str) -> usize {
        self.kept_bytes(text).div_ceil(self.per_token)
    }
}

fn model_error(e: impl std::fmt::Display) -> Error {
    Error::model(format!("tokenizer: {e}"))
}

impl Tokenizer {
    /// The tokenizer in `json` (a tokenizer.json file's bytes, freed once read).
    pub fn from_bytes(json: Vec<u8>) -> Result<Self> {
        let inner = crate::tokenizer_file::read(json)
            .map_err(|e| Error::model(format!("tokenizer.json: {e}")))?;
        Ok(Self::from_inner(inner))
    }
    fn from_inner(inner: Inner) -> Self {
        let mut special: Vec<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        special.sort_unstable();
        let added = inner
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content))
            .collect();
        let token_text = decoder_steps(&serde_json::to_value(inner.get_decoder()).ok());
        let size_bound = size_bound(&inner);
        Tokenizer {
            inner,
            plain: OnceCell::new(),
            special,
            added,
            token_text,
            size_bound,
        }
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

    /// How few tokens a text can have, when this tokenizer has such a bound. None when it can
    /// turn any amount of text into one token or none (text-deleting normalizers or
    /// pre-tokenizers, fused unknown tokens, unknown characters dropped, added tokens that
    /// swallow neighbouring spaces, WordPiece, Unigram).
    pub fn size_bound(&self) -> Option<&SizeBound> {
        self.size_bound.as_ref()
    }

    /// Text of `ids`; `skip_special` drops special tokens.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(model_error)
    }

    /// Whether the model is this crate's compact BPE (crate::bpe) rather than the library's (for
    /// tests: files the lean reader refuses fall back to the library quietly).
    #[doc(hidden)]
    pub fn is_lean_bpe(&self) -> bool {
        matches!(
            self.inner.get_model(),
            crate::tokenizer_file::TokenModel::Lean(_)
        )
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> u32 {
        self.inner.get_vocab_size(true) as u32
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The bytes token `id` stands for alone: an added token's content; a vocabulary entry
    /// through the decoder (GPT-2 byte characters become their bytes, `<0xHH>` its byte, "▁" a
    /// space), so a token holding part of a UTF-8 character gives those bytes, not U+FFFD. A
    /// leading space is kept ("Ġthe" is " the"). Empty for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if let Some(content) = self.added.get(&id) {
            return content.clone().into_bytes();
        }
        let Some(entry) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        let mut text = entry.into_bytes();
        for step in &self.token_text {
            text = match step {
                Step::ByteLevel => match std::str::from_utf8(&text) {
                    Ok(s) => s
                        .chars()
                        .flat_map(|c| match byte_level_byte(c) {
                            Some(b) => vec![b],
                            None => c.to_string().into_bytes(),
                        })
                        .collect(),
                    Err(_) => text,
                },
                Step::ByteFallback => match std::str::from_utf8(&text).ok().and_then(byte_token) {
                    Some(b) => vec![b],
                    None => text,
                },
                Step::Replace(from, to) => match std::str::from_utf8(&text) {
                    Ok(s) => s.replace(from.as_str(), to).into_bytes(),
                    Err(_) => text,
                },
                Step::Decode => self
                    .decode_with(&[id], false)
                    .map(String::into_bytes)
                    .unwrap_or(text),
            };
        }
        text
    }
}

/// `<0xHH>`: the byte HH.
fn byte_token(s: &str) -> Option<u8> {
    let hex = s.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// What [`Tokenizer::token_bytes`] does with a vocabulary entry, from the decoder's JSON.
fn decoder_steps(decoder: &Option<Json>) -> Vec<Step> {
    let Some(d) = decoder.as_ref().filter(|d| !d.is_null()) else {
        return vec![];
    };
    let step = |d: &Json| -> Option<Step> {
        Some(match d.get("type")?.as_str()? {
            "ByteLevel" => Step::ByteLevel,
            "ByteFallback" => Step::ByteFallback,
            "Metaspace" => Step::Replace(
                d.get("replacement")
                    .and_then(Json::as_str)
                    .unwrap_or("\u{2581}")
                    .to_string(),
                " ".into(),
            ),
            "Replace" => Step::Replace(
                d.get("pattern")?.get("String")?.as_str()?.to_string(),
                d.get("content")?.as_str()?.to_string(),
            ),
            // Whole-text steps: nothing to do to one token.
            "Fuse" | "Strip" => return None,
            _ => Step::Decode,
        })
    };
    match d.get("type").and_then(Json::as_str) {
        Some("Sequence") => d
            .get("decoders")
            .and_then(Json::as_array)
            .map(|ds| ds.iter().filter_map(step).collect())
            .unwrap_or_else(|| vec![Step::Decode]),
        _ => step(d).into_iter().collect(),
    }
}

impl Decode for Tokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, true)
    }
}

/// How many times shorter than its input a normalizer's output can be; None when unbounded
/// (it deletes text). Unicode normalization shrinks text at most 4 times (NFKC maps the
/// 4-byte "𝐀" to "A"; NFC composes three 3-byte Hangul jamo into one 3-byte syllable).
fn normalizer_shrink(n: &Json) -> Option<usize> {
    match n {
        Json::Null => Some(1),
        _ => match n.get("type")?.as_str()? {
            "Prepend" | "ByteLevel" => Some(1),
            "NFC" | "NFD" | "NFKC" | "NFKD" | "Lowercase" => Some(4),
            "Replace" => {
                let pattern = n.get("pattern")?.get("String")?.as_str()?;
                let content = n.get("content")?.as_str()?;
                if content.is_empty() {
                    None
                } else {
                    Some(pattern.len().div_ceil(content.len()).max(1))
                }
            }
            "Sequence" => n
                .get("normalizers")?
                .as_array()?
                .iter()
                .try_fold(1usize, |f, n| f.checked_mul(normalizer_shrink(n)?)),
            // Strip, StripAccents, BertNormalizer, Nmt, Precompiled: they delete text.
            _ => None,
        },
    }
}

/// Whether a pre-tokenizer keeps every byte of its input (it only splits, or replaces spaces
/// with "▁"), and whether it maps bytes to characters (ByteLevel).
fn pre_tokenizer_keeps_text(p: &Json) -> Option<bool> {
    match p {
        Json::Null => Some(false),
        _ => {
            if p.get("behavior").and_then(Json::as_str) == Some("Removed") {
                return None;
            }
            match p.get("type")?.as_str()? {
                "ByteLevel" => Some(true),
                "Metaspace" | "Digits" | "Split" | "Punctuation" | "UnicodeScripts"
                | "FixedLength" => Some(false),
                "Sequence" => p
                    .get("pretokenizers")?
                    .as_array()?
                    .iter()
                    .try_fold(false, |b, p| Some(b | pre_tokenizer_keeps_text(p)?)),
                // Whitespace, WhitespaceSplit, BertPreTokenizer, CharDelimiterSplit drop text.
                _ => None,
            }
        }
    }
}

/// See [`Tokenizer::size_bound`]. Each token's text in the vocabulary is at least as long as
/// the (normalized) input it covers: ByteLevel vocabularies spell one byte per character, "▁"
/// (3 bytes) stands for a space, "<0x0A>" for one byte.
fn size_bound(t: &Inner) -> Option<SizeBound> {
    let normalizer = serde_json::to_value(t.get_normalizer()).ok()?;
    let shrink = normalizer_shrink(&normalizer)?;
    let byte_level = pre_tokenizer_keeps_text(&serde_json::to_value(t.get_pre_tokenizer()).ok()?)?;
    let bpe = t.get_model();
    let flags = bpe.bpe_flags()?;
    // The model's vocabulary, read in place (a copy of a 262k-token vocabulary would stay in a
    // wasm32 memory as its high-water mark).
    let in_vocab = |token: &str| bpe.token_to_id(token).is_some();
    // Every character must become some token, not be fused with others. BPE drops a
    // character it has no token for when there is neither byte fallback nor an unknown token:
    // with ByteLevel (characters are bytes) and no normalizer, such bytes are not counted.
    let mut dropped = [false; 256];
    let unk_per_char = flags.unk_token && !flags.fuse_unk;
    let byte_fallback =
        flags.byte_fallback && (0..=255u8).all(|b| in_vocab(&format!("<0x{b:02X}>")));
    if !unk_per_char && !byte_fallback {
        if !(byte_level && flags.plain_chars) {
            return None;
        }
        for b in 0..=255u8 {
            dropped[b as usize] = !in_vocab(&byte_level_char(b));
        }
        if dropped.contains(&true) && !normalizer.is_null() {
            return None;
        }
    }
    let width = |s: &str| {
        if byte_level {
            s.chars().count()
        } else {
            s.len()
        }
    };
    // Ids are 0..size unless the file left holes; then its entries are read from a copy.
    let size = bpe.get_vocab_size();
    let (found, mut longest) = (0..size as u32)
        .filter_map(|id| bpe.id_to_token(id))
        .fold((0, 0), |(n, w), s| (n + 1, w.max(width(&s))));
    if found != size {
        longest = bpe.get_vocab().keys().map(|s| width(s)).max().unwrap_or(0);
    }
    if unk_per_char {
        longest = longest.max(4); // one unknown character
    }
    for token in t.get_added_tokens_decoder().values() {
        if token.lstrip || token.rstrip {
            return None;
        }
        longest = longest.max(token.content.len());
    }
    Some(SizeBound {
        per_token: longest.max(1).checked_mul(shrink)?,
        dropped,
    })
}

/// Whether GPT-2's ByteLevel alphabet writes byte `b` as the character of the same code.
fn byte_level_printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The byte GPT-2's ByteLevel alphabet writes as `c`; None for characters outside it.
fn byte_level_byte(c: char) -> Option<u8> {
    let code = c as u32;
    if code < 256 && byte_level_printable(code as u8) {
        return Some(code as u8);
    }
    // U+0100 + rank: the rank-th byte that is not printable.
    let rank = code.checked_sub(0x100)? as usize;
    (0..=255u8).filter(|&b| !byte_level_printable(b)).nth(rank)
}

/// The character GPT-2's ByteLevel pre-tokenizer writes for byte `b`.
fn byte_level_char(b: u8) -> String {
    let printable = byte_level_printable(b);
    let c = if printable {
        char::from(b)
    } else {
        // The others, in byte order, become U+0100, U+0101, ...
        let rank = (0..b)
            .filter(|&x| !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF))
            .count();
        char::from_u32(0x100 + rank as u32).unwrap_or('\u{100}')
    };
    c.to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn byte_level_alphabet() {
        assert_eq!(byte_level_char(b' '), "Ġ");
        assert_eq!(byte_level_char(b'\n'), "Ċ");
        assert_eq!(byte_level_char(b'a'), "a");
        assert_eq!(byte_level_char(0), "\u{100}");
        for b in 0..=255u8 {
            let c = byte_level_char(b).chars().next().unwrap();
            assert_eq!(byte_level_byte(c), Some(b));
        }
        assert_eq!(byte_level_byte('€'), None);
        assert_eq!(byte_token("<0x0A>"), Some(b'\n'));
        assert_eq!(byte_token("<0xE2>"), Some(0xE2));
        assert_eq!(byte_token("<0x0A"), None);
        assert_eq!(byte_token("<0xABC>"), None);
    }

    /// A ByteLevel BPE tokenizer: "a", "b", "Ġ", the two bytes of "é" (C3 A9), "Ġa"; "<eos>" (6)
    /// is special.
    pub fn byte_level_json() -> String {
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 6, "content": "<eos>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false,
                "vocab": {"a": 0, "b": 1, "Ġ": 2, "Ã": 3, "©": 4, "Ġa": 5},
                "merges": [["Ġ", "a"]]}
        })
        .to_string()
    }

    #[test]
    fn token_bytes_byte_level() {
        let t = Tokenizer::from_bytes(byte_level_json().into_bytes()).unwrap();
        assert_eq!(t.token_bytes(0), b"a");
        assert_eq!(t.token_bytes(5), b" a");
        assert_eq!(t.token_bytes(3), [0xC3]);
        assert_eq!(t.token_bytes(4), [0xA9]);
        assert_eq!(t.token_bytes(6), b"<eos>");
        assert_eq!(t.token_bytes(99), b"");
    }

    #[test]
    fn token_bytes_sentencepiece() {
        let json = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": true, "ignore_merges": false,
                "vocab": {"▁the": 0, "<0xE2>": 1, "x": 2}, "merges": []}
        })
        .to_string();
        let t = Tokenizer::from_bytes(json.into_bytes()).unwrap();
        assert_eq!(t.token_bytes(0), b" the");
        assert_eq!(t.token_bytes(1), [0xE2]);
        assert_eq!(t.token_bytes(2), b"x");
    }

    #[test]
    fn normalizers_that_delete_text_have_no_bound() {
        assert_eq!(normalizer_shrink(&Json::Null), Some(1));
        assert_eq!(
            normalizer_shrink(&json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})),
            Some(1)
        );
        assert_eq!(normalizer_shrink(&json!({"type": "NFKC"})), Some(4));
        assert_eq!(
            normalizer_shrink(
                &json!({"type": "Replace", "pattern": {"String": "abc"}, "content": "x"})
            ),
            Some(3)
        );
        for deleting in [
            json!({"type": "Replace", "pattern": {"String": " "}, "content": ""}),
            json!({"type": "Replace", "pattern": {"Regex": " +"}, "content": " "}),
            json!({"type": "Strip", "strip_left": true, "strip_right": true}),
            json!({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "StripAccents"}]}),
        ] {
            assert_eq!(normalizer_shrink(&deleting), None, "{deleting}");
        }
    }

    #[test]
    fn pre_tokenizers_that_drop_text_have_no_bound() {
        assert_eq!(
            pre_tokenizer_keeps_text(&json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false}]})),
            Some(true)
        );
        assert_eq!(
            pre_tokenizer_keeps_text(&json!({"type": "Metaspace", "replacement": "▁"})),
            Some(false)
        );
        for dropping in [
            json!({"type": "Whitespace"}),
            json!({"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": false}),
        ] {
            assert_eq!(pre_tokenizer_keeps_text(&dropping), None, "{dropping}");
        }
    }
}
