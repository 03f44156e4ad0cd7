//! A model directory (`/models/<name>/`): tokenizer, chat template and the settings read from
//! `config.json`, `generation_config.json` and `tokenizer_config.json`.

use std::path::Path;

use serde_json::Value as Json;

use crate::constraint::{Constraint, Format, Grammars};
use crate::error::{Error, Result};
use crate::template::{ChatTemplate, SpecialTokens};
use crate::tokenizer::Tokenizer;

/// Used when config.json names no context length.
const DEFAULT_CONTEXT: u32 = 2048;

pub struct Model {
    pub name: String,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub context_length: u32,
    pub vocab_size: u32,
    /// Tokens that end generation.
    pub eos_ids: Vec<u32>,
    /// Prepended to raw prompts when tokenizer_config.json says `add_bos_token: true`.
    pub bos_id: Option<u32>,
    pub add_bos: bool,
    /// Constrained decoding's token trie, built the first time a request asks for a format.
    grammars: std::cell::OnceCell<std::result::Result<Grammars, Error>>,
}

/// Whether `name` is a plain directory name (no path tricks).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

/// The model used when a request names none: listed first when installed. The native host's
/// registry has the same rule (host/src/registry.rs `DEFAULT_MODEL`), so `slm run` and an HTTP
/// request without a `model` pick the same model.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// Subdirectories of `root` holding `config.json` and `tokenizer.json`: [`DEFAULT_MODEL`] first
/// when present, then the others by name. A `NAME.gguf` file counts as model NAME when the host
/// mounted its conversion at `root/NAME` (the `slm` host does; other hosts serve only the
/// directories).
pub fn list(root: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        // No models directory: no models.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::model(format!("reading {}: {e}", root.display()))),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .map(|n| match n.strip_suffix(".gguf") {
            Some(stem) => stem.to_string(),
            None => n,
        })
        .filter(|n| valid_name(n) && !n.starts_with('.'))
        .filter(|n| {
            let dir = root.join(n);
            dir.join("config.json").is_file() && dir.join("tokenizer.json").is_file()
        })
        .collect();
    names.sort_by(|a, b| (a != DEFAULT_MODEL, a).cmp(&(b != DEFAULT_MODEL, b)));
    // A directory and a GGUF file of the same name: one model (the host serves the directory).
    names.dedup();
    Ok(names)
}

fn read_json(path: &Path, required: bool) -> Result<Json> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| Error::model(format!("{}: {e}", path.display()))),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(Json::Null),
        Err(e) => Err(Error::model(format!("reading {}: {e}", path.display()))),
    }
}

/// A special token in tokenizer_config.json: a string or an AddedToken object.
fn token_str(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id`: an integer or a list of integers.
fn ids(v: &Json) -> Vec<u32> {
    match v {
        Json::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .into_iter()
            .collect(),
        Json::Array(a) => a.iter().flat_map(ids).collect(),
        _ => Vec::new(),
    }
}

/// The largest context window accepted from a model's files (tokens).
pub const MAX_CONTEXT: u32 = 1 << 20;
/// The largest vocabulary accepted from a model's files (tokens).
pub const MAX_VOCAB: u32 = 1 << 22;

/// Integer field `key` of `json` (read from `file`) when present: in `1..=max`, or a model error
/// naming the file, the field and the accepted range.
fn bounded(json: &Json, key: &str, max: u32, file: &Path) -> Result<Option<u32>> {
    let v = match json.get(key) {
        None | Some(Json::Null) => return Ok(None),
        Some(v) => v,
    };
    match v.as_u64() {
        Some(n) if (1..=max as u64).contains(&n) => Ok(Some(n as u32)),
        _ => Err(Error::model(format!(
            "{}: {key} = {v} is out of range: accepted 1..={max}",
            file.display()
        ))),
    }
}

/// The context window: the first of config.json's context fields present, else
/// tokenizer_config.json's `model_max_length`, else [`DEFAULT_CONTEXT`].
fn context_length(config: &Json, tok_config: &Json, dir: &Path) -> Result<u32> {
    for key in [
        "max_position_embeddings",
        "n_positions",
        "max_sequence_length",
        "seq_length",
        "n_ctx",
    ] {
        if let Some(n) = bounded(config, key, MAX_CONTEXT, &dir.join("config.json"))? {
            return Ok(n);
        }
    }
    // transformers writes a huge sentinel when the tokenizer has no limit.
    Ok(
        match tok_config.get("model_max_length").and_then(Json::as_u64) {
            Some(n) if (1..=MAX_CONTEXT as u64).contains(&n) => n as u32,
            _ => DEFAULT_CONTEXT,
        },
    )
}

/// config.json's `vocab_size`, when present and in range.
fn vocab_size(config: &Json, dir: &Path) -> Result<Option<u32>> {
    bounded(config, "vocab_size", MAX_VOCAB, &dir.join("config.json"))
}

/// What `list-models` reports, read from the JSON files alone (no tokenizer parsing).
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    pub context_length: u32,
    /// From config.json; None when it does not say (the tokenizer knows).
    pub vocab_size: Option<u32>,
    pub has_chat_template: bool,
}

pub fn info(dir: &Path) -> Result<Info> {
    let config = read_json(&dir.join("config.json"), true)?;
    let tok_config = read_json(&dir.join("tokenizer_config.json"), false)?;
    Ok(Info {
        context_length: context_length(&config, &tok_config, dir)?,
        vocab_size: vocab_size(&config, dir)?,
        has_chat_template: matches!(
            tok_config.get("chat_template"),
            Some(Json::String(_)) | Some(Json::Array(_))
        ) || dir.join(CHAT_TEMPLATE_FILE).is_file(),
    })
}

/// Where transformers (4.43 and later) saves a chat template, beside tokenizer_config.json
/// rather than in it: Optimum exports made with it have only this.
const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// The chat template's source: tokenizer_config.json's `chat_template` (a string, or the one
/// named "default" of a list), else chat_template.jinja.
fn chat_template_source(tok_config: &Json, dir: &Path) -> Result<Option<String>> {
    match tok_config.get("chat_template") {
        Some(Json::String(src)) => return Ok(Some(src.clone())),
        Some(Json::Array(list)) => {
            return Ok(list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Json::as_str))
                .map(str::to_string))
        }
        _ => {}
    }
    let path = dir.join(CHAT_TEMPLATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| Error::model(format!("{}: not UTF-8", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::model(format!("reading {}: {e}", path.display()))),
    }
}

impl Model {
    /// Load `dir` (which must hold config.json and tokenizer.json).
    pub fn load(name: &str, dir: &Path) -> Result<Model> {
        let config = read_json(&dir.join("config.json"), true)?;
        let gen_config = read_json(&dir.join("generation_config.json"), false)?;
        let tok_config = read_json(&dir.join("tokenizer_config.json"), false)?;
        let tok_bytes = std::fs::read(dir.join("tokenizer.json")).map_err(|e| {
            Error::model(format!(
                "reading {}: {e}",
                dir.join("tokenizer.json").display()
            ))
        })?;
        let tokenizer = Tokenizer::from_bytes(tok_bytes)?;

        let special = |key: &str| tok_config.get(key).and_then(token_str);
        let tokens = SpecialTokens {
            bos_token: special("bos_token"),
            eos_token: special("eos_token"),
            unk_token: special("unk_token"),
            pad_token: special("pad_token"),
        };
        let template = chat_template_source(&tok_config, dir)?
            .map(|src| ChatTemplate::new(&src, tokens.clone()))
            .transpose()?;

        let mut eos_ids = ids(gen_config.get("eos_token_id").unwrap_or(&Json::Null));
        eos_ids.extend(ids(config.get("eos_token_id").unwrap_or(&Json::Null)));
        if let Some(id) = tokens
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
        {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();

        let bos_id = config
            .get("bos_token_id")
            .and_then(Json::as_u64)
            .map(|n| n as u32)
            .or_else(|| {
                tokens
                    .bos_token
                    .as_deref()
                    .and_then(|t| tokenizer.token_to_id(t))
            });
        let add_bos = tok_config
            .get("add_bos_token")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        let context_length = context_length(&config, &tok_config, dir)?;
        let vocab_size = match vocab_size(&config, dir)? {
            Some(n) => n,
            None => tokenizer.vocab_size(),
        };

        Ok(Model {
            name: name.to_string(),
            context_length,
            template,
            tokenizer,
            vocab_size,
            eos_ids,
            bos_id,
            add_bos,
            grammars: std::cell::OnceCell::new(),
        })
    }

    /// Compile `format` for one generation (see [`crate::constraint`]).
    pub fn constrain(&self, format: &Format) -> Result<Constraint> {
        let grammars = self.grammars.get_or_init(|| {
            let eos = self.eos_ids.first().copied().ok_or_else(|| {
                Error::model("the model has no end-of-sequence token: a format cannot end")
            })?;
            Grammars::new(&self.tokenizer, self.vocab_size, eos)
        });
        grammars.as_ref().map_err(Clone::clone)?.compile(format)
    }

    /// Refuse a text that certainly has more tokens than the context window, before tokenizing
    /// it (a huge prompt would take seconds and a lot of memory to tokenize): more bytes than
    /// `context_length` tokens of the longest kind can hold (crate::tokenizer::SizeBound). The
    /// error reports the least number of tokens the text can have.
    pub fn check_text_fits(&self, text: &str) -> Result<()> {
        let Some(bound) = self.tokenizer.size_bound() else {
            return Ok(());
        };
        let fits = |bytes: usize| bytes.div_ceil(bound.per_token) <= self.context_length as usize;
        if fits(text.len()) || fits(bound.kept_bytes(text)) {
            return Ok(());
        }
        Err(Error::ContextOverflow {
            prompt_tokens: u32::try_from(bound.min_tokens(text)).unwrap_or(u32::MAX),
            context_length: self.context_length,
        })
    }

    /// Token ids of a raw prompt: BOS first when the model asks for it. Text that spells a
    /// special token becomes that token: the caller owns the whole prompt.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos {
            if let Some(bos) = self.bos_id {
                ids.push(bos);
            }
        }
        self.check_text_fits(text)?;
        ids.extend(self.tokenizer.encode(text)?);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_ids_forms() {
        assert_eq!(ids(&serde_json::json!(2)), [2]);
        assert_eq!(ids(&serde_json::json!([2, 0])), [2, 0]);
        assert!(ids(&Json::Null).is_empty());
    }

    /// Directories with the two files are models; a GGUF file counts once its conversion is
    /// mounted at its stem (here: a directory of that name), and only once.
    #[test]
    fn list_finds_directories_and_mounted_gguf_files() {
        let root = std::env::temp_dir().join(format!("slm-list-gguf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let model = |name: &str| {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("config.json"), "{}").unwrap();
            std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        };
        model("zeta");
        model(DEFAULT_MODEL);
        model("mounted");
        std::fs::write(root.join("mounted.gguf"), b"GGUF").unwrap();
        std::fs::write(root.join("unconverted.gguf"), b"GGUF").unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        let names = list(&root).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(names, [DEFAULT_MODEL, "mounted", "zeta"]);
    }

    #[test]
    fn names() {
        assert!(valid_name("smollm2-135m-instruct"));
        for bad in ["", ".", "..", "a/b", "../x"] {
            assert!(!valid_name(bad));
        }
    }

    #[test]
    fn context_fallbacks() {
        let dir = Path::new("/models/m");
        let ctx = |config: Json, tok_config: Json| context_length(&config, &tok_config, dir);
        assert_eq!(
            ctx(
                serde_json::json!({"max_position_embeddings": 256}),
                Json::Null
            ),
            Ok(256)
        );
        assert_eq!(
            ctx(
                Json::Null,
                serde_json::json!({"model_max_length": 1000000000000000019884624838656u128 as f64})
            ),
            Ok(DEFAULT_CONTEXT)
        );
        assert_eq!(
            ctx(Json::Null, serde_json::json!({"model_max_length": 4096})),
            Ok(4096)
        );
        assert_eq!(
            ctx(serde_json::json!({"n_ctx": MAX_CONTEXT}), Json::Null),
            Ok(MAX_CONTEXT)
        );
    }

    #[test]
    fn absurd_sizes_are_model_errors_naming_file_field_and_range() {
        let dir = Path::new("/models/m");
        for (key, value) in [
            ("max_position_embeddings", serde_json::json!(4294967295u64)),
            ("max_position_embeddings", serde_json::json!(0)),
            ("n_positions", serde_json::json!(MAX_CONTEXT + 1)),
            ("seq_length", serde_json::json!(-5)),
            ("n_ctx", serde_json::json!("2048")),
        ] {
            let config = serde_json::json!({ key: value });
            match context_length(&config, &Json::Null, dir) {
                Err(Error::ModelError(m)) => assert_eq!(
                    m,
                    format!("/models/m/config.json: {key} = {value} is out of range: accepted 1..=1048576")
                ),
                other => panic!("{key} = {value}: {other:?}"),
            }
        }
        for value in [
            serde_json::json!(0),
            serde_json::json!(5_000_000),
            serde_json::json!(1.5),
        ] {
            match vocab_size(&serde_json::json!({ "vocab_size": value }), dir) {
                Err(Error::ModelError(m)) => assert_eq!(
                    m,
                    format!("/models/m/config.json: vocab_size = {value} is out of range: accepted 1..=4194304")
                ),
                other => panic!("vocab_size = {value}: {other:?}"),
            }
        }
        assert_eq!(
            vocab_size(&serde_json::json!({"vocab_size": 49152}), dir),
            Ok(Some(49152))
        );
        assert_eq!(vocab_size(&serde_json::json!({}), dir), Ok(None));
    }

    /// tokenizer_config.json's template first (a string, or the list's "default"), else
    /// chat_template.jinja beside it (transformers' own file since 4.43), else none.
    #[test]
    fn chat_template_from_the_config_or_its_own_file() {
        let dir = std::env::temp_dir().join(format!("slm-template-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = |tok: Json| chat_template_source(&tok, &dir).unwrap();
        assert_eq!(src(Json::Null), None);
        std::fs::write(dir.join(CHAT_TEMPLATE_FILE), "{{ messages }}").unwrap();
        let in_file = src(Json::Null);
        let listed = src(serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}
        ]}));
        let in_config = src(serde_json::json!({"chat_template": "c"}));
        std::fs::write(dir.join(CHAT_TEMPLATE_FILE), [0xff, 0xfe]).unwrap();
        let not_utf8 = chat_template_source(&Json::Null, &dir);
        let has_one = info_has_template(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(in_file.as_deref(), Some("{{ messages }}"));
        assert_eq!(listed.as_deref(), Some("d"));
        assert_eq!(in_config.as_deref(), Some("c"));
        assert!(
            matches!(not_utf8, Err(Error::ModelError(m)) if m.ends_with("chat_template.jinja: not UTF-8"))
        );
        assert!(has_one);
    }

    fn info_has_template(dir: &Path) -> bool {
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        info(dir).unwrap().has_chat_template
    }

    #[test]
    fn the_default_model_is_listed_first_then_the_others_by_name() {
        let root = std::env::temp_dir().join(format!("slm-list-{}", std::process::id()));
        for name in ["zeta", DEFAULT_MODEL, "alpha", ".hidden"] {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("config.json"), "{}").unwrap();
            std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        }
        std::fs::create_dir_all(root.join("no-files")).unwrap();
        let listed = list(&root).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(listed, [DEFAULT_MODEL, "alpha", "zeta"]);
    }
}
