//! The tensor names of the decoder contract (Hugging Face / Optimum `text-generation-with-past`
//! layout). The ONNX file, the engine, both wasi:nn implementations and the generator agree on
//! these; the WIT (`wit/slm.wit`, "The wasi:nn contract") documents them for other guests.

/// Token ids of the new positions, `[batch, seq]` (i64 or i32).
pub const INPUT_IDS: &str = "input_ids";
/// Positions of `input_ids`, `[batch, seq]`. Optional; a start below the cached length rewinds
/// (truncates) the KV cache.
pub const POSITION_IDS: &str = "position_ids";
/// Accepted for exports that declare it; the engine builds the causal mask itself.
pub const ATTENTION_MASK: &str = "attention_mask";
/// The last position's logits, `[batch, 1, vocab]`.
pub const LOGITS: &str = "logits";
/// Prefix of the KV cache inputs: `past_key_values.{layer}.key|value`. A caller that passes them
/// gets stateless ONNX semantics.
pub const PAST_KEY_VALUES_PREFIX: &str = "past_key_values.";
/// Prefix of the KV cache outputs: `present.{layer}.key|value`.
pub const PRESENT_PREFIX: &str = "present.";
/// Extension output of the native host's prefix cache (i64 `[1, 1]`): how many of a prefill's
/// tokens were restored from the cache instead of computed. Only on multi-token steps of a host
/// with a prefix cache; other hosts do not return it.
pub const CACHED_TOKENS: &str = "cached_tokens";

/// `past_key_values.{layer}.{kind}` (`kind`: "key" or "value").
pub fn past_key_values(layer: usize, kind: &str) -> String {
    format!("{PAST_KEY_VALUES_PREFIX}{layer}.{kind}")
}
