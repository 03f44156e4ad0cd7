//! One completion: prefill, then token by token: sample, detokenize, match stop strings,
//! until EOS, a stop string, max-tokens or a full context window; with the log probabilities
//! of the generated tokens when asked, handed out with the text they belong to.
//!
//! The inference backend sits behind [`Session`], so this runs natively in tests.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use crate::constraint::Constraint;
use crate::detok::Detokenizer;
use crate::error::{Error, Result};
use crate::logprobs::Distribution;
use crate::model::Model;
use crate::sampler::Sampler;
use crate::stop::StopMatcher;
use crate::tools::{CallDelta, CallReader};

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
    /// The answer is complete tool calls.
    ToolCalls,
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

/// A token and its log probability (the WIT `token-logprob`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A generated token's log probabilities (the WIT `generated-token`).
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    pub chosen: TokenLogprob,
    /// Where the token's text begins in the generated text (bytes).
    pub text_offset: u32,
    /// The most likely tokens at its position, most likely first.
    pub top: Vec<TokenLogprob>,
}

/// Everything a request fixes before generation starts.
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: Option<u32>,
    pub sampler: Sampler,
    pub stop: StopMatcher,
    /// Log probabilities: None, none; n, each token's and the n most likely (validated).
    pub logprobs: Option<u32>,
    /// The format the output must match (compiled), if any.
    pub constraint: Option<Constraint>,
    /// With tools: reads the calls out of the answer (whose grammar is `constraint`).
    pub calls: Option<CallReader>,
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
    /// The logits as the model gave them (for the log probabilities; the sampler changes its own).
    raw: Vec<f32>,
    /// Bytes of text the detokenizer has produced, and of those `next` has returned.
    decoded: usize,
    released: usize,
    /// Log probabilities of tokens whose text has not been returned yet, then of those it has
    /// and that `take_logprobs` has not taken.
    pending: VecDeque<GeneratedToken>,
    ready: Vec<GeneratedToken>,
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
            raw: Vec::new(),
            decoded: 0,
            released: 0,
            pending: VecDeque::new(),
            ready: Vec::new(),
        })
    }

    /// The log probabilities of the generated tokens whose text `next` has returned, not taken
    /// before (see the WIT `take-logprobs`).
    pub fn take_logprobs(&mut self) -> Vec<GeneratedToken> {
        std::mem::take(&mut self.ready)
    }

    /// `text` is being returned: its tokens' log probabilities become ready.
    fn release(&mut self, text: &str) {
        self.released += text.len();
        while let Some(t) = self.pending.front() {
            if (t.text_offset as usize) >= self.released {
                break;
            }
            self.ready.extend(self.pending.pop_front());
        }
    }

    /// The next piece of text; None once generation has ended and all text was returned.
    #[allow(clippy::should_implement_trait)] // mirrors the WIT method; fallible, so not an Iterator
    pub fn next(&mut self) -> Result<Option<String>> {
        loop {
            if self.done {
                return Ok(None);
            }
            if self.finish.is_some() {
                let mut tail = self.flush();
                self.release(&tail);
                if self.divert(&tail) {
                    tail.clear();
                }
                // The rest: tokens without text of their own at the end, unless a stop string
                // cut the output, which drops the tokens from the stop string on.
                if self.finish == Some(FinishReason::StopString) {
                    self.pending.clear();
                } else {
                    self.ready.extend(self.pending.drain(..));
                }
                self.done = true;
                self.end = Some(Instant::now());
                if !tail.is_empty() {
                    return Ok(Some(tail));
                }
                return Ok(None);
            }
            match self.step() {
                Ok(piece) if piece.is_empty() => continue,
                Ok(piece) => {
                    self.release(&piece);
                    if self.divert(&piece) {
                        // A tool call's text: an empty piece when it has parts to take.
                        match &self.req.calls {
                            Some(r) if r.has_parts() => return Ok(Some(String::new())),
                            _ => continue,
                        }
                    }
                    return Ok(Some(piece));
                }
                Err(e) => {
                    self.done = true;
                    self.end = Some(Instant::now());
                    return Err(e);
                }
            }
        }
    }

    /// Whether `text` belongs to tool calls (then `take_tool_calls` hands it out, not `next`).
    fn divert(&mut self, text: &str) -> bool {
        match &mut self.req.calls {
            Some(r) => {
                r.push(text);
                r.is_calls()
            }
            None => false,
        }
    }

    /// The tool calls' parts written since the last call (see the WIT `take-tool-calls`).
    pub fn take_tool_calls(&mut self) -> Vec<CallDelta> {
        self.req
            .calls
            .as_mut()
            .map(CallReader::take)
            .unwrap_or_default()
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
        if self.req.logprobs.is_some() {
            self.raw.clear();
            self.raw.extend_from_slice(&logits);
        }
        if let Some(c) = &mut self.req.constraint {
            c.mask(&mut logits, &self.model.eos_ids)?;
        }
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
        self.req.sampler.generated(id);
        if self.model.eos_ids.contains(&id) {
            self.finish = Some(FinishReason::Stop);
            return Ok(String::new());
        }
        if let Some(c) = &mut self.req.constraint {
            c.advance(id)?;
            if c.is_complete() {
                // Nothing may follow: end as the model would with its end-of-sequence token.
                self.finish = Some(FinishReason::Stop);
            }
        }
        if let Some(n) = self.req.logprobs {
            let d = Distribution::new(&self.raw);
            let entry = |(token, logprob)| TokenLogprob {
                token,
                bytes: self.model.tokenizer.token_bytes(token),
                logprob,
            };
            self.pending.push_back(GeneratedToken {
                chosen: entry((id, d.logprob(id))),
                text_offset: u32::try_from(self.decoded).unwrap_or(u32::MAX),
                top: d.top(n as usize).into_iter().map(entry).collect(),
            });
        }
        let text = self.detok.push(&self.model.tokenizer, id)?;
        self.decoded += text.len();
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
            match self.finish.unwrap_or(FinishReason::Length) {
                // An answer of calls that ended as the grammar allows: complete calls.
                FinishReason::Stop if self.req.calls.as_ref().is_some_and(|r| r.is_calls()) => {
                    FinishReason::ToolCalls
                }
                f => f,
            }
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sampler::SamplingParams;

    /// A model of the byte-level test tokenizer: "a" 0, "b" 1, "Ġ" 2, "Ã" 3, "©" 4 (the bytes of
    /// "é"), "Ġa" 5, "<eos>" 6.
    pub(crate) fn model() -> Rc<Model> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "generate-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"vocab_size": 7, "eos_token_id": 6, "max_position_embeddings": 64}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("tokenizer.json"),
            crate::tokenizer::tests::byte_level_json(),
        )
        .unwrap();
        let m = Model::load("m", &dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        Rc::new(m)
    }

    /// Logits that make `script[i]` the most likely token at step i, each other token j at
    /// -j (so the runner-up is token 0, or 1).
    struct Scripted {
        script: Vec<u32>,
        step: usize,
    }

    impl Session for Scripted {
        fn step(&mut self, _ids: &[u32], _start: u32) -> Result<Vec<f32>> {
            let want = self.script[self.step.min(self.script.len() - 1)];
            self.step += 1;
            Ok((0..7)
                .map(|j| if j == want { 5.0 } else { -(j as f32) })
                .collect())
        }
    }

    fn generation(
        script: &[u32],
        stop: &[&str],
        logprobs: Option<u32>,
        params: SamplingParams,
    ) -> Generation<Scripted> {
        let req = Request {
            prompt: vec![0],
            max_tokens: Some(script.len() as u32),
            sampler: Sampler::new(params),
            stop: StopMatcher::new(stop.iter().map(|s| s.to_string()).collect()).unwrap(),
            logprobs,
            constraint: None,
            calls: None,
            start: Instant::now(),
        };
        let session = Scripted {
            script: script.to_vec(),
            step: 0,
        };
        Generation::new(model(), session, req).unwrap()
    }

    /// Every piece, with the tokens `take_logprobs` hands out after it (and after the end).
    fn run(g: &mut Generation<Scripted>) -> Vec<(String, Vec<u32>)> {
        let mut out = vec![];
        loop {
            let piece = g.next().unwrap();
            let tokens = g.take_logprobs().iter().map(|t| t.chosen.token).collect();
            match piece {
                Some(p) => out.push((p, tokens)),
                None => {
                    out.push((String::new(), tokens));
                    return out;
                }
            }
        }
    }

    fn pieces(v: &[(&str, &[u32])]) -> Vec<(String, Vec<u32>)> {
        v.iter().map(|(p, t)| (p.to_string(), t.to_vec())).collect()
    }

    #[test]
    fn tokens_come_with_the_text_they_start() {
        // "a", "é" in two tokens, " a", then EOS (not reported).
        let mut g = generation(&[0, 3, 4, 5, 6], &[], Some(2), SamplingParams::default());
        assert_eq!(
            run(&mut g),
            pieces(&[("a", &[0]), ("é", &[3, 4]), (" a", &[5]), ("", &[])])
        );
        let mut g = generation(&[0, 3, 4, 5, 6], &[], Some(2), SamplingParams::default());
        let mut all = vec![];
        while g.next().unwrap().is_some() {}
        all.extend(g.take_logprobs());
        let offsets: Vec<u32> = all.iter().map(|t| t.text_offset).collect();
        assert_eq!(offsets, [0, 1, 1, 3]);
        let bytes: Vec<Vec<u8>> = all.iter().map(|t| t.chosen.bytes.clone()).collect();
        assert_eq!(bytes, [vec![b'a'], vec![0xC3], vec![0xA9], b" a".to_vec()]);
        for t in &all {
            // Greedy: the chosen token is the most likely; logprobs <= 0, sorted.
            assert_eq!(t.top[0].token, t.chosen.token);
            assert_eq!(t.top[0].logprob, t.chosen.logprob);
            assert!(t.top.len() == 2 && t.top[0].logprob >= t.top[1].logprob);
            assert!(t.chosen.logprob <= 0.0);
        }
        // The runner-up: token 0 (logit 0), or token 1 when 0 was chosen.
        assert_eq!(all[0].top[1].token, 1);
        assert_eq!(all[1].top[1].token, 0);
    }

    #[test]
    fn a_stop_string_drops_the_tokens_from_it_on() {
        // "a" "b" "a" "b" "b" with stop "ba": "a", then the stop string begins at token "b":
        // the tokens from it on are dropped.
        let mut g = generation(
            &[0, 1, 0, 1, 1],
            &["ba"],
            Some(0),
            SamplingParams::default(),
        );
        assert_eq!(run(&mut g), pieces(&[("a", &[0]), ("", &[])]));
        // A stop string starting inside a token's text (" a" of "b ab"): that token is reported.
        let mut g = generation(&[1, 5, 1, 1], &["ab"], Some(0), SamplingParams::default());
        assert_eq!(run(&mut g), pieces(&[("b", &[1]), (" ", &[5]), ("", &[])]));
    }

    #[test]
    fn without_logprobs_nothing_is_reported_and_the_text_is_the_same() {
        let mut with = generation(&[0, 3, 4, 5], &[], Some(3), SamplingParams::default());
        let mut without = generation(&[0, 3, 4, 5], &[], None, SamplingParams::default());
        let a = run(&mut with);
        let b = run(&mut without);
        assert!(b.iter().all(|(_, t)| t.is_empty()));
        let text = |v: &[(String, Vec<u32>)]| v.iter().map(|p| p.0.clone()).collect::<String>();
        assert_eq!(text(&a), text(&b));
        assert_eq!(text(&a), "aé a");
        // max_tokens: the tokens without an end are all reported.
        assert_eq!(a.iter().map(|p| p.1.len()).sum::<usize>(), 4);
    }

    #[test]
    fn logprobs_are_the_model_s_before_the_bias() {
        // Ban the model's choice "a": "b" comes out, with its unbiased log probability.
        let params = SamplingParams {
            logit_bias: vec![(0, -100.0)],
            ..SamplingParams::default()
        };
        let mut g = generation(&[0], &[], Some(1), params);
        assert_eq!(g.next().unwrap().as_deref(), Some("b"));
        assert_eq!(g.next().unwrap(), None);
        let t = g.take_logprobs();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].chosen.token, 1);
        assert_eq!(t[0].top[0].token, 0, "the model's favourite is still top");
        let expected = Distribution::new(&[5.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0]).logprob(1);
        assert_eq!(t[0].chosen.logprob, expected);
    }

    #[test]
    fn a_format_overrides_the_model_s_choices_and_ends_the_output() {
        use crate::constraint::Format;
        // The model wants "b" at every step; the format allows "a+b", so: "a", then "b" (now
        // allowed and preferred), then nothing may follow: the output ends there.
        let mut g = generation(&[1; 6], &[], Some(2), SamplingParams::default());
        g.req.constraint = Some(g.model.constrain(&Format::Regex("a+b".into())).unwrap());
        let text: String = run(&mut g).into_iter().map(|(p, _)| p).collect();
        assert_eq!(text, "ab");
        assert_eq!(g.summary().finish_reason, FinishReason::Stop);
        // Log probabilities stay the model's own: "a" was not its choice.
        let mut g = generation(&[1; 6], &[], Some(2), SamplingParams::default());
        g.req.constraint = Some(g.model.constrain(&Format::Regex("a+b".into())).unwrap());
        while g.next().unwrap().is_some() {}
        let t = g.take_logprobs();
        assert_eq!(t[0].chosen.token, 0);
        assert_eq!(t[0].top[0].token, 1);
    }

    #[test]
    fn a_bad_format_is_an_invalid_option() {
        use crate::constraint::Format;
        for f in [
            Format::Regex("(".into()),
            Format::JsonSchema("{not json".into()),
            Format::JsonSchema("[1]".into()),
            Format::Lark("start: undefined_rule".into()),
        ] {
            match model().constrain(&f) {
                Err(Error::InvalidOption { name, message }) => {
                    assert_eq!(name, "format", "{message}")
                }
                Err(e) => panic!("{f:?}: {e}"),
                Ok(_) => panic!("{f:?} compiled"),
            }
        }
    }

    #[test]
    fn json_formats_compile() {
        use crate::constraint::Format;
        let m = model();
        m.constrain(&Format::JsonObject).unwrap();
        let schema = r##"{"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}},
            "required": ["a"], "additionalProperties": false,
            "$defs": {"A": {"anyOf": [{"type": "string", "pattern": "^a+$"}, {"type": "null"}]}}}"##;
        m.constrain(&Format::JsonSchema(schema.into())).unwrap();
        m.constrain(&Format::Lark("start: \"a\" /b+/".into()))
            .unwrap();
    }
}
