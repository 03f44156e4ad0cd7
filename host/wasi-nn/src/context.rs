//! The stateful execution context: one engine session (its KV cache) per wasi:nn
//! `graph-execution-context`, shared by both wasi:nn implementations.
//!
//! A step sends only the new `input_ids` (and `position_ids`); the session appends to its KV
//! cache and returns the last position's `logits`. With a [`PrefixCache`] (the native host), a
//! multi-token step first restores the longest cached prefix of the context's tokens and computes
//! only the rest, and reports how many tokens it reused as the `cached_tokens` output.

use std::sync::Arc;

use slm_engine::{Model, Session, Tensor};

use crate::names::{CACHED_TOKENS, INPUT_IDS, POSITION_IDS};
use crate::{catch_panic, NnError, NnTensor, PrefixCache};

pub struct ExecContext {
    session: Session,
    vocab: usize,
    /// Set when the engine panicked: its state can no longer be trusted.
    broken: bool,
    /// The token ids in the session's KV cache (what the prefix cache is keyed by).
    tokens: Vec<i64>,
    prefix: Option<Arc<PrefixCache>>,
}

/// A stateful step: the token ids sent and the position of the first.
struct TokenStep {
    ids: Vec<i64>,
    start: usize,
}

type Named<T> = Vec<(String, T)>;

impl ExecContext {
    /// A context on `model`; `prefix`: the model's prefix cache, if the host keeps one.
    pub fn new(model: Arc<Model>, prefix: Option<Arc<PrefixCache>>) -> Self {
        ExecContext {
            vocab: model.info().vocab,
            session: Session::new(model),
            broken: false,
            tokens: Vec::new(),
            prefix: prefix.filter(|p| p.enabled()),
        }
    }

    /// Tokens in the context's KV cache now.
    pub fn cached_len(&self) -> usize {
        self.tokens.len()
    }

    /// wasi:nn `compute` on boundary tensors.
    pub fn compute(&mut self, inputs: Named<NnTensor>) -> Result<Named<NnTensor>, NnError> {
        let inputs = inputs
            .into_iter()
            .map(|(name, t)| Ok((name, t.into_engine()?)))
            .collect::<Result<Vec<_>, NnError>>()?;
        self.run(inputs)?
            .into_iter()
            .map(|(name, t)| Ok((name, NnTensor::from_engine(t)?)))
            .collect()
    }

    /// `compute` on engine tensors. A failed step leaves the context empty (the KV cache is
    /// cleared) but usable; an engine panic leaves it unusable.
    pub fn run(&mut self, inputs: Named<Tensor>) -> Result<Named<Tensor>, NnError> {
        if self.broken {
            return Err(NnError::runtime(
                "this execution context is unusable after an engine failure; create a new one",
            ));
        }
        check_token_ids(&inputs, self.vocab)?;
        let step = self.token_step(&inputs);
        // The tokens the session holds after this step.
        let full: Option<Vec<i64>> = step.as_ref().map(|s| {
            let mut f = self.tokens[..s.start].to_vec();
            f.extend_from_slice(&s.ids);
            f
        });
        let (inputs, cached) = match (self.prefix.clone(), &step, &full) {
            (Some(cache), Some(step), Some(full)) => self.reuse_prefix(&cache, full, step, inputs),
            _ => (inputs, 0),
        };
        let session = &mut self.session;
        let result = match catch_panic(|| session.run(inputs)) {
            Ok(r) => r.map_err(NnError::from),
            Err(panic) => {
                self.broken = true;
                Err(NnError::runtime(format!(
                    "the inference engine failed: {panic}"
                )))
            }
        };
        let mut outputs = match result {
            Ok(outputs) => outputs,
            Err(e) => {
                self.tokens.clear();
                self.session.reset();
                return Err(e);
            }
        };
        self.tokens = full.unwrap_or_default();
        if let (Some(cache), Some(step)) = (&self.prefix, &step) {
            if step.ids.len() > 1 {
                cache.insert(&self.tokens, self.session.snapshot());
                outputs.push((CACHED_TOKENS.to_string(), i64_row([cached as i64])));
            }
        }
        Ok(outputs)
    }

    /// The step a stateful call makes (`input_ids` and optional `position_ids`, nothing else);
    /// None for other calls, which the prefix cache leaves alone.
    fn token_step(&self, inputs: &[(String, Tensor)]) -> Option<TokenStep> {
        let find = |name: &str| inputs.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        if inputs
            .iter()
            .any(|(n, _)| n != INPUT_IDS && n != POSITION_IDS)
        {
            return None;
        }
        let ids = find(INPUT_IDS)?.to_i64()?;
        let start = match find(POSITION_IDS) {
            Some(p) => usize::try_from(*p.to_i64()?.first()?).ok()?,
            None => self.tokens.len(),
        };
        (start <= self.tokens.len() && !ids.is_empty()).then_some(TokenStep { ids, start })
    }

    /// Seeds the session from the longest cached prefix of `full` (the tokens the session will
    /// hold after this step); returns the inputs still to compute and how many tokens the cache
    /// gave.
    fn reuse_prefix(
        &mut self,
        cache: &PrefixCache,
        full: &[i64],
        step: &TokenStep,
        inputs: Named<Tensor>,
    ) -> (Named<Tensor>, usize) {
        if step.ids.len() < 2 {
            return (inputs, 0);
        }
        let Some((kv, hit)) = cache.lookup(full) else {
            return (inputs, 0);
        };
        // The last token is always computed: its logits are the answer.
        let hit = hit.min(full.len() - 1);
        if hit <= step.start || self.session.restore(&kv, hit).is_err() {
            return (inputs, 0);
        }
        let inputs = vec![
            (INPUT_IDS.to_string(), i64_row(full[hit..].iter().copied())),
            (
                POSITION_IDS.to_string(),
                i64_row((hit as i64)..(full.len() as i64)),
            ),
        ];
        (inputs, hit - step.start)
    }
}

impl Drop for ExecContext {
    /// A finished context's tokens (prompt and answer) seed the next turn of the conversation.
    fn drop(&mut self) {
        if let Some(cache) = &self.prefix {
            if !self.broken && self.session.cached_len() == self.tokens.len() {
                cache.insert(&self.tokens, self.session.snapshot());
            }
        }
    }
}

/// Token ids must be in [0, vocab): the engine indexes the embedding table with them.
fn check_token_ids(inputs: &[(String, Tensor)], vocab: usize) -> Result<(), NnError> {
    if vocab == 0 {
        return Ok(());
    }
    for (_, t) in inputs.iter().filter(|(n, _)| n == INPUT_IDS) {
        // Other element types: the engine reports the type error.
        let Some(ids) = t.to_i64() else { continue };
        if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as u64 >= vocab as u64) {
            return Err(NnError::invalid_argument(format!(
                "invalid input: {INPUT_IDS}: token id {bad} is out of range (vocabulary size {vocab})"
            )));
        }
    }
    Ok(())
}

/// A `[1, n]` i64 tensor.
fn i64_row(values: impl IntoIterator<Item = i64>) -> Tensor {
    let values: Vec<i64> = values.into_iter().collect();
    Tensor::from_i64(vec![1, values.len()], &values)
}
