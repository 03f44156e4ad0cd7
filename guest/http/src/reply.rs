//! Turning generator results into OpenAI JSON responses and Server-Sent Events.

use serde_json::{json, Value};

use crate::bindings::edge::slm::generator::{self, Completion};
use crate::bindings::edge::slm::types::{
    Error as GenError, FinishReason, GeneratedToken, Message, Options, Summary, ToolCallDelta,
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
        FinishReason::ToolCalls => "tool_calls",
    }
}

/// The tool calls of an answer, put together from their deltas (non-streamed responses).
#[derive(Default, Debug, PartialEq)]
struct ToolCalls {
    /// (index, id, name, arguments), in the order the calls began.
    calls: Vec<(u32, String, String, String)>,
}

impl ToolCalls {
    fn add(&mut self, deltas: Vec<ToolCallDelta>) {
        for d in deltas {
            let at = match self.calls.iter().position(|c| c.0 == d.index) {
                Some(at) => at,
                None => {
                    self.calls
                        .push((d.index, String::new(), String::new(), String::new()));
                    self.calls.len() - 1
                }
            };
            let call = &mut self.calls[at];
            if let Some(id) = d.id {
                call.1 = id;
            }
            if let Some(name) = d.name {
                call.2 = name;
            }
            call.3.push_str(&d.arguments);
        }
    }

    fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// `message.tool_calls`, by index.
    fn json(&self) -> Value {
        let mut calls: Vec<_> = self.calls.iter().collect();
        calls.sort_by_key(|c| c.0);
        calls
            .into_iter()
            .map(|(_, id, name, arguments)| {
                json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
            })
            .collect()
    }
}

/// The streamed `delta.tool_calls` entries of these deltas, one per chunk, as OpenAI frames
/// them: a call's first chunk carries its `index`, `id`, `type` and `function.name` with
/// `function.arguments` "", the following ones `index` and `function.arguments` alone.
fn tool_call_chunks(deltas: Vec<ToolCallDelta>) -> Vec<Value> {
    let mut out = vec![];
    for d in deltas {
        if d.id.is_some() || d.name.is_some() {
            let mut call = serde_json::Map::new();
            call.insert("index".into(), json!(d.index));
            if let Some(id) = d.id {
                call.insert("id".into(), json!(id));
                call.insert("type".into(), json!("function"));
            }
            let mut function = serde_json::Map::new();
            if let Some(name) = d.name {
                function.insert("name".into(), json!(name));
            }
            function.insert("arguments".into(), json!(""));
            call.insert("function".into(), Value::Object(function));
            out.push(Value::Object(call));
        }
        if !d.arguments.is_empty() {
            out.push(json!({"index": d.index, "function": {"arguments": d.arguments}}));
        }
    }
    out
}

/// A streamed chat choice carrying one `delta.tool_calls` entry; the response's first chunk
/// also has the role and `content: null`.
fn tool_call_choice(call: Value, first: bool, logprobs: Value) -> Value {
    let mut delta = serde_json::Map::new();
    if first {
        delta.insert("role".into(), json!("assistant"));
        delta.insert("content".into(), Value::Null);
    }
    delta.insert("tool_calls".into(), json!([call]));
    json!({"index": 0, "delta": delta, "finish_reason": null, "logprobs": logprobs})
}

/// The `logprobs` of a choice whose answer is tool calls, when log probabilities were asked
/// for: no message content, so no content tokens (the tokens of the calls are not reported).
fn tool_call_logprobs() -> Value {
    json!({"content": null, "refusal": null})
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
                tools: !req.options.tools.is_empty(),
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
    /// Whether the model may call tools (whether to ask the completion for tool calls).
    tools: bool,
    /// Headers added to the response.
    headers: &'a [(&'a str, &'a str)],
}

async fn respond(out: ResponseOutparam, how: How<'_>, model: String, completion: Completion) {
    let How {
        kind,
        stream,
        include_usage,
        logprobs: with_logprobs,
        tools,
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
    // The tool calls written since the last call (none unless the request has tools).
    let take_calls = || {
        if tools {
            completion.take_tool_calls()
        } else {
            vec![]
        }
    };
    let mut offsets = Offsets::default();
    if !stream {
        let mut text = String::new();
        let mut tokens = vec![];
        let mut calls = ToolCalls::default();
        loop {
            match completion.next() {
                Ok(Some(piece)) => text.push_str(&piece),
                Ok(None) => break,
                Err(e) => return send_error_with(out, api_error(e), extra).await,
            }
            tokens.extend(take());
            calls.add(take_calls());
        }
        tokens.extend(take());
        calls.add(take_calls());
        let s = completion.summary();
        let finish = Some(finish_reason(s.finish_reason));
        let choice = if calls.is_empty() {
            let lp = if with_logprobs {
                kind.logprobs(&tokens, &text, &mut offsets)
            } else {
                Value::Null
            };
            kind.choice(Some(&text), false, finish, false, lp)
        } else {
            // The answer is tool calls: no content (OpenAI's `content: null`).
            let content = if text.is_empty() {
                Value::Null
            } else {
                json!(text)
            };
            let lp = if with_logprobs {
                tool_call_logprobs()
            } else {
                Value::Null
            };
            json!({"index": 0, "message": {"role": "assistant", "content": content, "tool_calls": calls.json()},
                   "finish_reason": finish, "logprobs": lp})
        };
        let body = json!({
            "id": id, "object": kind.object(false), "created": created, "model": model,
            "choices": [choice],
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
    // Tokens not sent yet: those of empty pieces wait for the next piece with text.
    let mut pending: Vec<GeneratedToken> = vec![];
    // Whether the answer is tool calls (then no token is reported: there is no content).
    let mut tool_answer = false;
    let tool_lp = || {
        if with_logprobs {
            tool_call_logprobs()
        } else {
            Value::Null
        }
    };
    let mut failed = false;
    loop {
        let piece = match completion.next() {
            Ok(Some(piece)) => piece,
            Ok(None) => break,
            Err(e) => {
                let _ = sink
                    .send(format!("data: {}\n\n", error_body(&api_error(e))).into_bytes())
                    .await;
                failed = true;
                break;
            }
        };
        let mut events = vec![];
        pending.extend(take());
        if !piece.is_empty() {
            text.push_str(&piece);
            let lp = if with_logprobs {
                kind.logprobs(&std::mem::take(&mut pending), &text, &mut offsets)
            } else {
                Value::Null
            };
            events.extend(chunk(
                json!([kind.choice(Some(&piece), first, None, true, lp)]),
                None,
            ));
            first = false;
        }
        for call in tool_call_chunks(take_calls()) {
            tool_answer = true;
            events.extend(chunk(
                json!([tool_call_choice(call, first, tool_lp())]),
                None,
            ));
            first = false;
        }
        if !events.is_empty() && sink.send(events).await.is_err() {
            // The client went away: dropping the completion stops generation.
            return;
        }
    }
    let mut tail = vec![];
    if !failed {
        for call in tool_call_chunks(take_calls()) {
            tool_answer = true;
            tail.extend(chunk(
                json!([tool_call_choice(call, first, tool_lp())]),
                None,
            ));
            first = false;
        }
    }
    let s = completion.summary();
    // Tokens left at the end (text-less ones) ride on the last chunk.
    pending.extend(take());
    let lp = if tool_answer {
        tool_lp()
    } else if pending.is_empty() {
        Value::Null
    } else {
        kind.logprobs(&pending, &text, &mut offsets)
    };
    let finish = Some(finish_reason(s.finish_reason));
    tail.extend(chunk(
        json!([kind.choice(None, first, finish, true, lp)]),
        None,
    ));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(index: u32, id: Option<&str>, name: Option<&str>, arguments: &str) -> ToolCallDelta {
        ToolCallDelta {
            index,
            id: id.map(str::to_string),
            name: name.map(str::to_string),
            arguments: arguments.to_string(),
        }
    }

    #[test]
    fn tool_call_deltas_put_together() {
        let mut calls = ToolCalls::default();
        assert!(calls.is_empty());
        calls.add(vec![delta(0, Some("call_a"), Some("get_weather"), "")]);
        calls.add(vec![delta(0, None, None, "{\"city\": ")]);
        calls.add(vec![]);
        calls.add(vec![
            delta(0, None, None, "\"Paris\"}"),
            delta(1, Some("call_b"), Some("now"), "{}"),
        ]);
        assert_eq!(
            calls.json(),
            json!([
                {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": "{}"}},
            ])
        );
        assert_eq!(finish_reason(FinishReason::ToolCalls), "tool_calls");
    }

    #[test]
    fn tool_call_chunks_as_openai_frames_them() {
        // A header with arguments: the header (arguments "") and then the arguments.
        assert_eq!(
            tool_call_chunks(vec![
                delta(0, Some("call_a"), Some("get_weather"), "{\"ci"),
                delta(0, None, None, ""),
                delta(0, None, None, "ty\": 1}"),
                delta(1, Some("call_b"), Some("now"), ""),
            ]),
            [
                json!({"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}),
                json!({"index": 0, "function": {"arguments": "{\"ci"}}),
                json!({"index": 0, "function": {"arguments": "ty\": 1}"}}),
                json!({"index": 1, "id": "call_b", "type": "function", "function": {"name": "now", "arguments": ""}}),
            ]
        );
        let call = json!({"index": 0, "function": {"arguments": "{}"}});
        assert_eq!(
            tool_call_choice(call.clone(), true, Value::Null),
            json!({"index": 0, "delta": {"role": "assistant", "content": null, "tool_calls": [call]},
                   "finish_reason": null, "logprobs": null})
        );
        assert_eq!(
            tool_call_choice(call.clone(), false, tool_call_logprobs()),
            json!({"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": null,
                   "logprobs": {"content": null, "refusal": null}})
        );
    }
}
