//! The model directory the runtime reads (`model.onnx` and its JSON files), written whole or
//! not at all: into a temporary sibling, renamed into place when complete.

use std::fs;
use std::path::Path;

use prost::Message;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{json, Value as Json};
use slm_gguf::{Architecture, Gguf, ModelConfig, Vocabulary};

use crate::{ConvertError, Progress};

/// `config.json` (Hugging Face's names, plus where the model came from and its layout).
pub fn config_json(file: &Gguf, config: &ModelConfig, vocabulary: &Vocabulary) -> Json {
    let (class, model_type) = match config.architecture {
        Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Architecture::Phi3 => ("Phi3ForCausalLM", "phi3"),
        Architecture::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
        _ => ("LlamaForCausalLM", "llama"),
    };
    let hidden_act = match config.architecture {
        Architecture::Gemma3 => "gelu_pytorch_tanh",
        _ => "silu",
    };
    let mut json = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": config.hidden,
        "intermediate_size": config.ffn,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": hidden_act,
        "rms_norm_eps": config.rms_eps as f64,
        "rope_theta": config.rope_base as f64,
        "max_position_embeddings": config.context,
        "vocab_size": config.vocab,
        "tie_word_embeddings": config.tied_embeddings,
        "bos_token_id": vocabulary.bos,
        "eos_token_id": vocabulary.eos,
        "pad_token_id": vocabulary.pad,
        "torch_dtype": "float32",
        "edge_slm": {
            "source": file.get("general.name").and_then(|v| v.as_str()).unwrap_or("unnamed GGUF"),
            "default_layout": "q4_1",
            "variants": {"q4_1": "model.onnx"},
            "onnx_logits": "last_position",
        },
    });
    if let Some(sliding) = &config.sliding {
        json["sliding_window"] = json!(sliding.window);
        json["rope_local_base_freq"] = json!(sliding.rope_base as f64);
        json["layer_types"] = json!((0..config.layers)
            .map(|i| if config.is_global(i) {
                "full_attention"
            } else {
                "sliding_attention"
            })
            .collect::<Vec<_>>());
    }
    json
}

/// `generation_config.json`: greedy by default, stopping at every end-of-text id.
pub fn generation_config(config: &ModelConfig, vocabulary: &Vocabulary) -> Json {
    json!({
        "bos_token_id": vocabulary.bos,
        "eos_token_id": vocabulary.eos_ids(),
        "pad_token_id": vocabulary.pad,
        "do_sample": false,
        "max_length": config.context,
    })
}

/// Converts `file` into `out` (replacing what is there once the new directory is complete).
pub fn write_model_dir(file: &Gguf, out: &Path) -> Result<(), ConvertError> {
    write_model_dir_with(file, out, &mut |_, _| {})
}

/// [`write_model_dir`], telling `progress` how far it is.
pub fn write_model_dir_with(
    file: &Gguf,
    out: &Path,
    progress: Progress,
) -> Result<(), ConvertError> {
    let mut config = ModelConfig::read(file)?;
    crate::check_supported(&config)?;
    // Phi-3 files may declare a sliding window (Phi-3-mini: 2047), which llama.cpp applies. Up to
    // that many tokens it is plain attention, so the context stops there.
    if config.architecture == Architecture::Phi3 {
        if let Some(window) = file
            .get("phi3.attention.sliding_window")
            .and_then(|v| v.as_u64())
        {
            config.context = config.context.min(window as usize);
        }
    }
    let vocabulary = Vocabulary::read(file)?;
    let steps = crate::progress_steps(&config);
    progress(0, steps);
    let model = crate::build(file, &config, crate::TableLayout::Exact, progress)?;
    progress(steps - 1, steps);

    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let partial = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let written = (|| -> Result<(), ConvertError> {
        fs::create_dir_all(&partial)?;
        let dump = |name: &str, value: &Json| -> Result<(), ConvertError> {
            let text = match name {
                "tokenizer.json" => serde_json::to_string(&MergesLast(value)),
                _ => serde_json::to_string_pretty(value),
            };
            Ok(fs::write(
                partial.join(name),
                text.expect("JSON values serialize"),
            )?)
        };
        dump("tokenizer.json", &vocabulary.tokenizer_json()?)?;
        dump(
            "tokenizer_config.json",
            &vocabulary.tokenizer_config(config.context as u64),
        )?;
        dump("config.json", &config_json(file, &config, &vocabulary))?;
        dump(
            "generation_config.json",
            &generation_config(&config, &vocabulary),
        )?;
        fs::write(partial.join("model.onnx"), model.encode_to_vec())?;
        if out.is_dir() {
            fs::remove_dir_all(out)?;
        }
        fs::rename(&partial, out)?;
        progress(steps, steps);
        Ok(())
    })();
    if written.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    written
}

/// A JSON value written with each object's `merges` after its other keys: tokenizer.json's BPE
/// `vocab` before its `merges`, as the `tokenizers` library writes them, so that a reader can
/// turn each merge into ids as it reads it (the generator's does; `serde_json` would otherwise
/// sort `merges` first).
struct MergesLast<'a>(&'a Json);

impl Serialize for MergesLast<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Json::Object(map) = self.0 else {
            return self.0.serialize(serializer);
        };
        let mut out = serializer.serialize_map(Some(map.len()))?;
        let others = map.iter().filter(|(key, _)| *key != "merges");
        for (key, value) in others.chain(map.get_key_value("merges")) {
            out.serialize_entry(key, &MergesLast(value))?;
        }
        out.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_are_written_after_the_vocabulary() {
        let value = json!({"model": {"merges": ["a b"], "type": "BPE", "vocab": {"a": 0}}, "added_tokens": []});
        let text = serde_json::to_string(&MergesLast(&value)).unwrap();
        assert!(
            text.find("\"vocab\"").unwrap() < text.find("\"merges\"").unwrap(),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Json>(&text).unwrap(), value);
    }
}
