//! `tokenizer.json` read with little memory. The `tokenizers` crate deserializes a model by way of
//! two whole JSON trees (an untagged enum buffers it, then a `serde_json::Value` holds it again),
//! which for Gemma 3's 262k tokens and 513k merges costs about three times the tokenizer's own
//! size, and in wasm32 a linear memory never gives back what it grew to. Here a BPE model's
//! vocabulary and merges stream straight into what `BpeBuilder` takes; every other part
//! (normalizer, pre-tokenizer, post-processor, decoder, added tokens, truncation, padding) goes
//! through the library's own types, as the library assembles them. Any other model, or a file
//! this reader does not take, is read by the library itself.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PaddingParams,
    PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder, TruncationParams,
};

/// The tokenizer in `json`: a BPE model read lean, anything else by the library. The file's
/// bytes are freed before the model is built (12 MB less at the high-water mark for Gemma 3).
pub fn read(json: Vec<u8>) -> tokenizers::Result<tokenizers::Tokenizer> {
    match serde_json::from_slice::<LeanFile>(&json) {
        Ok(lean) => {
            drop(json);
            lean.build()
        }
        Err(_) => tokenizers::Tokenizer::from_bytes(json),
    }
}

/// The file's parts, as the library's `Tokenizer` deserializer reads them, with the model as a
/// [`LeanBpe`].
struct LeanFile {
    bpe: LeanBpe,
    normalizer: Option<NormalizerWrapper>,
    pre_tokenizer: Option<PreTokenizerWrapper>,
    post_processor: Option<PostProcessorWrapper>,
    decoder: Option<DecoderWrapper>,
    truncation: Option<TruncationParams>,
    padding: Option<PaddingParams>,
    added_tokens: Vec<AddedTokenWithId>,
}

/// An entry of `added_tokens`.
#[derive(Deserialize)]
struct AddedTokenWithId {
    #[allow(dead_code)] // the library only warns when it differs from the id the token gets
    id: u32,
    #[serde(flatten)]
    token: AddedToken,
}

impl LeanFile {
    /// The tokenizer, assembled as the library assembles a deserialized one: the model and its
    /// companions, then the added tokens (which take the model's ids where it has them).
    fn build(self) -> tokenizers::Result<tokenizers::Tokenizer> {
        let mut tokenizer = TokenizerBuilder::new()
            .with_model(ModelWrapper::BPE(self.bpe.build()?))
            .with_normalizer(self.normalizer)
            .with_pre_tokenizer(self.pre_tokenizer)
            .with_post_processor(self.post_processor)
            .with_decoder(self.decoder)
            .with_truncation(self.truncation)
            .with_padding(self.padding)
            .build()?;
        let added: Vec<AddedToken> = self.added_tokens.into_iter().map(|t| t.token).collect();
        tokenizer.add_tokens(&added);
        Ok(tokenizer.into())
    }
}

impl<'de> Deserialize<'de> for LeanFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FileVisitor)
    }
}

struct FileVisitor;

impl<'de> Visitor<'de> for FileVisitor {
    type Value = LeanFile;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a tokenizer.json object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LeanFile, A::Error> {
        let (mut bpe, mut normalizer, mut pre_tokenizer, mut post_processor, mut decoder) =
            (None, None, None, None, None);
        let (mut truncation, mut padding, mut added_tokens) = (None, None, vec![]);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "version" => {
                    let v: String = map.next_value()?;
                    if v != "1.0" {
                        return Err(de::Error::custom(format!("tokenizer version {v}")));
                    }
                }
                "model" => bpe = Some(map.next_value::<LeanBpe>()?),
                "normalizer" => normalizer = map.next_value()?,
                "pre_tokenizer" => pre_tokenizer = map.next_value()?,
                "post_processor" => post_processor = map.next_value()?,
                "decoder" => decoder = map.next_value()?,
                "truncation" => truncation = map.next_value()?,
                "padding" => padding = map.next_value()?,
                "added_tokens" => added_tokens = map.next_value()?,
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(LeanFile {
            bpe: bpe.ok_or_else(|| de::Error::missing_field("model"))?,
            normalizer,
            pre_tokenizer,
            post_processor,
            decoder,
            truncation,
            padding,
            added_tokens,
        })
    }
}

/// A BPE model's fields, as the library's BPE deserializer reads them; the merges in either of
/// its forms (`"a b"` strings, or `["a", "b"]` pairs), read one by one.
#[derive(Default)]
struct LeanBpe {
    vocab: Option<Vocab>,
    merges: Option<Vec<(String, String)>>,
    dropout: Option<f32>,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: Option<bool>,
    byte_fallback: Option<bool>,
    ignore_merges: Option<bool>,
}

impl LeanBpe {
    fn build(self) -> tokenizers::Result<BPE> {
        let (Some(vocab), Some(merges)) = (self.vocab, self.merges) else {
            return Err("BPE model without vocab or merges".into());
        };
        let mut b = BPE::builder().vocab_and_merges(vocab, merges);
        if let Some(p) = self.dropout {
            b = b.dropout(p);
        }
        if let Some(t) = self.unk_token {
            b = b.unk_token(t);
        }
        if let Some(p) = self.continuing_subword_prefix {
            b = b.continuing_subword_prefix(p);
        }
        if let Some(s) = self.end_of_word_suffix {
            b = b.end_of_word_suffix(s);
        }
        if let Some(f) = self.fuse_unk {
            b = b.fuse_unk(f);
        }
        if let Some(f) = self.byte_fallback {
            b = b.byte_fallback(f);
        }
        if let Some(f) = self.ignore_merges {
            b = b.ignore_merges(f);
        }
        b.build()
    }
}

impl<'de> Deserialize<'de> for LeanBpe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(BpeVisitor)
    }
}

struct BpeVisitor;

impl<'de> Visitor<'de> for BpeVisitor {
    type Value = LeanBpe;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a BPE model")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LeanBpe, A::Error> {
        let mut m = LeanBpe::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "type" => {
                    let kind: String = map.next_value()?;
                    if kind != "BPE" {
                        // Read by the library instead.
                        return Err(de::Error::custom(format!("a {kind} model")));
                    }
                }
                "vocab" => m.vocab = Some(map.next_value()?),
                "merges" => m.merges = Some(map.next_value::<Merges>()?.0),
                "dropout" => m.dropout = map.next_value()?,
                "unk_token" => m.unk_token = map.next_value()?,
                "continuing_subword_prefix" => m.continuing_subword_prefix = map.next_value()?,
                "end_of_word_suffix" => m.end_of_word_suffix = map.next_value()?,
                "fuse_unk" => m.fuse_unk = map.next_value()?,
                "byte_fallback" => m.byte_fallback = map.next_value()?,
                "ignore_merges" => m.ignore_merges = map.next_value()?,
                other => {
                    // A field this reader does not know: the library decides what it means.
                    return Err(de::Error::unknown_field(other, &[]));
                }
            }
        }
        Ok(m)
    }
}

/// The merges, in rank order.
struct Merges(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Merges {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(MergesVisitor)
    }
}

struct MergesVisitor;

impl<'de> Visitor<'de> for MergesVisitor {
    type Value = Merges;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of merges")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Merges, A::Error> {
        let mut merges = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(m) = seq.next_element::<Merge>()? {
            // The legacy form may carry a "#version" line, which the library skips.
            if let Merge::Pair(a, b) = m {
                merges.push((a, b));
            }
        }
        Ok(Merges(merges))
    }
}

enum Merge {
    Pair(String, String),
    Version,
}

impl<'de> Deserialize<'de> for Merge {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MergeVisitor)
    }
}

struct MergeVisitor;

impl<'de> Visitor<'de> for MergeVisitor {
    type Value = Merge;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(r#"a merge: "a b" or ["a", "b"]"#)
    }

    fn visit_str<E: de::Error>(self, line: &str) -> Result<Merge, E> {
        if line.starts_with("#version") {
            return Ok(Merge::Version);
        }
        // As the library splits them: exactly one space.
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => Ok(Merge::Pair(a.to_string(), b.to_string())),
            _ => Err(E::custom(format!("merge {line:?} is not two tokens"))),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Merge, A::Error> {
        let a: String = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &self))?;
        let b: String = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(1, &self))?;
        if seq.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::invalid_length(3, &self));
        }
        Ok(Merge::Pair(a, b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The library's own reading of `json`.
    fn library(json: &str) -> tokenizers::Tokenizer {
        tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap()
    }

    fn lean(json: &str) -> tokenizers::Tokenizer {
        serde_json::from_str::<LeanFile>(json)
            .expect("the lean reader takes it")
            .build()
            .unwrap()
    }

    /// Both readings serialize alike: vocabulary, merges by rank, added tokens and their ids,
    /// normalizer, pre-tokenizer, decoder, post-processor.
    fn assert_same(a: &tokenizers::Tokenizer, b: &tokenizers::Tokenizer) {
        assert_eq!(
            serde_json::to_value(a).unwrap(),
            serde_json::to_value(b).unwrap()
        );
    }

    const SPM_LIKE: &str = r#"{
      "version": "1.0",
      "added_tokens": [
        {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 7, "content": "<eot>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 8, "content": "<new>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": false}
      ],
      "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
      "pre_tokenizer": null,
      "post_processor": null,
      "decoder": {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}]},
      "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
        "vocab": {"<unk>": 0, "a": 1, "b": 2, "\u2581": 3, "ab": 4, "\u2581ab": 5, "<0x41>": 6, "<eot>": 7},
        "merges": ["a b", "\u2581 ab"]}
    }"#;

    #[test]
    fn a_bpe_file_reads_as_the_library_reads_it() {
        let (ours, theirs) = (lean(SPM_LIKE), library(SPM_LIKE));
        assert_same(&ours, &theirs);
        for text in ["ab ab", "a<eot>b", "A<new>", "ba ab"] {
            let (x, y) = (
                ours.encode(text, false).unwrap(),
                theirs.encode(text, false).unwrap(),
            );
            assert_eq!(x.get_ids(), y.get_ids(), "{text:?}");
        }
        assert_eq!(ours.token_to_id("<new>"), Some(8));
    }

    #[test]
    fn merges_as_pairs_read_as_merges_as_strings() {
        let pairs = SPM_LIKE.replace(
            r#"["a b", "\u2581 ab"]"#,
            r#"[["a", "b"], ["\u2581", "ab"]]"#,
        );
        assert_same(&lean(&pairs), &lean(SPM_LIKE));
        assert_same(&lean(&pairs), &library(&pairs));
        let versioned = SPM_LIKE.replace(r#"["a b","#, r##"["#version: 0.2", "a b","##);
        assert_same(&lean(&versioned), &lean(SPM_LIKE));
    }

    #[test]
    fn what_the_lean_reader_does_not_take_the_library_reads() {
        let word_level = r#"{"version": "1.0", "added_tokens": [], "normalizer": null,
          "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
          "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1}, "unk_token": "[UNK]"}}"#;
        assert!(serde_json::from_str::<LeanFile>(word_level).is_err());
        let t = read(word_level.into()).unwrap();
        assert_eq!(t.encode("hello", false).unwrap().get_ids(), [1]);
        // A merge that is not two tokens: the library's own error.
        let bad = SPM_LIKE.replace(r#""a b","#, r#""a b c","#);
        assert!(serde_json::from_str::<LeanFile>(&bad).is_err());
        assert!(read(bad.into_bytes()).is_err());
        assert!(read(b"{not json".to_vec()).is_err());
    }

    /// The real files: the default model's byte-level BPE, and Gemma 3's SentencePiece BPE when
    /// a test run has converted it (host/tests fetch it; not needed here).
    #[test]
    fn the_shipped_tokenizers_read_as_the_library_reads_them() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let default = root.join("models/smollm2-135m-instruct/tokenizer.json");
        let json = std::fs::read_to_string(&default).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (scripts/setup converts the default model)",
                default.display()
            )
        });
        let (ours, theirs) = (lean(&json), library(&json));
        assert_same(&ours, &theirs);
        let text = "Hello <|im_start|>world\n\n  tabs\tand ünïcödé 日本語 🙂 fn main() {}";
        assert_eq!(
            ours.encode(text, false).unwrap().get_ids(),
            theirs.encode(text, false).unwrap().get_ids()
        );
    }
}
