//! Bench scenario: the prefix cache's effect on time to first token, for requests that share a
//! system prompt: in one warm instance (a chat session; `slm serve`'s reused instances) and in a
//! fresh instance per request (Spin, `wasmtime serve`, `slm serve --instance-reuse 1`).

use anyhow::Result;

use super::{greedy, request, request_on, BenchArgs};
use crate::completion::Prompt;
use crate::runtime::{Message, Runtime};
use crate::stats::median;

/// A system prompt of about 100 tokens, shared by the prefix-cache requests.
const SYSTEM_PROMPT: &str = "You are a helpful assistant for a small hardware store. You answer questions \
about tools, paint, garden supplies and plumbing parts. Keep answers short and practical, name the aisle \
when you know it, and never invent prices. If a question is about safety, such as power tools, ladders or \
chemicals, remind the customer to read the label and to wear protective gear. If you do not know, say so \
and suggest asking a member of staff at the front desk.";

/// Questions of about 28 tokens each, asked after the shared system prompt.
const QUESTIONS: [&str; 4] = [
    "I want to repaint my kitchen cabinets this weekend. Which kind of paint and brushes should I buy, and do I need a primer first?",
    "My garden hose keeps leaking at the tap connection even after I tightened it. What part should I replace, and where do I find it?",
    "Which drill bit should I use to hang a heavy mirror on a brick wall, and do I also need special plugs or screws for that?",
    "How do I choose between a cordless and a corded lawn mower for a small city garden with a slope and a few narrow paths?",
];

/// Medians over the runs.
pub struct PrefixCache {
    /// The prompt's length in tokens (system prompt, question, chat template if any).
    pub prompt_tokens: u32,
    /// Of those, the ones the cache gave.
    pub cached_tokens: f64,
    /// Time to first token in one instance, the cache empty / holding another question's prompt.
    pub uncached_ms: f64,
    pub cached_ms: f64,
    /// The same with a fresh instance per request.
    pub fresh_uncached_ms: f64,
    pub fresh_cached_ms: f64,
}

/// Question `q` after the system prompt: as chat messages, or for a model without a chat
/// template (a base model) as plain text.
enum Asked {
    Chat(Vec<Message>),
    Raw(String),
}

impl Asked {
    fn new(q: &str, chat_template: bool) -> Asked {
        match chat_template {
            true => Asked::Chat(chat(q)),
            false => Asked::Raw(format!("{SYSTEM_PROMPT}\n\n{q}\n")),
        }
    }

    fn prompt(&self) -> Prompt<'_> {
        match self {
            Asked::Chat(messages) => Prompt::Chat(messages),
            Asked::Raw(text) => Prompt::Raw(text),
        }
    }
}

/// The system prompt, then question `q`.
fn chat(q: &str) -> Vec<Message> {
    vec![
        Message {
            role: "system".into(),
            content: SYSTEM_PROMPT.into(),
            tool_calls: vec![],
            tool_call_id: None,
        },
        Message {
            role: "user".into(),
            content: q.into(),
            tool_calls: vec![],
            tool_call_id: None,
        },
    ]
}

/// The same ~100-token system prompt, a new ~28-token question each time.
pub fn measure(rt: &Runtime, a: &BenchArgs) -> Result<PrefixCache> {
    // Twice: in a fresh instance per request (what `slm serve` does: the time includes the
    // guest's start, its tokenizer parse), and in one instance that has its tokenizer (a chat
    // session; the prefix cache's own effect).
    let one = greedy(&a.model, 1);
    let mut inst = rt.instantiate()?;
    request_on(&mut inst, Prompt::Raw("Hello"), &one)?;
    // A base model has no chat template: the same text, raw.
    let chat_template = request_on(&mut inst, Prompt::Chat(&chat("Hello")), &one).is_ok();
    let (mut uncached, mut cached, mut uncached_fresh, mut cached_fresh) =
        (vec![], vec![], vec![], vec![]);
    let (mut reused, mut prompt_tokens) = (vec![], 0);
    for i in 0..a.runs {
        let q = Asked::new(QUESTIONS[i % QUESTIONS.len()], chat_template);
        // Another user, same system prompt.
        let other = Asked::new(QUESTIONS[(i + 1) % QUESTIONS.len()], chat_template);
        rt.registry.clear_prefix_caches();
        uncached_fresh.push(request(rt, q.prompt(), &one)?.ttft_ms);
        rt.registry.clear_prefix_caches();
        uncached.push(request_on(&mut inst, q.prompt(), &one)?.ttft_ms);
        rt.registry.clear_prefix_caches();
        request_on(&mut inst, other.prompt(), &one)?;
        let warm = request_on(&mut inst, q.prompt(), &one)?;
        cached.push(warm.ttft_ms);
        reused.push(warm.cached_tokens as f64);
        prompt_tokens = warm.prompt_tokens;
        rt.registry.clear_prefix_caches();
        request(rt, other.prompt(), &one)?;
        cached_fresh.push(request(rt, q.prompt(), &one)?.ttft_ms);
    }
    drop(inst);
    rt.registry.clear_prefix_caches();
    Ok(PrefixCache {
        prompt_tokens,
        cached_tokens: median(reused),
        uncached_ms: median(uncached),
        cached_ms: median(cached),
        fresh_uncached_ms: median(uncached_fresh),
        fresh_cached_ms: median(cached_fresh),
    })
}
