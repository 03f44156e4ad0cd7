//! The exported `edge:slm/generator` interface: model lookup and caching, request validation,
//! and the `completion` resource.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use crate::bindings::edge::slm::types as wit;
use crate::bindings::exports::edge::slm::generator::{
    Completion as WitCompletion, Guest, GuestCompletion,
};
use crate::chat;
use crate::constraint::Format;
use crate::error::{Error, Result};
use crate::generate::{FinishReason, GeneratedToken, Generation, Request, Summary, TokenLogprob};
use crate::logprobs::MAX_TOP_LOGPROBS;
use crate::model::{self, Model};
use crate::nn_session::NnSession;
use crate::sampler::{Requested, Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::template::{ChatTemplate, Message};
use crate::tools::{self, Call, CallReader, Choice, Tools};

const MODELS_ROOT: &str = "/models";

thread_local! {
    static MODELS: RefCell<HashMap<String, Rc<Model>>> = RefCell::new(HashMap::new());
    /// Set by `preload` (a baked component): the models this instance serves, in list order,
    /// with what `list-models` says of each. None: the models are those in `/models`.
    static BAKED: RefCell<Option<Vec<(String, model::Info)>>> = const { RefCell::new(None) };
}

fn baked_names() -> Option<Vec<String>> {
    BAKED.with(|b| {
        b.borrow()
            .as_ref()
            .map(|list| list.iter().map(|(n, _)| n.clone()).collect())
    })
}

struct Component;

fn model_dir(name: &str) -> PathBuf {
    Path::new(MODELS_ROOT).join(name)
}

/// The model's name: the one asked for (if it exists) or the first listed.
fn resolve(name: Option<&str>) -> Result<String> {
    if let Some(baked) = baked_names() {
        return match name {
            Some(n) if baked.iter().any(|b| b == n) => Ok(n.to_string()),
            Some(n) => Err(Error::ModelNotFound(format!(
                "{n} (this component is baked with {})",
                baked.join(", ")
            ))),
            None => Ok(baked[0].clone()),
        };
    }
    match name {
        Some(n) => {
            let dir = model_dir(n);
            if model::valid_name(n)
                && dir.join("config.json").is_file()
                && dir.join("tokenizer.json").is_file()
            {
                Ok(n.to_string())
            } else {
                Err(Error::ModelNotFound(n.to_string()))
            }
        }
        None => model::list(Path::new(MODELS_ROOT))?
            .into_iter()
            .next()
            .ok_or_else(|| Error::ModelNotFound(format!("no models in {MODELS_ROOT}"))),
    }
}

fn get_model(name: Option<&str>) -> Result<Rc<Model>> {
    let name = resolve(name)?;
    if let Some(m) = MODELS.with(|m| m.borrow().get(&name).cloned()) {
        return Ok(m);
    }
    let m = Rc::new(Model::load(&name, &model_dir(&name))?);
    MODELS.with(|c| c.borrow_mut().insert(name, m.clone()));
    Ok(m)
}

/// The WIT messages, with their tool calls and call ids.
fn conversation(msgs: Vec<wit::Message>) -> Vec<(Message, Vec<Call>, Option<String>)> {
    msgs.into_iter()
        .map(|m| {
            let calls = m
                .tool_calls
                .into_iter()
                .map(|c| Call {
                    id: c.id,
                    name: c.name,
                    arguments: c.arguments,
                })
                .collect();
            let message = Message {
                role: m.role,
                content: m.content,
                ..Default::default()
            };
            (message, calls, m.tool_call_id)
        })
        .collect()
}

/// The conversation as `template` renders it, and its `tools` variable: the template's own
/// form when it has one (crate::template `takes_tools`), else the generic form with the
/// active tools' instructions in the system message (crate::tools).
fn messages(
    template: &ChatTemplate,
    tokenizer: &crate::tokenizer::Tokenizer,
    msgs: Vec<wit::Message>,
    tools: Option<&Tools>,
) -> Result<(Vec<Message>, Option<serde_json::Value>)> {
    if !template.takes_tools() {
        return Ok((tools::render_messages(conversation(msgs), tools)?, None));
    }
    let (msgs, tools) = tools::template_messages(conversation(msgs), tools)?;
    // Tools and calls are the template's text, where special-token text would be read as
    // control tokens: refused (content is kept plain by crate::chat).
    let calls = msgs.iter().flat_map(|m| &m.tool_calls);
    for text in tools.iter().chain(calls).map(|v| v.to_string()) {
        if tokenizer.spells_special(&text)? {
            return Err(Error::invalid(
                "a tool or a tool call spells a special token of the model",
            ));
        }
    }
    Ok((msgs, tools))
}

fn template(model: &Model) -> Result<&ChatTemplate> {
    model
        .template
        .as_ref()
        .ok_or_else(|| Error::invalid(format!("model {:?} has no chat template", model.name)))
}

fn chat_prompt(model: &Model, msgs: Vec<wit::Message>) -> Result<String> {
    let t = template(model)?;
    let (msgs, _) = messages(t, &model.tokenizer, msgs, None)?;
    t.render(&msgs, true)
}

/// Token ids of a conversation: the template's control tokens, the messages' content as plain
/// text (crate::chat). A prompt far too long for the context is refused before tokenizing.
fn encode_chat(model: &Model, msgs: Vec<wit::Message>, tools: Option<&Tools>) -> Result<Vec<u32>> {
    let t = template(model)?;
    let (msgs, tools) = messages(t, &model.tokenizer, msgs, tools)?;
    let prompt = chat::render_with_tools(t, &msgs, tools.as_ref())?;
    model.check_text_fits(&prompt.text)?;
    chat::encode(&model.tokenizer, &prompt, &msgs)
}

/// What a generation starts from: a raw prompt (`complete`) or chat messages (`chat`).
enum Input {
    Prompt(String),
    Chat(Vec<wit::Message>),
}

impl Input {
    fn check_not_empty(&self) -> Result<()> {
        match self {
            Input::Prompt(p) if p.is_empty() => Err(Error::invalid("the prompt is empty")),
            Input::Chat(m) if m.is_empty() => Err(Error::invalid("messages must not be empty")),
            _ => Ok(()),
        }
    }

    fn encode(self, model: &Model, tools: Option<&Tools>) -> Result<Vec<u32>> {
        match self {
            Input::Prompt(p) => model.encode_prompt(&p),
            // The template writes any BOS itself.
            Input::Chat(m) => encode_chat(model, m, tools),
        }
    }
}

/// Validate the request (before any inference work) and start a generation.
fn start(input: Input, options: wit::Options) -> Result<WitCompletion> {
    let started = Instant::now();
    input.check_not_empty()?;
    let model = get_model(options.model.as_deref())?;
    let tools = tools_of(&options)?;
    let active = tools.as_ref().filter(|t| t.active());
    if active.is_some() {
        if matches!(input, Input::Prompt(_)) {
            return Err(Error::invalid_option(
                "tools",
                "tools need a conversation (`chat`), not a raw prompt (`complete`)",
            ));
        }
        if options.format.is_some() {
            return Err(Error::invalid_option(
                "tools",
                "tools cannot be combined with a format",
            ));
        }
    }
    let prompt = input.encode(&model, tools.as_ref())?;
    let s = options.sampling;
    let requested = Requested {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        logit_bias: s.logit_bias.iter().map(|b| (b.token, b.bias)).collect(),
        seed: s.seed,
    };
    let params = SamplingParams::new(requested, model.vocab_size, crate::rng::random_seed)?;
    if let Some(n) = options.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
        return Err(Error::invalid_option(
            "logprobs",
            format!("logprobs must be at most {MAX_TOP_LOGPROBS}, got {n}"),
        ));
    }
    let stop = StopMatcher::new(options.stop)?;
    crate::generate::check_prompt(&model, &prompt)?;
    let format = match (&tools, options.format) {
        (Some(t), _) if t.active() => Some(Format::Lark(t.grammar())),
        (_, Some(f)) => Some(format_of(f)),
        // tool-choice none: text that does not start like a call (the history has some).
        (Some(t), None) => Some(Format::Lark(t.grammar())),
        (None, None) => None,
    };
    let constraint = match format.map(|f| model.constrain(&f)).transpose() {
        // The grammar is the tools': what it refuses is a tool's `parameters`.
        Err(Error::InvalidOption {
            name: "format",
            message,
        }) if tools.is_some() => {
            return Err(Error::invalid_option(
                "tools",
                format!("a tool's parameters: {message}"),
            ))
        }
        other => other?,
    };
    let calls = active.map(|_| CallReader::new(Box::new(call_id)));
    let session = NnSession::new(&model.name)?;
    let req = Request {
        prompt,
        max_tokens: options.max_tokens,
        sampler: Sampler::new(params),
        stop,
        logprobs: options.logprobs,
        constraint,
        calls,
        start: started,
    };
    let generation = Generation::new(model, session, req)?;
    Ok(WitCompletion::new(CompletionImpl {
        inner: RefCell::new(generation),
    }))
}

fn tools_of(options: &wit::Options) -> Result<Option<Tools>> {
    let tools = options
        .tools
        .iter()
        .map(|t| (t.name.clone(), t.description.clone(), t.parameters.clone()))
        .collect();
    let choice = options.tool_choice.as_ref().map(|c| match c {
        wit::ToolChoice::None => Choice::None,
        wit::ToolChoice::Auto => Choice::Auto,
        wit::ToolChoice::Required => Choice::Required,
        wit::ToolChoice::Function(n) => Choice::Function(n.clone()),
    });
    Tools::new(tools, choice, options.parallel_tool_calls)
}

/// A tool call's id: "call_" and 24 random letters and digits (OpenAI's shape).
fn call_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = crate::rng::Rng::new(crate::rng::random_seed());
    let id: String = (0..24)
        .map(|_| ALPHABET[(rng.next_u64() % ALPHABET.len() as u64) as usize] as char)
        .collect();
    format!("call_{id}")
}

fn format_of(f: wit::Format) -> Format {
    match f {
        wit::Format::JsonObject => Format::JsonObject,
        wit::Format::JsonSchema(s) => Format::JsonSchema(s),
        wit::Format::Regex(r) => Format::Regex(r),
        wit::Format::Lark(g) => Format::Lark(g),
    }
}

impl From<Error> for wit::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::ModelNotFound(m) => wit::Error::ModelNotFound(m),
            Error::InvalidRequest(m) => wit::Error::InvalidRequest(m),
            Error::InvalidOption { name, message } => {
                wit::Error::InvalidOption(wit::InvalidOption {
                    name: name.to_string(),
                    message,
                })
            }
            Error::ContextOverflow {
                prompt_tokens,
                context_length,
            } => wit::Error::ContextOverflow(wit::ContextOverflow {
                prompt_tokens,
                context_length,
            }),
            Error::ModelError(m) => wit::Error::ModelError(m),
            Error::BackendFailure(m) => wit::Error::BackendFailure(m),
        }
    }
}

fn summary(s: Summary) -> wit::Summary {
    wit::Summary {
        finish_reason: match s.finish_reason {
            FinishReason::Stop => wit::FinishReason::Stop,
            FinishReason::StopString => wit::FinishReason::StopString,
            FinishReason::Length => wit::FinishReason::Length,
            FinishReason::ContextFull => wit::FinishReason::ContextFull,
            FinishReason::ToolCalls => wit::FinishReason::ToolCalls,
        },
        usage: wit::Usage {
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
            cached_tokens: s.cached_tokens,
        },
        timings: wit::Timings {
            time_to_first_token_ms: s.time_to_first_token_ms,
            prefill_ms: s.prefill_ms,
            decode_ms: s.decode_ms,
            total_ms: s.total_ms,
        },
    }
}

/// What `list-models` says of model `name`. The JSON files suffice; the tokenizer is parsed only
/// if config.json has no vocabulary size.
fn model_info(name: String) -> Result<wit::ModelInfo> {
    let baked = BAKED.with(|b| {
        b.borrow().as_ref().and_then(|list| {
            list.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, i)| i.clone())
        })
    });
    let info = match baked {
        Some(info) => info,
        None => model::info(&model_dir(&name))?,
    };
    let vocab_size = match info.vocab_size {
        Some(n) => n,
        None => get_model(Some(&name))?.vocab_size,
    };
    Ok(wit::ModelInfo {
        name,
        context_length: info.context_length,
        vocab_size,
        has_chat_template: info.has_chat_template,
    })
}

struct CompletionImpl {
    inner: RefCell<Generation<NnSession>>,
}

impl GuestCompletion for CompletionImpl {
    fn next(&self) -> std::result::Result<Option<String>, wit::Error> {
        Ok(self.inner.borrow_mut().next()?)
    }

    fn summary(&self) -> wit::Summary {
        summary(self.inner.borrow().summary())
    }

    fn take_tool_calls(&self) -> Vec<wit::ToolCallDelta> {
        let deltas = self.inner.borrow_mut().take_tool_calls();
        deltas
            .into_iter()
            .map(|d| wit::ToolCallDelta {
                index: d.index,
                id: d.id,
                name: d.name,
                arguments: d.arguments,
            })
            .collect()
    }

    fn take_logprobs(&self) -> Vec<wit::GeneratedToken> {
        let entry = |t: TokenLogprob| wit::TokenLogprob {
            token: t.token,
            bytes: t.bytes,
            logprob: t.logprob,
        };
        let tokens = self.inner.borrow_mut().take_logprobs();
        tokens
            .into_iter()
            .map(|t: GeneratedToken| wit::GeneratedToken {
                chosen: entry(t.chosen),
                text_offset: t.text_offset,
                top: t.top.into_iter().map(entry).collect(),
            })
            .collect()
    }
}

impl Guest for Component {
    type Completion = CompletionImpl;

    fn list_models() -> std::result::Result<Vec<wit::ModelInfo>, wit::Error> {
        let mut out = Vec::new();
        let names = match baked_names() {
            Some(names) => names,
            None => model::list(Path::new(MODELS_ROOT))?,
        };
        for name in names {
            match model_info(name.clone()) {
                Ok(info) => out.push(info),
                // One broken model directory must not hide the others (nor fail /health): it is
                // left out of the list, said on stderr, and a request naming it gets its error.
                Err(e) => eprintln!("warning: model {name:?} is not listed: {e}"),
            }
        }
        Ok(out)
    }

    fn tokenize(model: Option<String>, text: String) -> std::result::Result<Vec<u32>, wit::Error> {
        let m = get_model(model.as_deref())?;
        Ok(m.tokenizer.encode(&text)?)
    }

    fn detokenize(
        model: Option<String>,
        tokens: Vec<u32>,
    ) -> std::result::Result<String, wit::Error> {
        let m = get_model(model.as_deref())?;
        let n = m.tokenizer.vocab_size();
        if let Some(bad) = tokens.iter().find(|&&t| t >= n) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary (size {n})"
            ))
            .into());
        }
        Ok(m.tokenizer.decode_with(&tokens, false)?)
    }

    fn complete(
        prompt: String,
        options: wit::Options,
    ) -> std::result::Result<WitCompletion, wit::Error> {
        Ok(start(Input::Prompt(prompt), options)?)
    }

    fn chat(
        messages: Vec<wit::Message>,
        options: wit::Options,
    ) -> std::result::Result<WitCompletion, wit::Error> {
        Ok(start(Input::Chat(messages), options)?)
    }

    fn apply_chat_template(
        model: Option<String>,
        messages: Vec<wit::Message>,
    ) -> std::result::Result<String, wit::Error> {
        let m = get_model(model.as_deref())?;
        Ok(chat_prompt(&m, messages)?)
    }
}

crate::bindings::export!(Component with_types_in crate::bindings);

/// The build-time hook of a baked component (`scripts/build --bake`; WIT `generator-build`).
impl crate::bindings::Guest for Component {
    fn preload() {
        slm_preinit::preloading(|| {
            let models =
                model::list(Path::new(MODELS_ROOT)).unwrap_or_else(|e| panic!("preload: {e}"));
            if models.is_empty() {
                panic!("preload: no models in {MODELS_ROOT}");
            }
            let mut baked = Vec::new();
            for name in models {
                let loaded = resolve(Some(&name)).and_then(|name| {
                    let model = get_model(Some(&name))?;
                    let info = model::info(&model_dir(&name))?;
                    Ok((model, info))
                });
                match loaded {
                    Ok((model, info)) => baked.push((model.name.clone(), info)),
                    Err(e) => panic!("preload: model {name:?}: {e}"),
                }
            }
            BAKED.with(|b| *b.borrow_mut() = Some(baked));
        })
    }
}
