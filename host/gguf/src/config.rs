//! A model's hyper-parameters from the GGUF metadata, and the tensor directory checked against
//! them: every tensor the architecture needs, with the shape the metadata implies.

use crate::{Gguf, GgufError, TensorInfo, Value};

/// The architectures whose graphs we build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM, Mistral (GGUF labels them all `llama`).
    Llama,
    /// Llama with biases on q, k and v.
    Qwen2,
    /// Fused qkv (or separate q, k, v) and fused gate/up projections, an untied output.
    Phi3,
    /// Scaled embeddings, (1 + w) RMSNorms, q/k norms, norms after attention and MLP, GELU,
    /// sliding-window layers between global ones.
    Gemma3,
}

impl Architecture {
    const ALL: [(&'static str, Architecture); 4] = [
        ("llama", Architecture::Llama),
        ("qwen2", Architecture::Qwen2),
        ("phi3", Architecture::Phi3),
        ("gemma3", Architecture::Gemma3),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, a)| *a == self)
            .expect("listed")
            .0
    }
}

/// Layers that attend to the last `window` positions only, with their own RoPE base (Gemma 3).
#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    pub window: usize,
    pub rope_base: f32,
    /// Per layer: true where the layer attends to the whole context.
    pub global: Vec<bool>,
}

/// What the graph is built from. Every number comes from the file's metadata (or, where a key is
/// optional, from llama.cpp's default for the architecture).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub context: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// Dimensions of each head that RoPE rotates.
    pub rope_dims: usize,
    /// No `output.weight`: the LM head is the embedding.
    pub tied_embeddings: bool,
    pub sliding: Option<SlidingWindow>,
}

impl ModelConfig {
    /// The hyper-parameters, then the tensor directory checked against them.
    pub fn read(file: &Gguf) -> Result<ModelConfig, GgufError> {
        let name = file.architecture()?;
        let architecture = Architecture::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
            .ok_or_else(|| {
                let known: Vec<_> = Architecture::ALL.iter().map(|(n, _)| *n).collect();
                GgufError::BadMetadata {
                    key: "general.architecture".into(),
                    problem: format!(
                        "'{name}' is not supported (supported: {})",
                        known.join(", ")
                    ),
                }
            })?;
        let key = |k: &str| format!("{name}.{k}");
        let required =
            |k: &str| -> Result<usize, GgufError> { Ok(file.get_u64(&key(k))? as usize) };
        let optional = |k: &str, default: usize| -> Result<usize, GgufError> {
            match file.get(&key(k)) {
                None => Ok(default),
                Some(_) => required(k),
            }
        };
        let float = |k: &str, default: f32| -> Result<f32, GgufError> {
            match file.get(&key(k)) {
                None => Ok(default),
                Some(_) => file.get_f32(&key(k)),
            }
        };

        let layers = required("block_count")?;
        let hidden = required("embedding_length")?;
        let heads = required("attention.head_count")?;
        if heads == 0 || layers == 0 || hidden == 0 {
            return Err(GgufError::BadMetadata {
                key: key("attention.head_count"),
                problem: format!("{layers} layers of {hidden} with {heads} heads is not a model"),
            });
        }
        let head_dim = optional("attention.key_length", hidden / heads)?;
        let kv_heads = optional("attention.head_count_kv", heads)?;
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(GgufError::BadMetadata {
                key: key("attention.head_count_kv"),
                problem: format!("{kv_heads} key/value heads do not divide {heads} heads"),
            });
        }
        let vocab = match file.get(&key("vocab_size")) {
            Some(_) => required("vocab_size")?,
            None => file
                .get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map_or(0, |t| t.len()),
        };
        let sliding = match architecture {
            Architecture::Gemma3 => Some(SlidingWindow {
                window: required("attention.sliding_window")?,
                // llama.cpp's defaults for Gemma 3 files that predate these keys.
                rope_base: float("rope.freq_base_swa", 10_000.0)?,
                global: global_layers(file, &key("attention.sliding_window_pattern"), layers)?,
            }),
            _ => None,
        };
        let config = ModelConfig {
            architecture,
            layers,
            hidden,
            ffn: required("feed_forward_length")?,
            heads,
            kv_heads,
            head_dim,
            vocab,
            context: optional("context_length", 2048)?,
            rms_eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
            rope_base: float("rope.freq_base", 10_000.0)?,
            rope_dims: optional("rope.dimension_count", head_dim)?,
            tied_embeddings: file.tensor("output.weight").is_none(),
            sliding,
        };
        if config.rope_dims > head_dim || config.rope_dims % 2 != 0 {
            return Err(GgufError::BadMetadata {
                key: key("rope.dimension_count"),
                problem: format!(
                    "{} rotated dimensions in heads of {head_dim}",
                    config.rope_dims
                ),
            });
        }
        config.check_tensors(file)?;
        Ok(config)
    }

    /// Every tensor the architecture needs, in ggml order (`[in, out]` for a projection), with
    /// what in the metadata implies its shape.
    fn expected(&self, file: &Gguf) -> Vec<(String, Vec<usize>)> {
        let (h, f, d) = (self.hidden, self.ffn, self.head_dim);
        let (q, kv) = (self.heads * d, self.kv_heads * d);
        let mut all = vec![
            ("token_embd.weight".to_string(), vec![h, self.vocab]),
            ("output_norm.weight".into(), vec![h]),
        ];
        if !self.tied_embeddings || self.architecture == Architecture::Phi3 {
            all.push(("output.weight".into(), vec![h, self.vocab]));
        }
        for i in 0..self.layers {
            let mut layer: Vec<(&str, Vec<usize>)> = vec![
                ("attn_norm.weight", vec![h]),
                ("attn_output.weight", vec![q, h]),
                ("ffn_down.weight", vec![f, h]),
                ("ffn_norm.weight", vec![h]),
            ];
            let fused_qkv = file.tensor(&format!("blk.{i}.attn_qkv.weight")).is_some();
            match (self.architecture, fused_qkv) {
                (Architecture::Phi3, true) => layer.push(("attn_qkv.weight", vec![h, q + 2 * kv])),
                _ => layer.extend([
                    ("attn_q.weight", vec![h, q]),
                    ("attn_k.weight", vec![h, kv]),
                    ("attn_v.weight", vec![h, kv]),
                ]),
            }
            match self.architecture {
                Architecture::Phi3 => layer.push(("ffn_up.weight", vec![h, 2 * f])),
                _ => layer.extend([
                    ("ffn_gate.weight", vec![h, f]),
                    ("ffn_up.weight", vec![h, f]),
                ]),
            }
            if self.architecture == Architecture::Qwen2 {
                layer.extend([
                    ("attn_q.bias", vec![q]),
                    ("attn_k.bias", vec![kv]),
                    ("attn_v.bias", vec![kv]),
                ]);
            }
            if self.architecture == Architecture::Gemma3 {
                layer.extend([
                    ("attn_q_norm.weight", vec![d]),
                    ("attn_k_norm.weight", vec![d]),
                    ("post_attention_norm.weight", vec![h]),
                    ("post_ffw_norm.weight", vec![h]),
                ]);
            }
            all.extend(
                layer
                    .into_iter()
                    .map(|(n, dims)| (format!("blk.{i}.{n}"), dims)),
            );
        }
        all
    }

    fn check_tensors(&self, file: &Gguf) -> Result<(), GgufError> {
        let arch = self.architecture.name();
        let implied = format!(
            "{arch} metadata: {} layers, hidden {}, ffn {}, {} heads and {} key/value heads of {}, vocabulary {}",
            self.layers, self.hidden, self.ffn, self.heads, self.kv_heads, self.head_dim, self.vocab
        );
        for (name, dims) in self.expected(file) {
            let tensor: &TensorInfo = file.tensor(&name).ok_or_else(|| GgufError::BadTensor {
                tensor: name.clone(),
                problem: format!("is missing, and a {arch} model needs it"),
            })?;
            let found: Vec<usize> = tensor.dims.iter().map(|&d| d as usize).collect();
            if found != dims {
                return Err(GgufError::BadTensor {
                    tensor: name,
                    problem: format!(
                        "has dims {found:?} where the metadata says {dims:?} ({implied})"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Whether layer `i` attends to the whole context (always, but in sliding-window models).
    pub fn is_global(&self, layer: usize) -> bool {
        self.sliding.as_ref().is_none_or(|s| s.global[layer])
    }
}

/// Gemma 3's global layers: the metadata's pattern (a period, or one bool per layer, true where
/// the layer slides), else llama.cpp's: every sixth layer is global.
fn global_layers(file: &Gguf, key: &str, layers: usize) -> Result<Vec<bool>, GgufError> {
    let bad = |problem: String| GgufError::BadMetadata {
        key: key.into(),
        problem,
    };
    match file.get(key) {
        None => Ok((0..layers).map(|i| i % 6 == 5).collect()),
        Some(Value::Array(flags)) => {
            let sliding: Option<Vec<bool>> = flags.iter().map(Value::as_bool).collect();
            match sliding {
                Some(s) if s.len() == layers => Ok(s.into_iter().map(|slides| !slides).collect()),
                _ => Err(bad(format!(
                    "is not one bool for each of the {layers} layers"
                ))),
            }
        }
        Some(v) => match v.as_u64() {
            Some(period) if period > 0 => Ok((0..layers)
                .map(|i| i as u64 % period == period - 1)
                .collect()),
            _ => Err(bad(format!(
                "{v:?} is neither a period nor one bool per layer"
            ))),
        },
    }
}
