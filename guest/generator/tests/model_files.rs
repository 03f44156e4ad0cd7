//! The model-directory, tokenizer, detokenizer and generation logic against the real
//! SmolLM2 files (models/smollm2-135m-instruct, made by scripts/setup), with a scripted
//! inference session standing in for wasi:nn.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use generator::detok::{Decode, Detokenizer};
use generator::error::{Error, Result};
use generator::generate::{FinishReason, Generation, Request, Session};
use generator::model::{self, Model};
use generator::sampler::{Sampler, SamplingParams};
use generator::stop::StopMatcher;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const NAME: &str = "smollm2-135m-instruct";

fn smollm() -> Model {
    let dir = root().join("models").join(NAME);
    Model::load(NAME, &dir).unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup)", dir.display()))
}

#[test]
fn model_settings() {
    let m = smollm();
    assert_eq!(m.context_length, 8192);
    assert_eq!(m.vocab_size, 49152);
    assert_eq!(m.eos_ids, [0, 2]);
    assert!(!m.add_bos);
    assert!(m.template.is_some());
    // No BOS on raw prompts for this model.
    assert_eq!(
        m.encode_prompt("Hello").unwrap(),
        m.tokenizer.encode("Hello").unwrap()
    );
    assert!(model::list(&root().join("models"))
        .unwrap()
        .contains(&NAME.to_string()));
    let info = model::info(&root().join("models").join(NAME)).unwrap();
    assert_eq!(
        info,
        model::Info {
            context_length: 8192,
            vocab_size: Some(49152),
            has_chat_template: true
        }
    );
    assert!(model::list(&root().join("no-such-dir")).unwrap().is_empty());
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let m = smollm();
    let text =
        std::fs::read_to_string(root().join("tests/fixtures/tokenizer_llamacpp.json")).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(m.tokenizer.encode(text).unwrap(), ids, "{text:?}");
    }
}

#[test]
fn special_token_text_is_one_token() {
    let m = smollm();
    let ids = m
        .tokenizer
        .encode("<|im_start|>user\nhi<|im_end|>")
        .unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(*ids.last().unwrap(), 2);
    // detokenize (the WIT function) keeps special tokens; streaming drops them.
    assert_eq!(
        m.tokenizer.decode_with(&ids, false).unwrap(),
        "<|im_start|>user\nhi<|im_end|>"
    );
    assert_eq!(m.tokenizer.decode(&ids).unwrap(), "user\nhi");
}

#[test]
fn streaming_detokenizer_round_trips() {
    let m = smollm();
    let texts = [
        "Hello, world! How are you?",
        "Réponds en français: «ça va?» — oui 👋🏽 😀 日本語のテキスト",
        "  leading spaces\n\n\tand tabs   ",
        "code: fn main() { println!(\"{}\", 1 + 2); }",
        "<|im_start|>assistant\nSure!<|im_end|>",
    ];
    for text in texts {
        let ids = m.tokenizer.encode(text).unwrap();
        let mut d = Detokenizer::new();
        let mut pieces = Vec::new();
        for &id in &ids {
            pieces.push(d.push(&m.tokenizer, id).unwrap());
        }
        pieces.push(d.finish(&m.tokenizer).unwrap());
        for p in &pieces {
            assert!(!p.contains('\u{FFFD}'), "{text:?}: {pieces:?}");
        }
        assert_eq!(
            pieces.concat(),
            m.tokenizer.decode(&ids).unwrap(),
            "{text:?}"
        );
    }
}

/// (ids, start position) of each `step` call.
type Calls = Rc<RefCell<Vec<(Vec<u32>, u32)>>>;

/// Returns one-hot logits that make greedy decoding follow `script`; records every call.
struct Scripted {
    script: Vec<u32>,
    vocab: usize,
    calls: Calls,
}

impl Session for Scripted {
    fn step(&mut self, ids: &[u32], start_pos: u32) -> Result<Vec<f32>> {
        let n = self.calls.borrow().len();
        self.calls.borrow_mut().push((ids.to_vec(), start_pos));
        let next = *self
            .script
            .get(n)
            .ok_or_else(|| Error::backend("script exhausted"))?;
        let mut logits = vec![0.0; self.vocab];
        logits[next as usize] = 10.0;
        Ok(logits)
    }
}

impl Scripted {
    /// A session whose first step fails (its script is empty).
    fn exhausted() -> Self {
        Scripted {
            script: vec![],
            vocab: 10,
            calls: Default::default(),
        }
    }
}

/// A greedy request.
fn request(prompt: Vec<u32>, stop: &[&str], max_tokens: Option<u32>) -> Request {
    Request {
        prompt,
        max_tokens,
        sampler: Sampler::new(SamplingParams::default()),
        stop: StopMatcher::new(stop.iter().map(|s| s.to_string()).collect()).unwrap(),
        logprobs: None,
        constraint: None,
        calls: None,
        start: Instant::now(),
    }
}

struct Run {
    pieces: Vec<String>,
    finish: FinishReason,
    completion_tokens: u32,
    calls: Vec<(Vec<u32>, u32)>,
}

fn run(
    model: Model,
    prompt: &str,
    output: &str,
    extra: &[u32],
    stop: &[&str],
    max_tokens: Option<u32>,
) -> Run {
    let model = Rc::new(model);
    let mut script = model.tokenizer.encode(output).unwrap();
    script.extend_from_slice(extra);
    let calls = Rc::new(RefCell::new(Vec::new()));
    let session = Scripted {
        script,
        vocab: model.vocab_size as usize,
        calls: calls.clone(),
    };
    let req = request(model.tokenizer.encode(prompt).unwrap(), stop, max_tokens);
    let mut g = Generation::new(model, session, req).unwrap();
    let mut pieces = Vec::new();
    while let Some(p) = g.next().unwrap() {
        assert!(!p.is_empty());
        pieces.push(p);
    }
    assert_eq!(g.next().unwrap(), None);
    let s = g.summary();
    let calls = calls.borrow().clone();
    Run {
        pieces,
        finish: s.finish_reason,
        completion_tokens: s.completion_tokens,
        calls,
    }
}

#[test]
fn eos_ends_and_positions_continue() {
    let m = smollm();
    let prompt = "<|im_start|>user\nhi<|im_end|>\n";
    let prompt_len = m.tokenizer.encode(prompt).unwrap().len() as u32;
    let r = run(m, prompt, "Hello there, 👋!", &[2, 5, 5], &[], None);
    assert_eq!(r.pieces.concat(), "Hello there, 👋!");
    assert_eq!(r.finish, FinishReason::Stop);
    // Prefill sends the whole prompt at position 0, then one token per step, positions continuing.
    assert_eq!(r.calls[0].0.len() as u32, prompt_len);
    assert_eq!(r.calls[0].1, 0);
    for (i, (ids, pos)) in r.calls.iter().enumerate().skip(1) {
        assert_eq!(ids.len(), 1);
        assert_eq!(*pos, prompt_len + i as u32 - 1);
    }
    assert_eq!(r.completion_tokens as usize, r.calls.len());
}

#[test]
fn stop_string_is_not_emitted() {
    let m = smollm();
    let r = run(
        m,
        "Q:",
        " The answer is 42.\nQ: next",
        &[2],
        &["\nQ:"],
        None,
    );
    assert_eq!(r.pieces.concat(), " The answer is 42.");
    assert_eq!(r.finish, FinishReason::StopString);
    for p in &r.pieces {
        assert!(!p.contains('\n'), "{:?}", r.pieces);
    }
}

#[test]
fn max_tokens_and_special_tokens() {
    let m = smollm();
    let r = run(m, "hi", "one two three four five six", &[2], &[], Some(3));
    assert_eq!(r.finish, FinishReason::Length);
    assert_eq!(r.completion_tokens, 3);
    assert_eq!(r.pieces.concat(), "one two three");

    let m = smollm();
    let r = run(m, "hi", "a<|im_start|>b", &[2], &[], None);
    assert_eq!(r.pieces.concat(), "ab");

    let m = smollm();
    let r = run(m, "hi", "x", &[], &[], Some(0));
    assert_eq!(
        (r.finish, r.completion_tokens, r.calls.len()),
        (FinishReason::Length, 0, 0)
    );
}

#[test]
fn context_full_and_overflow() {
    let mut m = smollm();
    let prompt_len = m.tokenizer.encode("hello world").unwrap().len() as u32;
    m.context_length = prompt_len + 4;
    let r = run(m, "hello world", " a b c d e f g h", &[], &[], None);
    assert_eq!(r.finish, FinishReason::ContextFull);
    assert_eq!(r.completion_tokens, 4);
    let (last_ids, last_pos) = r.calls.last().unwrap();
    assert_eq!(last_ids.len(), 1);
    assert!(*last_pos < prompt_len + 4);

    let mut m = smollm();
    m.context_length = 2;
    let m = Rc::new(m);
    let prompt = m.tokenizer.encode("one two three").unwrap();
    let n = prompt.len() as u32;
    match Generation::new(m, Scripted::exhausted(), request(prompt, &[], None)) {
        Err(Error::ContextOverflow {
            prompt_tokens,
            context_length,
        }) => assert_eq!((prompt_tokens, context_length), (n, 2)),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("expected context-overflow"),
    }
}

#[test]
fn backend_error_is_a_value() {
    let m = Rc::new(smollm());
    let req = request(vec![1, 2, 3], &[], None);
    let mut g = Generation::new(m, Scripted::exhausted(), req).unwrap();
    assert!(matches!(g.next(), Err(Error::BackendFailure(_))));
    assert_eq!(g.next(), Ok(None));
}
