//! GGUF to the ONNX model the engine runs, in Rust: the port of scripts/slmconv (issue 14).
//!
//! [`onnx_model`] builds the decoder graph of a llama, qwen2 or phi3 GGUF with its block
//! matrices as the file has them ([`EXACT_MATRIX_TYPES`]) and an int8 embedding: for a Q4_1
//! llama, the same graph, node for node and byte for byte, as `slmconv gguf --layouts q4_1`
//! writes (tests/convert.rs); qwen2 adds its q/k/v
//! biases, phi3 splits its fused projections (tests/faithful.rs checks all three against
//! llama.cpp). Other architectures and matrix
//! types are refused by name until they are built here. [`write_model_dir`] writes the whole model
//! directory: `model.onnx`, `config.json`, `generation_config.json` and the tokenizer files.

mod builder;
mod llama;
mod model_dir;
mod quant;

pub use model_dir::{config_json, generation_config, write_model_dir, write_model_dir_with};
use slm_gguf::{Architecture, GgmlType, Gguf, GgufError, ModelConfig};
use thiserror::Error;
pub use tract_onnx::pb;

#[derive(Debug, Error)]
pub enum ConvertError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("the {0} architecture does not convert yet (supported: llama, qwen2, phi3, gemma3)")]
    Architecture(&'static str),
    #[error("tensor '{0}' is missing")]
    Missing(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("cannot write the model directory: {0}")]
    Io(#[from] std::io::Error),
}

/// What this converter writes, as a number: bumped whenever the model directory it writes for
/// the same GGUF changes, so caches of converted models (keyed by the GGUF's content and this)
/// never serve an old conversion.
pub const FORMAT_VERSION: u32 = 3;

/// Told how far a conversion is: `(done, total)` steps (a step is a decoder layer, the embedding
/// or the final write).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// How the embedding table is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TableLayout {
    /// A tied table in int8 blocks (Q8_0, Q5_0, Q6_K) as the file holds it, exactly and once
    /// (the LM head's 8-bit `MatMulNBits` and a `GatherBlocks` read it); other tables as int8 rows.
    #[default]
    Exact,
    /// int8 rows with a scale each, whatever the file holds: scripts/slmconv's layout, which
    /// rounds a Q8_0 table (kept to compare the two converters graph for graph).
    Int8Rows,
}

/// The decoder graph of `file`, with its weights.
pub fn onnx_model(file: &Gguf) -> Result<pb::ModelProto, ConvertError> {
    onnx_model_with(file, &mut |_, _| {})
}

/// [`onnx_model`], telling `progress` as each layer is built.
pub fn onnx_model_with(file: &Gguf, progress: Progress) -> Result<pb::ModelProto, ConvertError> {
    build(
        file,
        &ModelConfig::read(file)?,
        TableLayout::Exact,
        progress,
    )
}

/// [`onnx_model`] with the embedding table in `layout`.
pub fn onnx_model_in(file: &Gguf, layout: TableLayout) -> Result<pb::ModelProto, ConvertError> {
    build(file, &ModelConfig::read(file)?, layout, &mut |_, _| {})
}

/// The graph of `file` with its `config` read, once the converter has checked it can build it.
fn build(
    file: &Gguf,
    config: &ModelConfig,
    layout: TableLayout,
    progress: Progress,
) -> Result<pb::ModelProto, ConvertError> {
    check_supported(config)?;
    check_tensor_types(file, config)?;
    llama::build(file, config, layout, progress)
}

/// The matrix types this converter holds exactly: their blocks become the engine's 4-bit blocks
/// (Q4_0, Q4_1, Q4_K), int8 blocks (Q8_0, Q5_0, Q6_K, Q3_K) or int8 blocks with offsets (Q5_1,
/// Q5_K, Q2_K) with the file's own scales; float matrices (F32, F16, BF16) become f32. Every type
/// `slm-gguf` reads.
pub const EXACT_MATRIX_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Every layer's block matrix is of a type in [`EXACT_MATRIX_TYPES`].
pub fn check_tensor_types(file: &Gguf, config: &ModelConfig) -> Result<(), ConvertError> {
    // Phi-3's fused qkv stands for q, k and v; its fused gate/up (`ffn_up`) for both.
    const MATRICES: [&str; 8] = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_qkv",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    for layer in 0..config.layers {
        for matrix in MATRICES {
            let name = format!("blk.{layer}.{matrix}.weight");
            // ModelConfig::read checked that the architecture's matrices are all there.
            let Some(tensor) = file.tensor(&name) else {
                continue;
            };
            if !EXACT_MATRIX_TYPES.contains(&tensor.kind) {
                return Err(inexact_type(&name, tensor.kind));
            }
        }
    }
    Ok(())
}

fn inexact_type(name: &str, kind: GgmlType) -> ConvertError {
    let exact: Vec<&str> = EXACT_MATRIX_TYPES.iter().map(|t| t.name()).collect();
    ConvertError::Unsupported(format!(
        "tensor '{name}' is {}, which does not convert exactly yet (block matrices convert from {}; \
         re-quantizing would change the model's weights)",
        kind.name(),
        exact.join(", ")
    ))
}

/// Steps a conversion of `config` reports: the embedding, each layer, and the write.
pub fn progress_steps(config: &ModelConfig) -> usize {
    config.layers + 2
}

/// What this converter builds today: llama, qwen2 and phi3 graphs (full-width RoPE) whose
/// matrices are whole blocks of [`EXACT_MATRIX_TYPES`].
pub fn check_supported(config: &ModelConfig) -> Result<(), ConvertError> {
    if !matches!(
        config.architecture,
        Architecture::Llama | Architecture::Qwen2 | Architecture::Phi3 | Architecture::Gemma3
    ) {
        return Err(ConvertError::Architecture(config.architecture.name()));
    }
    if config.rope_dims != config.head_dim {
        return Err(ConvertError::Unsupported(format!(
            "RoPE on {} of each head's {} dimensions (partial rotary) does not convert yet",
            config.rope_dims, config.head_dim
        )));
    }
    if config.hidden % 32 != 0 || config.ffn % 32 != 0 || (config.heads * config.head_dim) % 32 != 0
    {
        return Err(ConvertError::Unsupported(format!(
            "matrix widths {}, {} and {} must be whole blocks of 32 for the Q4_1 layout",
            config.hidden,
            config.ffn,
            config.heads * config.head_dim
        )));
    }
    Ok(())
}
