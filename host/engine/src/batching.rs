//! Continuous batching: the steps of concurrent sessions of one model run together, as one packed
//! run ([`crate::onnx::packing`]) whose rows are every waiting session's next tokens, so the
//! weights are read once per step for all of them rather than once per session.
//!
//! No scheduler thread: a session that finds no run going leads one. It takes every waiting step
//! (after waiting briefly for the other sessions active lately to come back), runs them packed,
//! hands each session its result and steps down; the others wait parked on a condition variable.
//! A session alone runs its step on its own state, as without batching.
//!
//! Prefill is interleaved: while another session decodes, a prompt advances a few tokens per run,
//! as many as keep the run within [`INTERLEAVED_SLOWDOWN`] of a run of decode steps alone (by the
//! recent runs' times), so a long prompt does not stall the streams already decoding; otherwise
//! it runs in chunks of [`crate::PREFILL_CHUNK`].
//!
//! Each row is computed as it would be alone, so a session's logits do not depend on who it ran
//! with: every op but attention and the last-rows selection treats rows independently, and those
//! two handle each sequence's rows as a run of that sequence alone would.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;

use crate::model::{InputKind, Model};
use crate::ops::kv_attention::{KvCache, PackedCaches, PackedSequence};
use crate::ops::last_rows::RowsToKeep;
use crate::session::{run_plan, Profile, Session};
use crate::{EngineError, Tensor};

/// Prompt tokens a prefilling session runs per run while another session decodes, until the runs'
/// times say how many fit [`INTERLEAVED_SLOWDOWN`] ([`Pace`]). On 2 cores each prompt row costs
/// ~1.5-2 ms against ~9 ms for a decode step: a fixed 4 made a stream's p50 inter-token latency
/// beside a 512-token prefill 1.8-2.0x its own (6: 2.25x, 16: 4.6x).
pub const INTERLEAVED_PREFILL: usize = 4;

/// How much slower than a run of decode steps alone a run with prompt rows beside them may be.
const INTERLEAVED_SLOWDOWN: f64 = 1.6;

/// How long the leader of a run waits for the other active sessions to come back with their next
/// step (between steps they sample, in their own threads or guests).
const GATHER: Duration = Duration::from_millis(2);

/// A session that has not stepped for this long is no longer waited for (a stream steps every
/// few tens of milliseconds; one that ended is forgotten when it is dropped).
const ACTIVE: Duration = Duration::from_millis(100);

/// One model's batching: the waiting steps and the packed plan state.
#[derive(Default)]
pub(crate) struct Batcher {
    queue: Mutex<Queue>,
    /// Signalled when a step is queued: the leader gathering a run waits on it.
    arrived: Condvar,
    /// Signalled when a run ends: its results are in and the lead is free.
    ended: Condvar,
    /// The plan state of packed runs; its caches and kept rows are set for each run.
    state: Mutex<Option<TypedSimpleState>>,
    /// Packed runs so far, and the sessions they carried.
    runs: AtomicU64,
    sequences: AtomicU64,
    /// Nanoseconds in packed runs.
    busy: AtomicU64,
    /// Per-node timings of packed runs, when profiling is on.
    pub(crate) profile: Mutex<Option<Profile>>,
}

/// What a model's batching has done (tests and benchmarks).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchingStats {
    /// Runs that packed two or more sessions' steps.
    pub packed_runs: u64,
    /// The steps those runs carried.
    pub packed_steps: u64,
    /// Seconds in packed runs.
    pub packed_seconds: f64,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Step>,
    finished: HashMap<u64, Finished>,
    /// Whether a session is running steps now.
    leading: bool,
    next_id: u64,
    /// Sessions that stepped within [`ACTIVE`], by [`Session::batch_id`].
    active: HashMap<u64, Active>,
    pace: Pace,
}

/// A session that stepped lately: runs wait briefly for its next step.
#[derive(Clone, Copy)]
struct Active {
    at: Instant,
    /// Its last step was one token.
    decoding: bool,
}

/// Moving averages of run times (seconds), which size the prompt rows beside decoding sessions.
#[derive(Clone, Copy, Default)]
struct Pace {
    /// A run of decode steps only.
    decode_run: f64,
    /// What each prompt row adds to a run with decode steps.
    prompt_row: f64,
}

impl Pace {
    /// Takes in a run of `seconds` with `prompt_rows` prompt tokens, and whether it had decode
    /// steps (runs of prompts alone say nothing about the cost next to a stream).
    fn observe(&mut self, seconds: f64, prompt_rows: usize, decoding: bool) {
        let average = |old: f64, new: f64| {
            if old > 0.0 {
                0.8 * old + 0.2 * new
            } else {
                new
            }
        };
        if prompt_rows == 0 {
            self.decode_run = average(self.decode_run, seconds);
        } else if decoding && self.decode_run > 0.0 {
            let row = ((seconds - self.decode_run) / prompt_rows as f64).max(1e-6);
            self.prompt_row = average(self.prompt_row, row);
        }
    }

    /// Prompt tokens per run beside decoding sessions.
    fn prompt_budget(&self, chunk: usize) -> usize {
        if self.decode_run <= 0.0 || self.prompt_row <= 0.0 {
            return INTERLEAVED_PREFILL.min(chunk);
        }
        let fits = (INTERLEAVED_SLOWDOWN - 1.0) * self.decode_run / self.prompt_row;
        (fits as usize).clamp(1, chunk.max(1))
    }
}

/// A session's next tokens, with its KV cache (moved in: the leader runs it).
struct Step {
    id: u64,
    ids: Vec<i64>,
    /// Position of `ids[0]`, the session's cached length.
    start: usize,
    caches: Vec<KvCache>,
}

struct Finished {
    caches: Vec<KvCache>,
    /// Tokens of the step that ran.
    ran: usize,
    /// Logits of the last token that ran, `[1, 1, vocab]`.
    logits: Result<Tensor, EngineError>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in a run is caught inside it: a poisoned lock still holds consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Batcher {
    /// Runs the first tokens of `ids` (at `start`, the session's cached length) for `session`,
    /// with whatever other sessions of the model are stepping now: a few while another session
    /// decodes ([`Pace`]), else a prefill chunk. Returns how
    /// many ran, and the logits of the last one.
    pub(crate) fn step(
        &self,
        session: &mut Session,
        ids: &[i64],
        start: usize,
    ) -> Result<(usize, Tensor), EngineError> {
        let me = session.batch_id();
        let mut queue = lock(&self.queue);
        let now = Instant::now();
        queue.active.retain(|_, a| now - a.at < ACTIVE);
        let others: Vec<Active> = queue
            .active
            .iter()
            .filter(|(&s, _)| s != me)
            .map(|(_, a)| *a)
            .collect();
        queue.active.insert(
            me,
            Active {
                at: now,
                decoding: ids.len() == 1,
            },
        );
        // Beside a decoding session, a prompt advances a few tokens per run.
        let beside_decoding = others.iter().any(|a| a.decoding);
        let budget = if beside_decoding {
            queue.pace.prompt_budget(session.prefill_chunk())
        } else {
            session.prefill_chunk()
        };
        // Without threads (wasm32) sessions never step at once: each runs alone.
        let alone = others.is_empty() || !cfg!(feature = "threads");
        if !queue.leading && queue.waiting.is_empty() && alone {
            queue.leading = true;
            drop(queue);
            let ran = ids.len().min(budget);
            let started = Instant::now();
            let logits = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                session.run_alone(&ids[..ran], start)
            }))
            .unwrap_or_else(|_| {
                session.reset();
                Err(EngineError::Runtime(
                    "the inference engine panicked on these inputs".into(),
                ))
            });
            let mut queue = lock(&self.queue);
            if ran == 1 {
                queue.pace.observe(started.elapsed().as_secs_f64(), 0, true);
            }
            drop(self.step_down(queue, HashMap::new()));
            return Ok((ran, logits?));
        }
        let id = queue.next_id;
        queue.next_id += 1;
        queue.waiting.push(Step {
            id,
            ids: ids[..ids.len().min(budget)].to_vec(),
            start,
            caches: session.take_caches(),
        });
        self.arrived.notify_all();
        loop {
            if let Some(done) = queue.finished.remove(&id) {
                drop(queue);
                session.put_caches(done.caches, start + done.ran);
                return match done.logits {
                    Ok(logits) => Ok((done.ran, logits)),
                    Err(e) => {
                        session.reset();
                        Err(e)
                    }
                };
            }
            if queue.leading {
                queue = self.ended.wait(queue).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            queue.leading = true;
            // Wait briefly for the other active sessions' next steps, to run them together.
            let deadline = Instant::now() + GATHER;
            loop {
                let now = Instant::now();
                let active = queue
                    .active
                    .values()
                    .filter(|a| now - a.at < ACTIVE)
                    .count();
                if queue.waiting.len() >= active || now >= deadline {
                    break;
                }
                queue = self
                    .arrived
                    .wait_timeout(queue, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let steps = std::mem::take(&mut queue.waiting);
            drop(queue);
            let ids: Vec<u64> = steps.iter().map(|s| s.id).collect();
            let prompt_rows: usize = steps.iter().map(|s| s.ids.len()).filter(|&n| n > 1).sum();
            let decoding = steps.iter().any(|s| s.ids.len() == 1);
            let started = Instant::now();
            // Whatever happens in the run, every waiting session gets an answer and the lead is
            // given up (a panic here would otherwise leave them waiting forever).
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if steps.len() == 1 {
                    // Only ours (the leader's step is always waiting): alone after all.
                    let mut step = steps.into_iter().next().expect("one step");
                    session.put_caches(std::mem::take(&mut step.caches), start);
                    let ran = step.ids.len();
                    let logits = session.run_alone(&step.ids, start);
                    let caches = session.take_caches();
                    HashMap::from([(
                        id,
                        Finished {
                            caches,
                            ran,
                            logits,
                        },
                    )])
                } else {
                    self.run_packed(session.model(), steps)
                }
            }));
            let finished = run.unwrap_or_else(|_| {
                let failed = || Finished {
                    caches: vec![],
                    ran: 0,
                    logits: Err(EngineError::Runtime(
                        "the inference engine panicked in a batched run".into(),
                    )),
                };
                ids.into_iter().map(|id| (id, failed())).collect()
            });
            queue = lock(&self.queue);
            queue
                .pace
                .observe(started.elapsed().as_secs_f64(), prompt_rows, decoding);
            queue = self.step_down(queue, finished);
        }
    }

    /// Forgets a session that will not step again (dropped), so no run waits for it.
    pub(crate) fn forget(&self, session: u64) {
        lock(&self.queue).active.remove(&session);
    }

    /// Ends a run: its results where their sessions find them, and the lead free to take.
    fn step_down<'a>(
        &self,
        mut queue: MutexGuard<'a, Queue>,
        finished: HashMap<u64, Finished>,
    ) -> MutexGuard<'a, Queue> {
        queue.finished.extend(finished);
        queue.leading = false;
        self.ended.notify_all();
        queue
    }

    pub(crate) fn stats(&self) -> BatchingStats {
        BatchingStats {
            packed_runs: self.runs.load(Ordering::Relaxed),
            packed_steps: self.sequences.load(Ordering::Relaxed),
            packed_seconds: self.busy.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }

    /// Runs `steps` (two or more sessions) as one packed run.
    fn run_packed(&self, model: &Model, mut steps: Vec<Step>) -> HashMap<u64, Finished> {
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.sequences
            .fetch_add(steps.len() as u64, Ordering::Relaxed);
        let started = Instant::now();
        let result = self.run_plan(model, &mut steps);
        self.busy
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut logits = match result {
            Ok(rows) => rows.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => steps.iter().map(|_| Err(e.clone())).collect(),
        };
        steps
            .into_iter()
            .zip(logits.drain(..))
            .map(|(step, logits)| {
                let finished = Finished {
                    ran: step.ids.len(),
                    caches: step.caches,
                    logits,
                };
                (step.id, finished)
            })
            .collect()
    }

    /// One run of the plan on every step's tokens; returns each step's last
    /// row of logits. The caches go into the attention ops' states for the run and come back.
    fn run_plan(&self, model: &Model, steps: &mut [Step]) -> Result<Vec<Tensor>, EngineError> {
        let rows_node = model
            .rows_node
            .ok_or_else(|| EngineError::Runtime("this model cannot pack sequences".into()))?;
        let n: usize = steps.iter().map(|s| s.ids.len()).sum();
        let mut ids = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        let mut last_rows = Vec::with_capacity(steps.len());
        let mut context = n;
        for step in steps.iter() {
            let end = step.start + step.ids.len();
            ids.extend_from_slice(&step.ids);
            positions.extend((step.start..end).map(|p| p as i64));
            last_rows.push(ids.len() - 1);
            context = context.max(end);
        }
        let inputs = packed_inputs(model, ids, positions, context)?;

        let mut state = lock(&self.state);
        if state.is_none() {
            *state = Some(model.plan.spawn().map_err(runtime)?);
        }
        let plan = state.as_mut().expect("spawned above");
        plan.op_states[rows_node]
            .as_mut()
            .and_then(|s| s.downcast_mut::<RowsToKeep>())
            .ok_or_else(|| EngineError::Runtime("the plan keeps no rows".into()))?
            .rows = last_rows;
        for (layer, &node) in model.kv_nodes.iter().enumerate() {
            let sequences = steps
                .iter_mut()
                .map(|step| PackedSequence {
                    cache: std::mem::take(&mut step.caches[layer]),
                    rows: step.ids.len(),
                })
                .collect();
            plan.op_states[node] = Some(Box::new(PackedCaches(sequences)));
        }
        let run = run_plan(plan, inputs, lock(&self.profile).as_mut());
        // The caches come back whatever the run did (a failed run's are dropped by their
        // sessions, which reset).
        for (layer, &node) in model.kv_nodes.iter().enumerate() {
            let packed = plan.op_states[node]
                .as_mut()
                .and_then(|s| s.downcast_mut::<PackedCaches>());
            if let Some(packed) = packed {
                for (step, seq) in steps.iter_mut().zip(packed.0.drain(..)) {
                    step.caches[layer] = seq.cache;
                }
            }
        }
        let outputs = match run {
            Ok(Ok(outputs)) => outputs,
            failed => {
                *state = None;
                return Err(match failed {
                    Ok(Err(e)) => runtime(e),
                    _ => {
                        EngineError::Runtime("the inference engine panicked on these inputs".into())
                    }
                });
            }
        };
        let logits = model
            .output_names
            .iter()
            .position(|o| o == crate::names::LOGITS)
            .and_then(|i| outputs.get(i))
            .ok_or_else(|| EngineError::Runtime("the model has no logits output".into()))?;
        split_rows(logits, steps.len())
    }
}

/// The plan's inputs for a packed run of `ids` at `positions` whose longest context is
/// `context` tokens: the causal mask spans that many keys (each sequence reads its own).
fn packed_inputs(
    model: &Model,
    ids: Vec<i64>,
    positions: Vec<i64>,
    context: usize,
) -> Result<TVec<TValue>, EngineError> {
    let n = ids.len();
    let kv_heads = model.info().kv_heads;
    let row = |v: Vec<i64>| {
        tract_ndarray::Array2::from_shape_vec((1, n), v)
            .expect("one value per row")
            .into_tvalue()
    };
    let (mut ids, mut positions) = (Some(ids), Some(positions));
    let mut inputs = tvec![];
    for kind in &model.input_kinds {
        inputs.push(match kind {
            InputKind::InputIds => row(ids.take().unwrap_or_default()),
            InputKind::PositionIds => row(positions.take().unwrap_or_default()),
            InputKind::AttentionMask => {
                tract_ndarray::Array2::<i64>::ones((1, context)).into_tvalue()
            }
            InputKind::Past { .. } => {
                tract_onnx::prelude::Tensor::zero::<f32>(&[1, kv_heads, context - n, 0])
                    .map_err(runtime)?
                    .into_tvalue()
            }
            InputKind::Other => {
                return Err(EngineError::InvalidInput(
                    "the model has inputs this engine cannot fill".into(),
                ))
            }
        });
    }
    Ok(inputs)
}

/// `[1, rows, vocab]` logits as one `[1, 1, vocab]` tensor per row.
fn split_rows(logits: &TValue, rows: usize) -> Result<Vec<Tensor>, EngineError> {
    let shape = logits.shape();
    let vocab = *shape.last().unwrap_or(&0);
    if vocab == 0 || logits.len() != rows * vocab {
        return Err(EngineError::Runtime(format!(
            "a packed run of {rows} sequences returned logits {shape:?}"
        )));
    }
    let view = logits.try_as_plain_ram().map_err(runtime)?;
    let all: &[f32] = view.as_slice().map_err(runtime)?;
    Ok(all
        .chunks(vocab)
        .map(|row| Tensor::from_f32(vec![1, 1, vocab], row))
        .collect())
}

fn runtime(e: TractError) -> EngineError {
    EngineError::Runtime(format!("{e:#}"))
}
