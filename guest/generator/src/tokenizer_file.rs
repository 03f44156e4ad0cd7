//! `tokenizer.json` read with little memory. The `tokenizers` crate deserializes a model by way of
//! two whole JSON trees (an untagged enum buffers it, then a `serde_json::Value` holds it again),
//! and its BPE holds the vocabulary and merges in hash maps of strings: for Gemma 3's 262k tokens
//! and 513k merges, a 98 MB high-water mark, and in wasm32 a linear memory never gives back what
//! it grew to. Here a BPE model's vocabulary and merges stream straight into a [`Bpe`] (14 MB);
//! every other part (normalizer, pre-tokenizer, post-processor, decoder, added tokens,
//! truncation, padding) goes through the library's own types, as the library assembles them. Any
//! other model, or a file this reader does not take, is read by the library itself.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use tokenizers::models::TrainerWrapper;
use tokenizers::{
    AddedToken, DecoderWrapper, Model, ModelWrapper, NormalizerWrapper, PaddingParams,
    PostProcessorWrapper, PreTokenizerWrapper, Token, TokenizerBuilder, TokenizerImpl,
    TruncationParams,
};

use crate::bpe::{self, Bpe};

/// The generator's tokenizer: the library's pipeline around either model.
pub type Inner = TokenizerImpl<
    TokenModel,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// The tokenizer in `json`: a BPE model read lean, anything else by the library. The file's
/// bytes are freed before the model is built.
pub fn read(json: Vec<u8>) -> tokenizers::Result<Inner> {
    match read_lean(&json) {
        Ok(lean) => {
            drop(json);
            lean.build()
        }
        Err(_) => Inner::from_bytes(json),
    }
}

/// The file in one pass when its BPE vocabulary comes before its merges (as the library and
/// `slm convert` write them), else in two: the vocabulary first, then everything else (files
/// written with sorted keys list `merges` first). Either way each merge becomes ids as it is
/// read. (Read from the file instead of its bytes, it would spare Gemma 3's 12 MB of JSON at the
/// high-water mark, but serde_json reads an `io::Read` byte by byte: 100 ms more to load.)
fn read_lean(json: &[u8]) -> serde_json::Result<LeanFile> {
    match read_pass(json, bpe::Builder::default()) {
        Err(e) if e.to_string().starts_with(MERGES_FIRST) => {
            let mut builder = bpe::Builder::default();
            let mut pass = serde_json::Deserializer::from_slice(json);
            VocabPass(&mut builder).deserialize(&mut pass)?;
            pass.end()?;
            builder.end_vocab();
            read_pass(json, builder)
        }
        file => file,
    }
}

/// What stops a pass that meets the merges before the vocabulary.
const MERGES_FIRST: &str = "BPE merges before the vocabulary";

fn read_pass(json: &[u8], builder: bpe::Builder) -> serde_json::Result<LeanFile> {
    let mut pass = serde_json::Deserializer::from_slice(json);
    let file = FileSeed(builder).deserialize(&mut pass)?;
    pass.end()?;
    Ok(file)
}

/// The model of a tokenizer: ours for BPE files, the library's for the rest.
#[derive(Clone)]
pub enum TokenModel {
    Lean(Bpe),
    Library(ModelWrapper),
}

/// What [`crate::tokenizer::SizeBound`] needs of a BPE model.
pub struct BpeFlags {
    pub unk_token: bool,
    pub fuse_unk: bool,
    pub byte_fallback: bool,
    /// Neither a continuing-subword prefix nor an end-of-word suffix.
    pub plain_chars: bool,
}

impl TokenModel {
    /// None when the model is not BPE.
    pub fn bpe_flags(&self) -> Option<BpeFlags> {
        match self {
            TokenModel::Lean(b) => Some(BpeFlags {
                unk_token: b.options().unk_token.is_some(),
                fuse_unk: b.options().fuse_unk,
                byte_fallback: b.options().byte_fallback,
                plain_chars: true,
            }),
            TokenModel::Library(ModelWrapper::BPE(b)) => Some(BpeFlags {
                unk_token: b.unk_token.is_some(),
                fuse_unk: b.fuse_unk,
                byte_fallback: b.byte_fallback,
                plain_chars: b.continuing_subword_prefix.is_none()
                    && b.end_of_word_suffix.is_none(),
            }),
            TokenModel::Library(_) => None,
        }
    }
}

impl Model for TokenModel {
    type Trainer = TrainerWrapper;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        match self {
            TokenModel::Lean(m) => m.tokenize(sequence),
            TokenModel::Library(m) => m.tokenize(sequence),
        }
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            TokenModel::Lean(m) => m.token_to_id(token),
            TokenModel::Library(m) => m.token_to_id(token),
        }
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        match self {
            TokenModel::Lean(m) => m.id_to_token(id),
            TokenModel::Library(m) => m.id_to_token(id),
        }
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        match self {
            TokenModel::Lean(m) => m.get_vocab(),
            TokenModel::Library(m) => m.get_vocab(),
        }
    }

    fn get_vocab_size(&self) -> usize {
        match self {
            TokenModel::Lean(m) => m.get_vocab_size(),
            TokenModel::Library(m) => m.get_vocab_size(),
        }
    }

    fn save(&self, folder: &Path, prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        match self {
            TokenModel::Lean(m) => m.save(folder, prefix),
            TokenModel::Library(m) => m.save(folder, prefix),
        }
    }

    fn get_trainer(&self) -> TrainerWrapper {
        match self {
            TokenModel::Lean(m) => m.get_trainer().into(),
            TokenModel::Library(m) => m.get_trainer(),
        }
    }
}

impl Serialize for TokenModel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TokenModel::Lean(m) => m.serialize(s),
            TokenModel::Library(m) => m.serialize(s),
        }
    }
}

/// Files the lean reader does not take come through here, whole, to the library, after one
/// check of ours ([`merges_fit_prefix`]). (The library buffers the model as a JSON tree anyway;
/// this holds it once more while it is read.)
impl<'de> Deserialize<'de> for TokenModel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let model = serde_json::Value::deserialize(d)?;
        merges_fit_prefix(&model).map_err(de::Error::custom)?;
        ModelWrapper::deserialize(model)
            .map(TokenModel::Library)
            .map_err(de::Error::custom)
    }
}

/// The library's BPE makes each merge's token of the left token and the right one less its
/// continuing-subword prefix, cutting the right token at the prefix's length unchecked: a right
/// token shorter than the prefix (or cut inside a character) panics, which traps the generator
/// in wasm. Such a file is refused here, the merge named.
fn merges_fit_prefix(model: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    let Some(prefix) = model
        .get("continuing_subword_prefix")
        .and_then(Value::as_str)
    else {
        return Ok(());
    };
    let Some(merges) = model.get("merges").and_then(Value::as_array) else {
        return Ok(());
    };
    for (rank, merge) in merges.iter().enumerate() {
        let right = match merge {
            Value::String(line) => line.split(' ').nth(1),
            Value::Array(pair) => pair.get(1).and_then(Value::as_str),
            _ => None,
        };
        if let Some(right) = right.filter(|r| !r.is_char_boundary(prefix.len())) {
            return Err(format!(
                "BPE merge {rank} ({merge}): its right token {right:?} does not start with the \
                 continuing_subword_prefix {prefix:?}"
            ));
        }
    }
    Ok(())
}

/// The file's parts, as the library's `Tokenizer` deserializer reads them, with the model as a
/// [`Bpe`].
struct LeanFile {
    bpe: Bpe,
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
    fn build(self) -> tokenizers::Result<Inner> {
        let mut tokenizer = TokenizerBuilder::new()
            .with_model(TokenModel::Lean(self.bpe))
            .with_normalizer(self.normalizer)
            .with_pre_tokenizer(self.pre_tokenizer)
            .with_post_processor(self.post_processor)
            .with_decoder(self.decoder)
            .with_truncation(self.truncation)
            .with_padding(self.padding)
            .build()?;
        let added: Vec<AddedToken> = self.added_tokens.into_iter().map(|t| t.token).collect();
        tokenizer.add_tokens(&added);
        Ok(tokenizer)
    }
}

/// A first pass: the BPE model's `vocab`, into the builder; a model of another type is an
/// error (the library reads the file).
struct VocabPass<'a>(&'a mut bpe::Builder);

impl<'de> DeserializeSeed<'de> for VocabPass<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for VocabPass<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a tokenizer.json object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut model = false;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "model" {
                map.next_value_seed(ModelVocab(&mut *self.0))?;
                model = true;
            } else {
                map.next_value::<de::IgnoredAny>()?;
            }
        }
        if !model {
            return Err(de::Error::missing_field("model"));
        }
        Ok(())
    }
}

/// The first pass inside `model`.
struct ModelVocab<'a>(&'a mut bpe::Builder);

impl<'de> DeserializeSeed<'de> for ModelVocab<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ModelVocab<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a BPE model")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "type" => {
                    let kind: String = map.next_value()?;
                    if kind != "BPE" {
                        return Err(de::Error::custom(format!("a {kind} model")));
                    }
                }
                "vocab" => map.next_value_seed(VocabSeed(&mut *self.0))?,
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// The file's parts, around the builder (which may hold the vocabulary already).
struct FileSeed(bpe::Builder);

impl<'de> DeserializeSeed<'de> for FileSeed {
    type Value = LeanFile;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<LeanFile, D::Error> {
        d.deserialize_map(FileVisitor(Some(self.0)))
    }
}

struct FileVisitor(Option<bpe::Builder>);

impl<'de> Visitor<'de> for FileVisitor {
    type Value = LeanFile;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a tokenizer.json object")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<LeanFile, A::Error> {
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
                "model" => {
                    let builder = self
                        .0
                        .take()
                        .ok_or_else(|| de::Error::duplicate_field("model"))?;
                    bpe = Some(map.next_value_seed(BpeSeed(builder))?)
                }
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

/// A BPE model's fields, as the library's BPE deserializer reads them, into a [`Bpe`]: the
/// vocabulary (unless a first pass read it), then the merges one by one in either of their forms
/// (`"a b"` strings, or `["a", "b"]` pairs). Dropout, a subword prefix or suffix, or a token or
/// id listed twice: an error, and the library reads the file.
struct BpeSeed(bpe::Builder);

impl<'de> DeserializeSeed<'de> for BpeSeed {
    type Value = Bpe;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Bpe, D::Error> {
        d.deserialize_map(BpeVisitor(self.0))
    }
}

struct BpeVisitor(bpe::Builder);

impl<'de> Visitor<'de> for BpeVisitor {
    type Value = Bpe;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a BPE model")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Bpe, A::Error> {
        let mut builder = self.0;
        let mut options = bpe::Options::default();
        let (mut vocab, mut merges) = (false, false);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "type" => {
                    let kind: String = map.next_value()?;
                    if kind != "BPE" {
                        return Err(de::Error::custom(format!("a {kind} model")));
                    }
                }
                "vocab" if builder.vocab_ended() => {
                    // Read by a first pass.
                    map.next_value::<de::IgnoredAny>()?;
                    vocab = true;
                }
                "vocab" => {
                    map.next_value_seed(VocabSeed(&mut builder))?;
                    builder.end_vocab();
                    vocab = true;
                }
                "merges" if !builder.vocab_ended() => return Err(de::Error::custom(MERGES_FIRST)),
                "merges" => {
                    map.next_value_seed(MergesSeed(&mut builder))?;
                    merges = true;
                }
                "dropout" => {
                    options.dropout = map.next_value()?;
                    if options.dropout.is_some_and(|p| p != 0.0) {
                        return Err(de::Error::custom("BPE dropout"));
                    }
                }
                "unk_token" => options.unk_token = map.next_value()?,
                "continuing_subword_prefix" | "end_of_word_suffix" => {
                    if map.next_value::<Option<String>>()?.is_some() {
                        return Err(de::Error::custom(format!("BPE {key}")));
                    }
                }
                "fuse_unk" => options.fuse_unk = map.next_value::<Option<bool>>()?.unwrap_or(false),
                "byte_fallback" => {
                    options.byte_fallback = map.next_value::<Option<bool>>()?.unwrap_or(false)
                }
                "ignore_merges" => {
                    options.ignore_merges = map.next_value::<Option<bool>>()?.unwrap_or(false)
                }
                other => {
                    // A field this reader does not know: the library decides what it means.
                    return Err(de::Error::unknown_field(other, &[]));
                }
            }
        }
        if !(vocab && merges) {
            return Err(de::Error::custom("BPE model without vocab or merges"));
        }
        Ok(builder.build(options))
    }
}

/// `vocab`: token -> id, into the builder.
struct VocabSeed<'a>(&'a mut bpe::Builder);

impl<'de> DeserializeSeed<'de> for VocabSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for VocabSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a vocabulary: token -> id")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(token) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let id: u32 = map.next_value()?;
            self.0.token(&token, id).map_err(de::Error::custom)?;
        }
        Ok(())
    }
}

/// `merges`, in rank order, into the builder.
struct MergesSeed<'a>(&'a mut bpe::Builder);

impl<'de> DeserializeSeed<'de> for MergesSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for MergesSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of merges")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(m) = seq.next_element::<Merge>()? {
            // The legacy form may carry a "#version" line, which the library skips.
            if let Merge::Pair(a, b) = m {
                self.0.merge(&a, &b).map_err(de::Error::custom)?;
            }
        }
        Ok(())
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

    fn lean(json: &str) -> Inner {
        read_lean(json.as_bytes())
            .expect("the lean reader takes it")
            .build()
            .unwrap()
    }

    /// Both readings serialize alike: vocabulary, merges by rank, added tokens and their ids,
    /// normalizer, pre-tokenizer, decoder, post-processor.
    fn assert_same(a: &impl Serialize, b: &impl Serialize) {
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
        assert!(read_lean(word_level.as_bytes()).is_err());
        let t = read(word_level.into()).unwrap();
        assert_eq!(t.encode("hello", false).unwrap().get_ids(), [1]);
        // Dropout, an end-of-word suffix, a token listed twice: the library's BPE.
        for (from, to) in [
            (r#""dropout": null"#, r#""dropout": 0.5"#),
            (
                r#""end_of_word_suffix": null"#,
                r#""end_of_word_suffix": "</w>""#,
            ),
            (r#""<eot>": 7}"#, r#""<eot>": 7, "a": 9}"#),
        ] {
            let json = SPM_LIKE.replace(from, to);
            assert!(read_lean(json.as_bytes()).is_err(), "{to}");
            let t = read(json.into_bytes()).unwrap();
            assert!(matches!(t.get_model(), TokenModel::Library(_)), "{to}");
        }
        // A continuing-subword prefix: the library's BPE, unless a merge's right token is too
        // short to hold the prefix (the library would panic: a trap in wasm).
        let prefixed = SPM_LIKE
            .replace(
                r#""continuing_subword_prefix": null"#,
                r###""continuing_subword_prefix": "##""###,
            )
            .replace(r#""b": 2,"#, r###""##b": 2,"###)
            .replace(r#""a b","#, r###""a ##b","###)
            .replace(r#""<eot>": 7}"#, r#""<eot>": 7, "€": 9}"#);
        let t = read(prefixed.clone().into_bytes()).unwrap();
        assert!(matches!(t.get_model(), TokenModel::Library(_)));
        // (Tokens in the vocabulary: the library looks them up before it cuts.)
        for short in [r#""a a","#, r#""a €","#] {
            let json = prefixed.replace(r###""a ##b","###, short);
            let Err(e) = read(json.into_bytes()) else {
                panic!("{short}: read")
            };
            let e = e.to_string();
            assert!(
                e.contains("BPE merge 0") && e.contains("continuing_subword_prefix"),
                "{e}"
            );
        }
        // A merge that is not two tokens: the library's own error.
        let bad = SPM_LIKE.replace(r#""a b","#, r#""a b c","#);
        assert!(read_lean(bad.as_bytes()).is_err());
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
