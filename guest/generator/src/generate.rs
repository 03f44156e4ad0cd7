//! One completion: prefill, then token by token: sample, detokenize, match stop strings,
//! until EOS, a stop string, max-tokens or a full context window.
//!
//! The inference backend sits behind [`Session`], so this runs natively in tests.

use std::rc::Rc;
use std::time::Instant;

use crate::detok::Detokenizer;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampler::Sampler;
use crate::stop::StopMatcher;

/// A stateful inference session (one wasi:nn execution context): the KV cache lives behind it.
pub trait Session {
    /// Run `ids` at positions `start_pos..start_pos + ids.len()`, after the tokens already
    /// sent; returns the logits of the last position.
    fn step(&mut self, ids: &[u32], start_pos: u32) -> Result<Vec<f32>>;

    /// Tokens of the last step that the backend took from its prefix cache instead of
    /// computing them (a host may report this; 0 when it does not).
    fn cached_tokens(&self) -> u32 {
        0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    StopString,
    Length,
    ContextFull,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub finish_reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_tokens: u32,
    pub time_to_first_token_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub total_ms: f64,
}

/// Everything a request fixes before generation starts.
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: Option<u32>,
    pub sampler: Sampler,
    pub stop: StopMatcher,
    /// When the request arrived (for the timings).
    pub start: Instant,
}

/// Check a tokenized prompt against the model's context window.
pub fn check_prompt(model: &Model, prompt: &[u32]) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::invalid("the prompt is empty (no tokens)"));
    }
    let n = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
    if n > model.context_length {
        return Err(Error::ContextOverflow {
            prompt_tokens: n,
            context_length: model.context_length,
        });
    }
    Ok(())
}

pub struct Generation<S: Session> {
    model: Rc<Model>,
    session: S,
    req: Request,
    detok: Detokenizer,
    generated: u32,
    /// Tokens sent to the session so far.
    sent: u32,
    /// The last sampled token, not yet sent.
    last: Option<u32>,
    finish: Option<FinishReason>,
    /// All text returned: `next` answers None.
    done: bool,
    first_token_at: Option<Instant>,
    prefill_ms: f64,
    /// Prompt tokens the backend reused from its prefix cache.
    cached: u32,
    end: Option<Instant>,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl<S: Session> Generation<S> {
    pub fn new(model: Rc<Model>, session: S, mut req: Request) -> Result<Self> {
        check_prompt(&model, &req.prompt)?;
        req.sampler.observe(&req.prompt);
        Ok(Generation {
            model,
            session,
            req,
            detok: Detokenizer::new(),
            generated: 0,
            sent: 0,
            last: None,
            finish: None,
            done: false,
            first_token_at: None,
            prefill_ms: 0.0,
            cached: 0,
            end: None,
        })
    }

    /// The next piece of text; None once generation has ended and all text was returned.
    #[allow(clippy::should_implement_trait)] // mirrors the WIT method; fallible, so not an Iterator
    pub fn next(&mut self) -> Result<Option<String>> {
        loop {
            if self.done {
                return Ok(None);
            }
            if self.finish.is_some() {
                let tail = self.flush();
                self.done = true;
                self.end = Some(Instant::now());
                if !tail.is_empty() {
                    return Ok(Some(tail));
                }
                return Ok(None);
            }
            match self.step() {
                Ok(piece) if piece.is_empty() => continue,
                Ok(piece) => return Ok(Some(piece)),
                Err(e) => {
                    self.done = true;
                    self.end = Some(Instant::now());
                    return Err(e);
                }
            }
        }
    }

    /// Text held back by the detokenizer and the stop matcher, at the end.
    fn flush(&mut self) -> String {
        if self.finish == Some(FinishReason::StopString) {
            return String::new();
        }
        let rest = self.detok.finish(&self.model.tokenizer).unwrap_or_default();
        let pushed = self.req.stop.push(&rest);
        if pushed.stopped {
            self.finish = Some(FinishReason::StopString);
            return pushed.text;
        }
        pushed.text + &self.req.stop.finish()
    }

    /// Generate one token; returns the text it releases (possibly empty).
    fn step(&mut self) -> Result<String> {
        if let Some(max) = self.req.max_tokens {
            if self.generated >= max {
                self.finish = Some(FinishReason::Length);
                return Ok(String::new());
            }
        }
        let total = self.req.prompt.len() as u64 + self.generated as u64;
        if total >= self.model.context_length as u64 {
            self.finish = Some(FinishReason::ContextFull);
            return Ok(String::new());
        }
        let mut logits = match self.last {
            None => {
                let t0 = Instant::now();
                let logits = self.session.step(&self.req.prompt, 0)?;
                self.prefill_ms = ms(t0.elapsed());
                self.cached = self.session.cached_tokens();
                self.sent = self.req.prompt.len() as u32;
                logits
            }
            Some(id) => {
                let logits = self.session.step(&[id], self.sent)?;
                self.sent += 1;
                logits
            }
        };
        let id = self
            .req
            .sampler
            .sample(&mut logits)
            .ok_or_else(|| Error::backend("the model returned empty logits"))?;
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
        }
        self.generated += 1;
        self.last = Some(id);
        self.req.sampler.observe(&[id]);
        if self.model.eos_ids.contains(&id) {
            self.finish = Some(FinishReason::Stop);
            return Ok(String::new());
        }
        let text = self.detok.push(&self.model.tokenizer, id)?;
        let pushed = self.req.stop.push(&text);
        if pushed.stopped {
            self.finish = Some(FinishReason::StopString);
        }
        Ok(pushed.text)
    }

    /// How the generation ended; before the end, the counts so far with reason `Length`.
    pub fn summary(&self) -> Summary {
        let end = self.end.unwrap_or_else(Instant::now);
        let start = self.req.start;
        let finish_reason = if self.done {
            self.finish.unwrap_or(FinishReason::Length)
        } else {
            FinishReason::Length
        };
        Summary {
            finish_reason,
            prompt_tokens: self.req.prompt.len() as u32,
            completion_tokens: self.generated,
            cached_tokens: self.cached,
            time_to_first_token_ms: self.first_token_at.map(|t| ms(t - start)).unwrap_or(0.0),
            prefill_ms: self.prefill_ms,
            decode_ms: self
                .first_token_at
                .map(|t| ms(end.saturating_duration_since(t)))
                .unwrap_or(0.0),
            total_ms: ms(end.saturating_duration_since(start)),
        }
    }
}
