//! An execution context: runs the decoder step by step and keeps its KV cache.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::eval as eval_node;

use crate::model::{InputKind, Model};
use crate::ops::kv_attention::KvCache;
use crate::{names, EngineError, Tensor};

/// A stateful run of one model: the KV cache lives here, never in the caller.
pub struct Session {
    model: Arc<Model>,
    /// KV cache of a model whose graph concatenates it, indexed `layer * 2 + (value as usize)`,
    /// each [1, kv_heads, cached, head_dim]. Empty when the model keeps it in place, in the
    /// attention ops' state (`state`; [`Model::kv_in_place`]).
    past: Vec<TValue>,
    /// Tokens in the cache (the position of the next token).
    cached: usize,
    /// For each model output: the cache slot it refills, if it is a `present.*` tensor.
    present_slot: Vec<Option<usize>>,
    logits_output: Option<usize>,
    /// The plan's run state, kept across steps (built once, not per token).
    state: Option<TypedSimpleState>,
    /// Per-node timings, when profiling is on (see [`Session::set_profiling`]).
    profile: Option<Profile>,
    /// The most tokens one run of the plan takes (see [`PREFILL_CHUNK`]).
    chunk: usize,
    /// This session among the model's others, for batching ([`crate::batching`]).
    batch_id: u64,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.model.batcher.forget(self.batch_id);
    }
}

/// Tokens per run of the plan in a long prefill. A run's temporaries grow with the tokens it takes
/// times the tokens it attends to (the causal mask and the attention scores, `[S, T]` per head):
/// a 7,892-token prompt in one run took +1.4 GB. In chunks they stay under ~20 MB per head at an
/// 8k context, so a prompt's memory is its KV cache; the matrix products still see hundreds of rows
/// at a time. Every row is computed the same way in any chunk (masked keys add exact zeros), so the
/// logits do not depend on the chunk size.
pub const PREFILL_CHUNK: usize = 512;

/// The next session's [`Session::batch_id`].
static NEXT_BATCH_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Time spent in one node of the plan over the profiled steps.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct NodeTime {
    pub name: String,
    /// The op's name and its output shape, e.g. `EinSum [1,1,576]`.
    pub op: String,
    pub calls: u64,
    pub total: Duration,
}

/// Per-node timings collected by a profiling session (a profiling aid: examples/profile.rs).
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub nodes: HashMap<usize, NodeTime>,
    /// Wall time of the profiled `execute` calls (plan run included).
    pub total: Duration,
}

fn slot(layer: usize, value: bool) -> usize {
    // Saturating: a `present.N.*` output may carry any N (one beyond the cache is ignored).
    layer.saturating_mul(2).saturating_add(value as usize)
}

fn present_slot(name: &str) -> Option<usize> {
    let (layer, kind) = name.strip_prefix(names::PRESENT_PREFIX)?.split_once('.')?;
    Some(slot(layer.parse().ok()?, kind == "value"))
}

impl Session {
    pub fn new(model: Arc<Model>) -> Session {
        let present_slot = model.output_names.iter().map(|n| present_slot(n)).collect();
        let logits_output = model.output_names.iter().position(|n| n == names::LOGITS);
        let mut s = Session {
            model,
            past: vec![],
            cached: 0,
            present_slot,
            logits_output,
            state: None,
            profile: None,
            chunk: PREFILL_CHUNK,
            batch_id: NEXT_BATCH_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        s.reset();
        s
    }

    /// Starts (or stops) timing every node of the plan on the following steps.
    #[doc(hidden)]
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = if on { Some(Profile::default()) } else { None };
    }

    /// Sets the most tokens one run of the plan takes (default [`PREFILL_CHUNK`]; tests and
    /// benchmarks compare sizes).
    #[doc(hidden)]
    pub fn set_prefill_chunk(&mut self, tokens: usize) {
        self.chunk = tokens.max(1);
    }

    /// The timings collected since profiling was turned on; starts a fresh collection.
    #[doc(hidden)]
    pub fn take_profile(&mut self) -> Option<Profile> {
        self.profile.as_mut().map(std::mem::take)
    }

    /// Tokens currently in the KV cache.
    pub fn cached_len(&self) -> usize {
        self.cached
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Empties the KV cache.
    pub fn reset(&mut self) {
        self.cached = 0;
        if self.model.kv_in_place() {
            self.past = vec![];
            self.for_each_cache(|_, c| *c = KvCache::default());
            return;
        }
        let info = self.model.info();
        let shape = [1, info.kv_heads, 0, info.head_dim];
        self.past = (0..info.layers * 2)
            .map(|_| {
                tract_onnx::prelude::Tensor::zero::<f32>(&shape)
                    .expect("an empty tensor always allocates")
                    .into_tvalue()
            })
            .collect();
        self.cached = 0;
    }

    /// Drops cache entries from position `len` on.
    pub fn truncate(&mut self, len: usize) -> Result<(), EngineError> {
        if len >= self.cached {
            return Ok(());
        }
        if len == 0 {
            self.reset();
            return Ok(());
        }
        if self.model.kv_in_place() {
            self.for_each_cache(|_, c| c.truncate(len));
            self.cached = len;
            return Ok(());
        }
        for t in &mut self.past {
            *t = t
                .slice(2, 0, len)
                .map_err(|e| EngineError::Runtime(format!("{e:#}")))?
                .into();
        }
        self.cached = len;
        Ok(())
    }

    /// Runs one step.
    ///
    /// Stateful (no `past_key_values.*` among `inputs`): `input_ids` [1, S] and optionally
    /// `position_ids` [1, S] (consecutive, starting at or below the cached length; below rewinds).
    /// Returns only `logits` [1, 1, vocab] for the last position.
    ///
    /// Stateless (`past_key_values.*` given): every model input must be given; returns every output.
    pub fn run(
        &mut self,
        inputs: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>, EngineError> {
        let stateless = inputs
            .iter()
            .any(|(n, _)| n.starts_with(names::PAST_KEY_VALUES_PREFIX));
        for (name, _) in &inputs {
            // A stateful run's positions follow from the cache, which the session keeps: a
            // model that derives them itself (Optimum's Gemma 3 export) still takes them, to
            // rewind.
            let implied = !stateless && name == names::POSITION_IDS;
            if !self.model.input_names.contains(name) && !implied {
                return Err(EngineError::InvalidInput(format!(
                    "the model has no input '{name}' (inputs: {})",
                    summarize(&self.model.input_names)
                )));
            }
        }
        if stateless {
            self.run_stateless(inputs)
        } else {
            self.run_stateful(inputs)
        }
    }

    fn run_stateless(
        &mut self,
        inputs: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>, EngineError> {
        let mut ordered = Vec::with_capacity(self.model.input_names.len());
        let mut sizes = HashMap::new();
        for (i, name) in self.model.input_names.iter().enumerate() {
            let (_, t) = inputs.iter().find(|(n, _)| n == name).ok_or_else(|| {
                EngineError::InvalidInput(format!(
                    "missing input '{name}' (stateless call: give every input)"
                ))
            })?;
            let t = t.to_tract()?;
            // A model keeping its cache in place takes past tensors of any width (a session's
            // are 0 wide): a caller's must be whole.
            let head_dim = self.model.info().head_dim;
            if matches!(self.model.input_kinds[i], InputKind::Past { .. })
                && self.model.kv_in_place()
                && t.shape().last() != Some(&head_dim)
            {
                return Err(EngineError::InvalidInput(format!(
                    "{name}: {:?}, the model takes [batch, kv_heads, past, {head_dim}]",
                    t.shape()
                )));
            }
            let fact = self.model.plan.model().input_fact(i);
            check_fact(name, &t, fact.map_err(runtime)?, &mut sizes)?;
            ordered.push(t.into_tvalue());
        }
        if self.model.rows_node.is_some() {
            self.check_packed_positions(&inputs)?;
        }
        let outputs = self.execute(ordered.into())?;
        self.model
            .output_names
            .iter()
            .zip(outputs.iter())
            .map(|(n, t)| Ok((n.clone(), Tensor::from_tract(t)?)))
            .collect()
    }

    /// A graph rewritten for packed runs ([`crate::onnx::packing`]) masks by `position_ids`,
    /// where the export masked by the past length: a stateless call's positions must be that
    /// range, or the two would differ.
    fn check_packed_positions(&self, inputs: &[(String, Tensor)]) -> Result<(), EngineError> {
        let get = |name: &str| inputs.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let past = inputs
            .iter()
            .find(|(n, _)| n.starts_with(names::PAST_KEY_VALUES_PREFIX))
            .and_then(|(_, t)| t.dims.get(2).copied())
            .unwrap_or(0);
        let Some(positions) = get(names::POSITION_IDS).and_then(Tensor::to_i64) else {
            return Ok(());
        };
        if positions
            .iter()
            .enumerate()
            .any(|(i, &p)| p != (past + i) as i64)
        {
            return Err(EngineError::InvalidInput(format!(
                "{} must count on from the past length ({past}): this model's mask follows them",
                names::POSITION_IDS
            )));
        }
        Ok(())
    }

    fn run_stateful(
        &mut self,
        inputs: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>, EngineError> {
        let get = |name: &str| inputs.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let ids_t = get(names::INPUT_IDS).ok_or_else(|| {
            EngineError::InvalidInput(format!("missing input '{}'", names::INPUT_IDS))
        })?;
        let ids = int_row(ids_t, names::INPUT_IDS)?;
        let start = match get(names::POSITION_IDS) {
            Some(p) => {
                let pos = int_row(p, names::POSITION_IDS)?;
                if pos.len() != ids.len() {
                    return Err(EngineError::InvalidInput(format!(
                        "{} has {} entries, {} {}",
                        names::POSITION_IDS,
                        pos.len(),
                        names::INPUT_IDS,
                        ids.len()
                    )));
                }
                let start = pos[0];
                if start < 0 || pos.iter().enumerate().any(|(i, &p)| p != start + i as i64) {
                    return Err(EngineError::InvalidInput(format!(
                        "{} must be consecutive and non-negative",
                        names::POSITION_IDS
                    )));
                }
                start as usize
            }
            None => self.cached,
        };
        if start > self.cached {
            return Err(EngineError::InvalidInput(format!(
                "position {start} skips ahead of the {} cached tokens",
                self.cached
            )));
        }
        self.truncate(start)?;

        let vocab = self.model.info().vocab as i64;
        if let Some(bad) = ids.iter().find(|&&t| t < 0 || (vocab > 0 && t >= vocab)) {
            return Err(EngineError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (0..{vocab})"
            )));
        }
        if self.model.kv_in_place() {
            let total = start + ids.len();
            // Values are as wide as keys in every export we take (`past_value` has `past_key`'s
            // shape); a cache meeting other widths refuses the write.
            let (heads, d) = (self.model.info().kv_heads, self.model.info().head_dim);
            self.state()?;
            self.for_each_cache(|_, c| c.reserve(total, heads, d, d));
        }
        if self.model.packs_sequences() {
            return self.run_batched(&ids, start);
        }
        // int_row refused an empty row: there is at least one chunk.
        let mut logits = None;
        for (c, chunk) in ids.chunks(self.chunk).enumerate() {
            logits = Some(self.run_chunk(chunk, start + c * self.chunk)?);
        }
        let logits = logits.expect("at least one chunk");
        Ok(vec![(names::LOGITS.to_string(), last_position(&logits)?)])
    }

    /// Runs `ids` from `start` (the cached length) in steps shared with the model's other
    /// sessions ([`crate::batching`]); the logits of the last token, as [`Self::run`] returns them.
    fn run_batched(
        &mut self,
        ids: &[i64],
        start: usize,
    ) -> Result<Vec<(String, Tensor)>, EngineError> {
        let model = self.model.clone();
        let mut done = 0;
        loop {
            let (ran, logits) = model.batcher.step(self, &ids[done..], start + done)?;
            done += ran;
            if done == ids.len() {
                return Ok(vec![(names::LOGITS.to_string(), logits)]);
            }
        }
    }

    /// This session's key among the model's sessions.
    pub(crate) fn batch_id(&self) -> u64 {
        self.batch_id
    }

    /// The most tokens one run of the plan takes.
    pub(crate) fn prefill_chunk(&self) -> usize {
        self.chunk
    }

    /// One run of the plan on `ids` at `start` (the cached length) for this session alone;
    /// the logits of the last token.
    pub(crate) fn run_alone(&mut self, ids: &[i64], start: usize) -> Result<Tensor, EngineError> {
        last_position(&self.run_chunk(ids, start)?)
    }

    /// Moves the in-place KV cache out, layer by layer (for a packed run).
    pub(crate) fn take_caches(&mut self) -> Vec<KvCache> {
        let mut caches = vec![];
        self.for_each_cache(|_, c| caches.push(std::mem::take(c)));
        caches
    }

    /// Puts back the caches [`Self::take_caches`] took, now `cached` tokens long.
    pub(crate) fn put_caches(&mut self, caches: Vec<KvCache>, cached: usize) {
        let mut caches = caches.into_iter();
        self.for_each_cache(|_, c| *c = caches.next().unwrap_or_default());
        self.cached = cached;
    }

    /// One run of the plan on `ids` at positions `start..`, right after the cached tokens; keeps
    /// the new KV cache and returns the logits output.
    fn run_chunk(&mut self, ids: &[i64], start: usize) -> Result<TValue, EngineError> {
        debug_assert_eq!(start, self.cached);
        let n = ids.len();
        let total = start + n;
        // Refused before any cache slot is moved out below.
        if self.model.input_kinds.contains(&InputKind::Other) {
            return Err(EngineError::InvalidInput(
                "the model has inputs this engine cannot fill".into(),
            ));
        }
        let in_place = self.model.kv_in_place();
        let kv_heads = self.model.info().kv_heads;
        let mut ordered: TVec<TValue> = tvec![];
        for kind in &self.model.input_kinds {
            let value: TValue = match kind {
                InputKind::InputIds => tract_ndarray::Array2::from_shape_vec((1, n), ids.to_vec())
                    .unwrap()
                    .into_tvalue(),
                InputKind::PositionIds => {
                    tract_ndarray::Array2::from_shape_fn((1, n), |(_, i)| (start + i) as i64)
                        .into_tvalue()
                }
                InputKind::AttentionMask => {
                    tract_ndarray::Array2::<i64>::ones((1, total)).into_tvalue()
                }
                // In place: the ops hold the cache; the input carries only its length (for the
                // causal mask), in a tensor of width 0.
                InputKind::Past { .. } if in_place => {
                    tract_onnx::prelude::Tensor::zero::<f32>(&[1, kv_heads, start, 0])
                        .map_err(runtime)?
                        .into_tvalue()
                }
                // Moved, not shared: the plan frees each layer's old cache right after that
                // layer's Concat, so a step holds about one cache, not the old and the new whole.
                InputKind::Past { layer, value } => {
                    std::mem::replace(&mut self.past[slot(*layer, *value)], empty_tvalue())
                }
                InputKind::Other => unreachable!("refused above"),
            };
            ordered.push(value);
        }
        let outputs = match self.execute(ordered) {
            Ok(outputs) => outputs,
            Err(e) => {
                // The cache went into the failed run.
                self.reset();
                return Err(e);
            }
        };
        let mut logits = None;
        for (i, out) in outputs.into_iter().enumerate() {
            if let Some(s) = self.present_slot[i] {
                // (In place, `present.*` are empty and `past` is too.)
                if s < self.past.len() {
                    self.past[s] = out;
                }
            } else if Some(i) == self.logits_output {
                logits = Some(out);
            }
        }
        self.cached = total;
        logits.ok_or_else(|| {
            EngineError::Runtime(format!("the model has no '{}' output", names::LOGITS))
        })
    }

    fn execute(&mut self, inputs: TVec<TValue>) -> Result<TVec<TValue>, EngineError> {
        self.state()?;
        let state = self.state.as_mut().expect("spawned above");
        let run = run_plan(state, inputs, self.profile.as_mut());
        match run {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => {
                // A failed run leaves the state mid-turn: start the next one afresh.
                self.state = None;
                Err(EngineError::Runtime(format!("{e:#}")))
            }
            Err(_) => {
                self.state = None;
                Err(EngineError::Runtime(
                    "the inference engine panicked on these inputs".into(),
                ))
            }
        }
    }
}

impl Session {
    /// The plan's run state, spawned on first use.
    fn state(&mut self) -> Result<&mut TypedSimpleState, EngineError> {
        if self.state.is_none() {
            self.state = Some(self.model.plan.spawn().map_err(runtime)?);
        }
        Ok(self.state.as_mut().expect("spawned above"))
    }

    /// Calls `f(layer, cache)` on each layer's in-place cache (none before the state exists, when
    /// every cache is empty anyway).
    fn for_each_cache(&mut self, mut f: impl FnMut(usize, &mut KvCache)) {
        let Some(state) = self.state.as_mut() else {
            return;
        };
        for (layer, &node) in self.model.kv_nodes.iter().enumerate() {
            let cache = state.op_states[node]
                .as_mut()
                .and_then(|s| s.downcast_mut::<KvCache>());
            if let Some(cache) = cache {
                f(layer, cache);
            }
        }
    }
}

/// One run of the plan on `state`, timing every node into `profile` if there is one. A panic
/// inside tract (an op meeting input it did not expect) is caught: it must not take the host
/// down.
pub(crate) fn run_plan(
    state: &mut TypedSimpleState,
    inputs: TVec<TValue>,
    profile: Option<&mut Profile>,
) -> std::thread::Result<TractResult<TVec<TValue>>> {
    let started = Instant::now();
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match profile {
        None => state.run(inputs),
        Some(p) => {
            let out = state.run_plan_with_eval(inputs, |ctx, op_state, node, inputs| {
                let t = Instant::now();
                let out = eval_node(ctx, op_state, node, inputs);
                let dt = t.elapsed();
                let entry = p.nodes.entry(node.id).or_insert_with(|| NodeTime {
                    name: node.name.clone(),
                    op: format!(
                        "{} {:?}",
                        node.op().name(),
                        out.as_ref()
                            .ok()
                            .and_then(|o| o.first().map(|t| t.shape().to_vec()))
                    ),
                    calls: 0,
                    total: Duration::ZERO,
                });
                entry.calls += 1;
                entry.total += dt;
                out
            });
            p.total += started.elapsed();
            out
        }
    }));
    run
}

/// A placeholder for a cache slot whose tensor is in a run.
fn empty_tvalue() -> TValue {
    tract_onnx::prelude::Tensor::zero::<f32>(&[0])
        .expect("an empty tensor always allocates")
        .into_tvalue()
}

fn runtime(e: TractError) -> EngineError {
    EngineError::Runtime(format!("{e:#}"))
}

/// A stateless call's tensor against the model's input `name`: its element type, its rank, the
/// dims the model fixes, and one size per named dim (`batch`, `past_sequence_length`) across the
/// inputs (`sizes`: those seen so far). tract would reject these mid-run, as an engine error;
/// they are the caller's.
fn check_fact<'a>(
    name: &'a str,
    t: &tract_onnx::prelude::Tensor,
    fact: &TypedFact,
    sizes: &mut HashMap<Symbol, (usize, &'a str)>,
) -> Result<(), EngineError> {
    let wrong = || {
        EngineError::InvalidInput(format!(
            "{name}: {:?} {:?}, the model takes {:?} {:?}",
            t.datum_type(),
            t.shape(),
            fact.datum_type,
            fact.shape
        ))
    };
    if t.datum_type() != fact.datum_type || t.rank() != fact.rank() {
        return Err(wrong());
    }
    for (&got, want) in t.shape().iter().zip(fact.shape.iter()) {
        match want {
            TDim::Val(v) if usize::try_from(*v) != Ok(got) => return Err(wrong()),
            TDim::Sym(s) => match sizes.get(s) {
                Some(&(size, other)) if size != got => {
                    return Err(EngineError::InvalidInput(format!(
                        "{name}: dimension {s} is {got}, but {size} in {other}"
                    )))
                }
                Some(_) => {}
                None => {
                    sizes.insert(s.clone(), (got, name));
                }
            },
            _ => {}
        }
    }
    Ok(())
}

/// Logits of the last position as [1, 1, vocab], whether the model returned one position or all.
fn last_position(logits: &TValue) -> Result<Tensor, EngineError> {
    let shape = logits.shape();
    let vocab = *shape.last().unwrap_or(&0);
    let rows = if vocab == 0 { 0 } else { logits.len() / vocab };
    if rows == 0 {
        return Err(EngineError::Runtime(format!("logits have shape {shape:?}")));
    }
    let view = logits
        .cast_to::<f32>()
        .map_err(|e| EngineError::Runtime(format!("{e:#}")))?;
    let plain = view
        .try_as_plain_ram()
        .map_err(|e| EngineError::Runtime(format!("{e:#}")))?;
    let all = plain
        .as_slice::<f32>()
        .map_err(|e| EngineError::Runtime(format!("{e:#}")))?;
    Ok(Tensor::from_f32(
        vec![1, 1, vocab],
        &all[(rows - 1) * vocab..rows * vocab],
    ))
}

/// The values of a [1, S] (S >= 1) integer tensor.
fn int_row(t: &Tensor, name: &str) -> Result<Vec<i64>, EngineError> {
    let values = t.to_i64().ok_or_else(|| {
        EngineError::InvalidInput(format!("{name} must be i64, got {:?}", t.dtype))
    })?;
    if t.dims.len() != 2 || t.dims[0] != 1 || t.dims[1] == 0 || values.len() != t.dims[1] {
        return Err(EngineError::InvalidInput(format!(
            "{name} must have shape [1, seq] with seq >= 1, got {:?}",
            t.dims
        )));
    }
    Ok(values)
}

fn summarize(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(4).map(String::as_str).collect();
    if names.len() > 4 {
        format!("{}, ... ({} in all)", shown.join(", "), names.len())
    } else {
        shown.join(", ")
    }
}

/// A session's KV cache at one moment, shared without copying (tensors and in-place buffers are
/// reference-counted; a session copies a shared buffer before it writes to it): what a prefix
/// cache keeps to seed later sessions that start with the same tokens.
#[derive(Clone)]
pub struct KvSnapshot {
    /// The tensors of a model whose graph concatenates the cache.
    past: Vec<TValue>,
    /// The layers' buffers of a model that keeps it in place.
    layers: Vec<KvCache>,
    len: usize,
}

impl KvSnapshot {
    /// Tokens covered.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the KV tensors.
    pub fn bytes(&self) -> usize {
        let tensors: usize = self
            .past
            .iter()
            .map(|t| t.len() * t.datum_type().size_of())
            .sum();
        tensors + self.layers.iter().map(KvCache::bytes).sum::<usize>()
    }
}

impl Session {
    /// The KV cache as it is now (no copy).
    pub fn snapshot(&mut self) -> KvSnapshot {
        let mut layers = vec![];
        self.for_each_cache(|_, c| layers.push(c.clone()));
        KvSnapshot {
            past: self.past.clone(),
            layers,
            len: self.cached,
        }
    }

    /// Replaces the KV cache with the first `len` positions of `snapshot` (taken from a session
    /// of the same model). The next step continues at position `len`.
    pub fn restore(&mut self, snapshot: &KvSnapshot, len: usize) -> Result<(), EngineError> {
        let layers = self.model.kv_nodes.len();
        let fits = if self.model.kv_in_place() {
            snapshot.layers.len() == layers || snapshot.len == 0
        } else {
            snapshot.past.len() == self.past.len()
        };
        if len > snapshot.len || !fits {
            return Err(EngineError::InvalidInput(format!(
                "a KV snapshot of {} tokens and {} tensors cannot seed {len} tokens of this model",
                snapshot.len,
                snapshot.past.len() + snapshot.layers.len() * 2
            )));
        }
        if self.model.kv_in_place() {
            self.state()?;
            self.for_each_cache(|layer, c| {
                *c = snapshot.layers.get(layer).cloned().unwrap_or_default();
            });
        } else {
            self.past = snapshot.past.clone();
        }
        self.cached = snapshot.len;
        self.truncate(len)
    }
}
