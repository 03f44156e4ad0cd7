//! The completion driver: starts one completion of the generator component (a raw prompt or a
//! chat), pulls its pieces with `next()` and hands each to a [`Sink`], then reads its `summary()`.
//! The one place that walks the `completion` resource, for `slm run`, `slm chat` and `slm bench`;
//! also the rates (prefill and decode tokens/s) a summary's timings give.

use anyhow::Result;
use wasmtime::component::ResourceAny;
use wasmtime::Store;

use crate::runtime::{
    GeneratorComponent, GuestError, HostState, Message, Options, Summary, ToolCallDelta,
};

/// A store and the generator component instantiated in it.
pub type Instance = (Store<HostState>, GeneratorComponent);

/// What to complete.
#[derive(Clone, Copy)]
pub enum Prompt<'a> {
    /// Plain text, without the chat template.
    Raw(&'a str),
    /// A conversation, through the model's chat template.
    Chat(&'a [Message]),
}

/// Where the generated pieces go.
pub trait Sink {
    /// One piece of generated text.
    fn piece(&mut self, piece: &str) -> Result<()>;
    /// Parts of tool calls (see the WIT `take-tool-calls`).
    fn tool_calls(&mut self, _deltas: Vec<ToolCallDelta>) -> Result<()> {
        Ok(())
    }
    /// After the last piece, before the summary is read.
    fn end(&mut self) -> Result<()> {
        Ok(())
    }
    /// The generator failed after the completion had started (some pieces may have come).
    fn interrupted(&mut self) {}
}

/// Drops the pieces: only the summary counts.
pub struct Discard;

impl Sink for Discard {
    fn piece(&mut self, _: &str) -> Result<()> {
        Ok(())
    }
}

/// Why a completion failed; each caller words it.
#[derive(Debug)]
pub enum Failure {
    /// The component trapped while starting the completion (`complete`, `chat`).
    StartTrap(wasmtime::Error),
    /// The component trapped later (`next`, `summary`).
    Trap(wasmtime::Error),
    /// The generator refused the request, or failed while generating.
    Guest(GuestError),
    /// The sink refused a piece or the end.
    Sink(anyhow::Error),
}

/// Runs one completion of `prompt` in `inst` to its end, every piece to `sink`; its summary.
pub fn complete(
    inst: &mut Instance,
    prompt: Prompt,
    opts: &Options,
    sink: &mut impl Sink,
) -> Result<Summary, Failure> {
    let (store, g) = inst;
    let api = g.edge_slm_generator();
    let started = match prompt {
        Prompt::Raw(text) => api.call_complete(&mut *store, text, opts),
        Prompt::Chat(messages) => api.call_chat(&mut *store, messages, opts),
    };
    let completion = started
        .map_err(Failure::StartTrap)?
        .map_err(Failure::Guest)?;
    let result = drain(store, g, completion, sink);
    let _ = completion.resource_drop(&mut *store);
    result
}

/// Pulls every piece of `completion` into `sink`, then reads the summary.
fn drain(
    store: &mut Store<HostState>,
    g: &GeneratorComponent,
    completion: ResourceAny,
    sink: &mut impl Sink,
) -> Result<Summary, Failure> {
    let api = g.edge_slm_generator().completion();
    loop {
        match api
            .call_next(&mut *store, completion)
            .map_err(Failure::Trap)?
        {
            Ok(Some(piece)) => {
                sink.piece(&piece).map_err(Failure::Sink)?;
                let calls = api
                    .call_take_tool_calls(&mut *store, completion)
                    .map_err(Failure::Trap)?;
                if !calls.is_empty() {
                    sink.tool_calls(calls).map_err(Failure::Sink)?;
                }
            }
            Ok(None) => break,
            Err(e) => {
                sink.interrupted();
                return Err(Failure::Guest(e));
            }
        }
    }
    sink.end().map_err(Failure::Sink)?;
    api.call_summary(&mut *store, completion)
        .map_err(Failure::Trap)
}

/// Prefill speed: prompt tokens per second of prefill; None when the prefill took no time.
pub fn prefill_tps(s: &Summary) -> Option<f64> {
    let t = s.timings.prefill_ms;
    (t > 0.0).then(|| s.usage.prompt_tokens as f64 * 1e3 / t)
}

/// Decode speed: the tokens after the first (which the prefill yields) per second of decoding;
/// None when there was no decoding to time.
pub fn decode_tps(s: &Summary) -> Option<f64> {
    let (n, t) = (s.usage.completion_tokens, s.timings.decode_ms);
    (n > 1 && t > 0.0).then(|| (n - 1) as f64 * 1e3 / t)
}
