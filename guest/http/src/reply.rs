//! Turning generator results into OpenAI JSON responses and Server-Sent Events.

use serde_json::{json, Value};

use crate::bindings::edge::slm::generator::{self, Completion};
use crate::bindings::edge::slm::types::{
    Error as GenError, FinishReason, GeneratedToken, Message, Options, Summary,
};
use crate::logprobs::{self, Offsets};
use crate::openai::{self, ApiError};

/// The OpenAI error a generator error maps to.
pub fn api_error(e: GenError) -> ApiError {
    let (status, message, kind, code, param) = match e {
        GenError::ModelNotFound(m) => (
            404,
            format!("the model '{m}' does not exist"),
            "invalid_request_error",
            Some("model_not_found"),
            Some("model".to_string()),
        ),
        GenError::InvalidRequest(m) => (400, m, "invalid_request_error", None, None),
        GenError::InvalidOption(o) => {
            let param = openai::request_field(&o.name).map(str::to_string);
            (400, o.message, "invalid_request_error", None, param)
        }
        GenError::ContextOverflow(c) => (
            400,
            format!(
                "the prompt has {} tokens, more than the model's context length of {}",
                c.prompt_tokens, c.context_length
            ),
            "invalid_request_error",
            Some("context_length_exceeded"),
            Some("messages".to_string()),
        ),
        GenError::ModelError(m) => (500, format!("model error: {m}"), "server_error", None, None),
        GenError::BackendFailure(m) => (
            500,
            format!("inference backend failed: {m}"),
            "server_error",
            None,
            None,
        ),
    };
    ApiError {
        status,
        message,
        kind,
        code,
        param,
    }
}

fn error_body(e: &ApiError) -> Value {
    json!({"error": {"message": e.message, "type": e.kind, "code": e.code, "param": e.param}})
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop | FinishReason::StopString => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
    }
}

fn usage(s: &Summary) -> Value {
    let u = &s.usage;
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{:x}{:x}",
        nanos as u64,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The model name to report, and a 400 when the client's `max_tokens` (set by the request field
/// `max_tokens_field`) can never fit the model's context.
fn check_model(
    options: &Options,
    max_tokens_field: Option<&'static str>,
) -> Result<String, ApiError> {
    let models = generator::list_models().map_err(api_error)?;
    let info = match &options.model {
        Some(name) => match models.iter().find(|m| &m.name == name) {
            Some(info) => info,
            // Not listed: not installed, or installed but unreadable; the generator says which.
            None => return Ok(name.clone()),
        },
        None => models
            .first()
            .ok_or_else(|| api_error(GenError::ModelNotFound("(none installed)".into())))?,
    };
    if let (Some(max), Some(field)) = (options.max_tokens, max_tokens_field) {
        if max > info.context_length {
            return Err(ApiError::invalid(
                format!(
                    "{field} = {max} exceeds the context length of {} ({})",
                    info.name, info.context_length
                ),
                Some(field),
            ));
        }
    }
    Ok(info.name.clone())
}

/// Chat or text completion: the part after parsing that both share.
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn object(&self, streaming: bool) -> &'static str {
        match (self, streaming) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    /// A choice (a streamed chunk's when `streaming`) with this `text`, `logprobs` (null when
    /// not asked for) and finish reason.
    fn choice(
        &self,
        text: Option<&str>,
        first: bool,
        finish: Option<&str>,
        streaming: bool,
        logprobs: Value,
    ) -> Value {
        match self {
            Kind::Chat if streaming => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs})
            }
            Kind::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": text.unwrap_or("")}, "finish_reason": finish, "logprobs": logprobs})
            }
            Kind::Text => {
                json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": logprobs})
            }
        }
    }

    /// The `logprobs` of a choice: `tokens`, which follow `text` (the response's text so far,
    /// for completions' character offsets).
    fn logprobs(&self, tokens: &[GeneratedToken], text: &str, offsets: &mut Offsets) -> Value {
        match self {
            Kind::Chat => logprobs::chat(tokens),
            Kind::Text => logprobs::completion(tokens, text, offsets),
        }
    }
}

/// What a request asks the generator for: chat messages or a raw prompt. It decides the generator
/// call and the shape of the response.
trait Input {
    const KIND: Kind;
    fn start(&self, options: &Options) -> Result<Completion, GenError>;
}

impl Input for Vec<Message> {
    const KIND: Kind = Kind::Chat;
    fn start(&self, options: &Options) -> Result<Completion, GenError> {
        generator::chat(self, options)
    }
}

impl Input for String {
    const KIND: Kind = Kind::Text;
    fn start(&self, options: &Options) -> Result<Completion, GenError> {
        generator::complete(self, options)
    }
}

pub async fn chat(out: ResponseOutparam, body: &[u8]) {
    serve(out, openai::chat_request(body)).await
}

pub async fn completions(out: ResponseOutparam, body: &[u8]) {
    serve(out, openai::completion_request(body)).await
}

/// Answers a parsed chat or completion request: checks the model, starts the generation and
/// sends its result. Once the request is parsed, every answer carries its affinity key.
async fn serve<T: Input>(out: ResponseOutparam, request: Result<openai::Request<T>, ApiError>) {
    let limit = std::env::var(openai::MAX_TOKENS_VAR);
    let limit = openai::token_limit(match &limit {
        Ok(v) => Some(v.as_str()),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => Some("(not UTF-8)"),
    });
    let (mut req, limit) = match (request, limit) {
        (Ok(r), Ok(limit)) => (r, limit),
        // A misconfigured server says so before judging the request.
        (_, Err(e)) | (Err(e), _) => return send_error(out, e).await,
    };
    let affinity = req.affinity_key.as_deref().map(openai::header_value);
    let extra: Vec<(&str, &str)> = affinity
        .iter()
        .map(|v| (openai::AFFINITY_HEADER, v.as_str()))
        .collect();
    if let Err(e) = req.limit_tokens(limit) {
        return send_error_with(out, e, &extra).await;
    }
    let model = match check_model(&req.options, req.max_tokens_field) {
        Ok(m) => m,
        Err(e) => return send_error_with(out, e, &extra).await,
    };
    match req.input.start(&req.options) {
        Ok(c) => {
            let how = How {
                kind: T::KIND,
                stream: req.stream,
                include_usage: req.include_usage,
                logprobs: req.options.logprobs.is_some(),
                headers: &extra,
            };
            respond(out, how, model, c).await
        }
        Err(e) => send_error_with(out, api_error(e), &extra).await,
    }
}

/// How to answer a completion.
struct How<'a> {
    kind: Kind,
    stream: bool,
    include_usage: bool,
    /// Whether to report log probabilities.
    logprobs: bool,
    /// Headers added to the response.
    headers: &'a [(&'a str, &'a str)],
}

async fn respond(out: ResponseOutparam, how: How<'_>, model: String, completion: Completion) {
    let How {
        kind,
        stream,
        include_usage,
        logprobs: with_logprobs,
        headers: extra,
    } = how;
    let id = new_id(if matches!(kind, Kind::Chat) {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let created = now_secs();
    // The tokens behind the text `next` has returned (none unless asked for).
    let take = || {
        if with_logprobs {
            completion.take_logprobs()
        } else {
            vec![]
        }
    };
    let mut offsets = Offsets::default();
    if !stream {
        let mut text = String::new();
        let mut tokens = vec![];
        loop {
            match completion.next() {
                Ok(Some(piece)) => text.push_str(&piece),
                Ok(None) => break,
                Err(e) => return send_error_with(out, api_error(e), extra).await,
            }
            tokens.extend(take());
        }
        tokens.extend(take());
        let s = completion.summary();
        let lp = if with_logprobs {
            kind.logprobs(&tokens, &text, &mut offsets)
        } else {
            Value::Null
        };
        let finish = Some(finish_reason(s.finish_reason));
        let body = json!({
            "id": id, "object": kind.object(false), "created": created, "model": model,
            "choices": [kind.choice(Some(&text), false, finish, false, lp)],
            "usage": usage(&s),
        });
        return send_json(out, 200, &body, extra).await;
    }

    // Server-Sent Events: one `data:` event per generated piece, flushed as it is produced,
    // with the log probabilities of its tokens.
    let mut pairs = vec![
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
    ];
    pairs.extend_from_slice(extra);
    let response = OutgoingResponse::new(headers(&pairs));
    let _ = response.set_status_code(200);
    let mut sink = response.take_body();
    out.set(response);
    let chunk = |choices: Value, usage_v: Option<Value>| {
        let mut v = json!({"id": id, "object": kind.object(true), "created": created, "model": model, "choices": choices});
        if let Some(u) = usage_v {
            v["usage"] = u;
        } else if include_usage {
            v["usage"] = Value::Null;
        }
        format!("data: {v}\n\n").into_bytes()
    };
    let mut first = true;
    let mut text = String::new();
    loop {
        let event = match completion.next() {
            Ok(Some(piece)) => {
                text.push_str(&piece);
                let lp = if with_logprobs {
                    kind.logprobs(&take(), &text, &mut offsets)
                } else {
                    Value::Null
                };
                let c = chunk(
                    json!([kind.choice(Some(&piece), first, None, true, lp)]),
                    None,
                );
                first = false;
                c
            }
            Ok(None) => break,
            Err(e) => {
                let _ = sink
                    .send(format!("data: {}\n\n", error_body(&api_error(e))).into_bytes())
                    .await;
                break;
            }
        };
        if sink.send(event).await.is_err() {
            // The client went away: dropping the completion stops generation.
            return;
        }
    }
    let s = completion.summary();
    // Tokens left at the end (text-less ones) ride on the last chunk.
    let rest = take();
    let lp = if rest.is_empty() {
        Value::Null
    } else {
        kind.logprobs(&rest, &text, &mut offsets)
    };
    let finish = Some(finish_reason(s.finish_reason));
    let mut tail = chunk(json!([kind.choice(None, first, finish, true, lp)]), None);
    if include_usage {
        tail.extend(chunk(json!([]), Some(usage(&s))));
    }
    tail.extend_from_slice(b"data: [DONE]\n\n");
    let _ = sink.send(tail).await;
}

pub async fn models(out: ResponseOutparam) {
    match generator::list_models() {
        Ok(models) => {
            let data: Vec<Value> = models
                .iter()
                .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "edge-slm", "context_length": m.context_length}))
                .collect();
            send_json(out, 200, &json!({"object": "list", "data": data}), &[]).await
        }
        Err(e) => send_error(out, api_error(e)).await,
    }
}

pub async fn health(out: ResponseOutparam) {
    match generator::list_models() {
        Ok(m) if !m.is_empty() => {
            send_json(out, 200, &json!({"status": "ok", "models": m.len()}), &[]).await
        }
        Ok(_) => send_json(out, 503, &json!({"status": "no models installed"}), &[]).await,
        Err(e) => send_error(out, api_error(e)).await,
    }
}

pub async fn send_error(out: ResponseOutparam, e: ApiError) {
    send_error_with(out, e, &[]).await
}

async fn send_error_with(out: ResponseOutparam, e: ApiError, extra: &[(&str, &str)]) {
    send_json(out, e.status, &error_body(&e), extra).await
}

/// A JSON response, with the headers `extra`.
async fn send_json(out: ResponseOutparam, status: u16, body: &Value, extra: &[(&str, &str)]) {
    let mut pairs = vec![("content-type", "application/json")];
    pairs.extend_from_slice(extra);
    let response = OutgoingResponse::new(headers(&pairs));
    let _ = response.set_status_code(status);
    let _ = out
        .set_with_body(response, body.to_string().into_bytes())
        .await;
}

fn headers(pairs: &[(&str, &str)]) -> Fields {
    let list: Vec<(String, Vec<u8>)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
    Fields::from_list(&list).expect("static header names are valid")
}

use futures::SinkExt;
use spin_sdk::http::{Fields, OutgoingResponse, ResponseOutparam};
