//! OpenAI request bodies: parsing and validation into generator calls. Which fields are
//! accepted at all is crate::fields's job; this module reads what they ask for.

use serde_json::{Map, Value};

use crate::fields::{only, Body, Endpoint, MESSAGE_UNSUPPORTED};
use crate::tools::{tool_call, tool_options, tool_results, valid_name};

use crate::bindings::edge::slm::types::{Format, Message, Options, Sampling, TokenBias};

/// A request that could not be accepted, with the HTTP status and OpenAI error fields it maps to.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param: param.map(str::to_string),
        }
    }
}

/// The most bytes of an affinity key (`prompt_cache_key` or `user`).
pub const MAX_AFFINITY_KEY: usize = 512;

/// What the client asked for, ready for the generator.
#[derive(Debug)]
pub struct Request<T> {
    pub input: T,
    pub options: Options,
    pub stream: bool,
    pub include_usage: bool,
    /// The field that set `options.max_tokens` ("max_tokens" or "max_completion_tokens"); None
    /// when the client set neither.
    pub max_tokens_field: Option<&'static str>,
    /// `prompt_cache_key`, else `user` (neither empty): what a proxy routes on, echoed in the
    /// response header [`AFFINITY_HEADER`].
    pub affinity_key: Option<String>,
}

/// The response header that carries a request's affinity key (percent-encoded: see
/// [`header_value`]).
pub const AFFINITY_HEADER: &str = "x-slm-affinity-key";

/// `key` as a header value: bytes outside printable ASCII, space and `%` become `%XX`, so any
/// string is a valid header and the encoding is reversible.
pub fn header_value(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The environment variable holding the server's limit on tokens generated per request.
pub const MAX_TOKENS_VAR: &str = "SLM_MAX_TOKENS";

/// The server's limit on tokens generated per request, from [`MAX_TOKENS_VAR`]'s value: None
/// when unset; a value that is not a whole number from 1 to 4294967295 is a misconfigured
/// server (500), never ignored.
pub fn token_limit(value: Option<&str>) -> Result<Option<u32>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    match value.trim().parse::<u32>() {
        Ok(n) if n > 0 => Ok(Some(n)),
        _ => Err(ApiError {
            status: 500,
            message: format!(
                "the server is misconfigured: {MAX_TOKENS_VAR} = {value:?} is not a token limit \
                 (a whole number from 1 to 4294967295)"
            ),
            kind: "server_error",
            code: None,
            param: None,
        }),
    }
}

impl<T> Request<T> {
    /// Apply the server's token limit: a larger `max_tokens` is refused (400, naming the
    /// field the client used); a request without one gets the limit.
    pub fn limit_tokens(&mut self, limit: Option<u32>) -> Result<(), ApiError> {
        let Some(limit) = limit else {
            return Ok(());
        };
        match (self.options.max_tokens, self.max_tokens_field) {
            (Some(asked), Some(field)) if asked > limit => Err(ApiError::invalid(
                format!(
                    "{field} = {asked} is above this server's limit of {limit} tokens per request"
                ),
                Some(field),
            )),
            (Some(_), _) => Ok(()),
            (None, _) => {
                self.options.max_tokens = Some(limit);
                Ok(())
            }
        }
    }
}

/// `stop`: a string or a list of strings.
#[derive(serde::Deserialize, Debug)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// What the shared fields ask for.
struct Common {
    options: Options,
    stream: bool,
    include_usage: bool,
    max_tokens_field: Option<&'static str>,
    affinity_key: Option<String>,
}

fn common_options(b: &mut Body, endpoint: Endpoint) -> Result<Common, ApiError> {
    if let Some(n) = b.take::<u32>("n")? {
        if n != 1 {
            return Err(ApiError::invalid(
                format!(
                    "n = {n} is not supported by this server: only one choice (n = 1) per request"
                ),
                Some("n"),
            ));
        }
    }
    let stop = match b.take::<Stop>("stop")? {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid(
            "stop strings must not be empty",
            Some("stop"),
        ));
    }
    let max_tokens = b.take::<u32>("max_tokens")?;
    let max_completion_tokens = b.take::<u32>("max_completion_tokens")?;
    let max_tokens_field = if max_completion_tokens.is_some() {
        Some("max_completion_tokens")
    } else if max_tokens.is_some() {
        Some("max_tokens")
    } else {
        None
    };
    let logprobs = logprobs(b, endpoint)?;
    if endpoint == Endpoint::Completions {
        let echo = b.take::<bool>("echo")?;
        only("echo", echo != Some(true), "false")?;
        let best_of = b.take::<u32>("best_of")?;
        only("best_of", best_of.unwrap_or(1) == 1, "1")?;
    }
    let logit_bias = logit_bias(b)?;
    let store = b.take::<bool>("store")?;
    only("store", store != Some(true), "false")?;
    b.take::<std::collections::BTreeMap<String, String>>("metadata")?;
    b.take::<String>("safety_identifier")?;
    let (stream, include_usage) = stream_options(b)?;
    let affinity_key = affinity_key(b)?;
    let options = Options {
        model: b.take("model")?,
        max_tokens: max_completion_tokens.or(max_tokens),
        stop,
        sampling: Sampling {
            temperature: b.take("temperature")?,
            top_k: b.take("top_k")?,
            top_p: b.take("top_p")?,
            min_p: b.take("min_p")?,
            repetition_penalty: b.take("repetition_penalty")?,
            seed: b.take("seed")?,
            frequency_penalty: b.take("frequency_penalty")?,
            presence_penalty: b.take("presence_penalty")?,
            logit_bias,
        },
        logprobs,
        format: response_format(b)?,
        // Chat only: `chat_request` sets them (`tools`).
        tools: vec![],
        tool_choice: None,
        parallel_tool_calls: None,
    };
    Ok(Common {
        options,
        stream,
        include_usage,
        max_tokens_field,
        affinity_key,
    })
}

/// The most alternatives per token: chat's `top_logprobs`, completions' `logprobs` (OpenAI's
/// limits).
pub const MAX_TOP_LOGPROBS: u32 = 20;
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// What `options.logprobs` asks for: chat's `logprobs` (bool) and `top_logprobs`, or
/// completions' `logprobs` (how many alternatives).
fn logprobs(b: &mut Body, endpoint: Endpoint) -> Result<Option<u32>, ApiError> {
    let (n, field, max) = match endpoint {
        Endpoint::Chat => {
            let on = b.take::<bool>("logprobs")?.unwrap_or(false);
            let top = b.take::<u32>("top_logprobs")?;
            if top.is_some() && !on {
                return Err(ApiError::invalid(
                    "top_logprobs needs logprobs: true",
                    Some("top_logprobs"),
                ));
            }
            if !on {
                return Ok(None);
            }
            (top.unwrap_or(0), "top_logprobs", MAX_TOP_LOGPROBS)
        }
        Endpoint::Completions => match b.take::<u32>("logprobs")? {
            None => return Ok(None),
            Some(n) => (n, "logprobs", MAX_COMPLETION_LOGPROBS),
        },
    };
    if n > max {
        return Err(ApiError::invalid(
            format!("{field} must be at most {max}, got {n}"),
            Some(field),
        ));
    }
    Ok(Some(n))
}

/// `logit_bias`: token ids (as strings) to biases. The generator checks the ids against the
/// vocabulary and the biases' range.
fn logit_bias(b: &mut Body) -> Result<Vec<TokenBias>, ApiError> {
    let map = b
        .take::<std::collections::BTreeMap<String, f32>>("logit_bias")?
        .unwrap_or_default();
    map.into_iter()
        .map(|(id, bias)| match id.parse::<u32>() {
            Ok(token) => Ok(TokenBias { token, bias }),
            Err(_) => Err(ApiError::invalid(
                format!("logit_bias: {id:?} is not a token id"),
                Some("logit_bias"),
            )),
        })
        .collect()
}

/// `response_format`: `text`, `json_object`, or `json_schema` with its `schema` (enforced
/// whether `strict` is true or not: the output always validates). Every key is read.
fn response_format(b: &mut Body) -> Result<Option<Format>, ApiError> {
    const FIELD: &str = "response_format";
    let Some(mut rf) = b.take::<Map<String, Value>>(FIELD)? else {
        return Ok(None);
    };
    let bad = |param: &str, msg: String| ApiError::invalid(msg, Some(param));
    let kind =
        match rf.remove("type") {
            Some(Value::String(t)) => t,
            _ => return Err(bad(
                "response_format.type",
                "response_format.type is required: \"text\", \"json_object\" or \"json_schema\""
                    .into(),
            )),
        };
    let format = match kind.as_str() {
        "text" => None,
        "json_object" => Some(Format::JsonObject),
        "json_schema" => {
            let mut spec = match rf.remove("json_schema") {
                Some(Value::Object(spec)) => spec,
                _ => {
                    return Err(bad(
                        "response_format.json_schema",
                        "response_format.json_schema is required (an object with name and schema)".into(),
                    ))
                }
            };
            match spec.remove("name") {
                Some(Value::String(n)) if valid_name(&n) => {}
                _ => {
                    return Err(bad(
                        "response_format.json_schema.name",
                        "response_format.json_schema.name is required: a-z, A-Z, 0-9, _ and -, at most 64".into(),
                    ))
                }
            }
            match spec.remove("description") {
                None | Some(Value::Null) | Some(Value::String(_)) => {}
                Some(_) => return Err(bad("response_format.json_schema.description", "invalid response_format.json_schema.description: expected a string".into())),
            }
            match spec.remove("strict") {
                None | Some(Value::Null) | Some(Value::Bool(_)) => {}
                Some(_) => return Err(bad("response_format.json_schema.strict", "invalid response_format.json_schema.strict: expected a boolean".into())),
            }
            let schema = match spec.remove("schema") {
                None | Some(Value::Null) => Value::Object(Map::new()), // any JSON value
                Some(s @ (Value::Object(_) | Value::Bool(_))) => s,
                Some(_) => return Err(bad("response_format.json_schema.schema", "invalid response_format.json_schema.schema: expected an object".into())),
            };
            if let Some(k) = spec.keys().next() {
                return Err(ApiError::unsupported(&format!("response_format.json_schema.{k}"), None));
            }
            Some(Format::JsonSchema(schema.to_string()))
        }
        other => {
            return Err(bad(
                "response_format.type",
                format!("response_format.type {other:?} is not supported: \"text\", \"json_object\" or \"json_schema\""),
            ))
        }
    };
    if let Some(k) = rf.keys().next() {
        return Err(ApiError::unsupported(&format!("response_format.{k}"), None));
    }
    Ok(format)
}

/// `stream` and `stream_options.include_usage`.
fn stream_options(b: &mut Body) -> Result<(bool, bool), ApiError> {
    let stream = b.take::<bool>("stream")?.unwrap_or(false);
    let mut include_usage = false;
    for (name, value) in b
        .take::<Map<String, Value>>("stream_options")?
        .unwrap_or_default()
    {
        let param = format!("stream_options.{name}");
        let flag = match &value {
            Value::Null => None,
            Value::Bool(v) => Some(*v),
            _ => {
                return Err(ApiError::invalid(
                    format!("invalid {param}: expected a boolean"),
                    Some(&param),
                ))
            }
        };
        match name.as_str() {
            "include_usage" => include_usage = flag.unwrap_or(false),
            "include_obfuscation" => only(&param, flag != Some(true), "false")?,
            _ => return Err(ApiError::unsupported(&param, None)),
        }
    }
    Ok((stream, include_usage))
}

/// `prompt_cache_key`, else `user`: strings of at most [`MAX_AFFINITY_KEY`] bytes; empty is
/// absent.
fn affinity_key(b: &mut Body) -> Result<Option<String>, ApiError> {
    let mut key = None;
    for name in ["prompt_cache_key", "user"] {
        let Some(v) = b.take::<String>(name)? else {
            continue;
        };
        if v.len() > MAX_AFFINITY_KEY {
            return Err(ApiError::invalid(
                format!("{name} is longer than {MAX_AFFINITY_KEY} bytes"),
                Some(name),
            ));
        }
        if key.is_none() && !v.is_empty() {
            key = Some(v);
        }
    }
    Ok(key)
}

/// The request field that sets a generator option (`name` as in the WIT `options` /
/// `sampling` records), for the `param` of an error about it.
pub fn request_field(name: &str) -> Option<&'static str> {
    Some(match name {
        "temperature" => "temperature",
        "top-p" => "top_p",
        "min-p" => "min_p",
        "repetition-penalty" => "repetition_penalty",
        "frequency-penalty" => "frequency_penalty",
        "presence-penalty" => "presence_penalty",
        "logit-bias" => "logit_bias",
        "logprobs" => "logprobs",
        "stop" => "stop",
        "format" => "response_format",
        "tools" => "tools",
        "tool-choice" => "tool_choice",
        "parallel-tool-calls" => "parallel_tool_calls",
        _ => return None,
    })
}

pub fn chat_request(body: &[u8]) -> Result<Request<Vec<Message>>, ApiError> {
    let mut b = Body::parse(body, Endpoint::Chat)?;
    let raw = b
        .take::<Vec<Value>>("messages")?
        .ok_or_else(|| ApiError::invalid("messages is required", Some("messages")))?;
    if raw.is_empty() {
        return Err(ApiError::invalid(
            "messages must contain at least one message",
            Some("messages"),
        ));
    }
    let mut messages = Vec::with_capacity(raw.len());
    for (i, m) in raw.into_iter().enumerate() {
        messages.push(message(i, m)?);
    }
    tool_results(&messages)?;
    let mut c = common_options(&mut b, Endpoint::Chat)?;
    let tools = tool_options(&mut b)?;
    c.options.tools = tools.tools;
    c.options.tool_choice = tools.choice;
    c.options.parallel_tool_calls = tools.parallel;
    b.finish()?;
    Ok(Request {
        input: messages,
        options: c.options,
        stream: c.stream,
        include_usage: c.include_usage,
        max_tokens_field: c.max_tokens_field,
        affinity_key: c.affinity_key,
    })
}

/// Message `i` of `messages`: `role` and `content`; an assistant message's `tool_calls`, a tool
/// message's `tool_call_id`. Any other field (`name`, `refusal`...) that is not null is
/// refused, naming it (`messages[i].name`).
fn message(i: usize, m: Value) -> Result<Message, ApiError> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let Value::Object(mut m) = m else {
        return Err(ApiError::invalid(
            format!("messages[{i}] must be an object"),
            Some("messages"),
        ));
    };
    let role = match m.remove("role") {
        Some(Value::String(r)) => r,
        Some(_) => {
            return Err(ApiError::invalid(
                format!("{} must be a string", at("role")),
                Some(&at("role")),
            ))
        }
        None => {
            return Err(ApiError::invalid(
                format!("{} is required", at("role")),
                Some(&at("role")),
            ))
        }
    };
    if !matches!(
        role.as_str(),
        "system" | "user" | "assistant" | "developer" | "tool"
    ) {
        return Err(ApiError::invalid(
            format!("unsupported message role '{role}'"),
            Some("messages"),
        ));
    }
    // OpenAI's newer "developer" role is the system role under another name.
    let role = if role == "developer" {
        "system".to_string()
    } else {
        role
    };
    let content = match m.remove("content") {
        None | Some(Value::Null) if role == "tool" => {
            return Err(ApiError::invalid(
                format!("{} is required: the tool's result", at("content")),
                Some(&at("content")),
            ))
        }
        None | Some(Value::Null) => String::new(),
        Some(Value::String(t)) => t,
        Some(Value::Array(parts)) => text_parts(i, &parts)?,
        Some(_) => {
            return Err(ApiError::invalid(
                format!("{} must be a string or a list of parts", at("content")),
                Some(&at("content")),
            ))
        }
    };
    let tool_calls = match m.remove("tool_calls") {
        None | Some(Value::Null) => vec![],
        Some(_) if role != "assistant" => {
            return Err(ApiError::invalid(
                format!("{} is only allowed on assistant messages", at("tool_calls")),
                Some(&at("tool_calls")),
            ))
        }
        Some(Value::Array(calls)) => calls
            .into_iter()
            .enumerate()
            .map(|(j, c)| tool_call(i, j, c))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                format!("{} must be a list of tool calls", at("tool_calls")),
                Some(&at("tool_calls")),
            ))
        }
    };
    let tool_call_id = match m.remove("tool_call_id") {
        None | Some(Value::Null) => None,
        Some(_) if role != "tool" => {
            return Err(ApiError::invalid(
                format!("{} is only allowed on tool messages", at("tool_call_id")),
                Some(&at("tool_call_id")),
            ))
        }
        Some(Value::String(id)) => Some(id),
        Some(_) => {
            return Err(ApiError::invalid(
                format!("{} must be a string", at("tool_call_id")),
                Some(&at("tool_call_id")),
            ))
        }
    };
    if role == "tool" && tool_call_id.is_none() {
        return Err(ApiError::invalid(
            format!(
                "{} is required: the id of the tool call this message answers",
                at("tool_call_id")
            ),
            Some(&at("tool_call_id")),
        ));
    }
    if let Some((field, _)) = m.iter().find(|(_, v)| !v.is_null()) {
        let what = MESSAGE_UNSUPPORTED
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, what)| *what);
        return Err(ApiError::unsupported(&at(field), what));
    }
    Ok(Message {
        role,
        content,
        tool_calls,
        tool_call_id,
    })
}

/// Text parts, concatenated; any other part (images, audio, files) is refused.
fn text_parts(i: usize, parts: &[Value]) -> Result<String, ApiError> {
    let mut text = String::new();
    for p in parts {
        match (
            p.get("type").and_then(Value::as_str),
            p.get("text").and_then(Value::as_str),
        ) {
            (Some("text"), Some(t)) => text.push_str(t),
            _ => {
                return Err(ApiError::invalid(
                    "only text content parts are supported by this server",
                    Some(&format!("messages[{i}].content")),
                ))
            }
        }
    }
    Ok(text)
}

pub fn completion_request(body: &[u8]) -> Result<Request<String>, ApiError> {
    let mut b = Body::parse(body, Endpoint::Completions)?;
    let prompt = match b.take::<Value>("prompt")? {
        Some(Value::String(p)) => p,
        Some(Value::Array(v)) if v.len() == 1 && v[0].is_string() => {
            v[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::Array(v)) if v.iter().all(Value::is_string) => {
            return Err(ApiError::invalid(
                "prompt must be one string (batches are not supported)",
                Some("prompt"),
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "prompt must be a string (token ids are not supported)",
                Some("prompt"),
            ))
        }
        None => return Err(ApiError::invalid("prompt is required", Some("prompt"))),
    };
    let c = common_options(&mut b, Endpoint::Completions)?;
    b.finish()?;
    Ok(Request {
        input: prompt,
        options: c.options,
        stream: c.stream,
        include_usage: c.include_usage,
        max_tokens_field: c.max_tokens_field,
        affinity_key: c.affinity_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::edge::slm::types::ToolChoice;
    use crate::fields::tests::{chat, completion, param};
    use serde_json::json;

    #[test]
    fn chat_fields_map_to_options() {
        let r = chat_request(br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":5,
            "temperature":0.5,"top_p":0.9,"top_k":4,"min_p":0.1,"seed":7,"stop":"x","repetition_penalty":1.1,
            "stream":true,"stream_options":{"include_usage":true},"user":"u1"}"#).unwrap();
        assert_eq!(r.input[0].content, "hi");
        assert_eq!(r.options.max_tokens, Some(5));
        assert_eq!(r.options.stop, vec!["x".to_string()]);
        assert_eq!(r.options.sampling.seed, Some(7));
        assert_eq!(r.options.sampling.top_k, Some(4));
        assert!(r.stream && r.include_usage);
        assert_eq!(r.affinity_key.as_deref(), Some("u1"));
    }

    #[test]
    fn logprobs_bias_and_penalties_map_to_options() {
        let r = chat(
            json!({"logprobs": true, "top_logprobs": 3, "logit_bias": {"7": -100, "12": 5.5},
            "frequency_penalty": 0.5, "presence_penalty": -1}),
        )
        .unwrap();
        assert_eq!(r.options.logprobs, Some(3));
        let bias: Vec<(u32, f32)> = r
            .options
            .sampling
            .logit_bias
            .iter()
            .map(|b| (b.token, b.bias))
            .collect();
        assert_eq!(bias, [(12, 5.5), (7, -100.0)]);
        assert_eq!(r.options.sampling.frequency_penalty, Some(0.5));
        assert_eq!(r.options.sampling.presence_penalty, Some(-1.0));
        assert_eq!(
            chat(json!({"logprobs": true})).unwrap().options.logprobs,
            Some(0)
        );
        assert_eq!(
            chat(json!({"logprobs": false})).unwrap().options.logprobs,
            None
        );
        assert_eq!(
            chat(json!({"top_logprobs": 20, "logprobs": true}))
                .unwrap()
                .options
                .logprobs,
            Some(20)
        );
        let e = chat(json!({"top_logprobs": 2, "logprobs": false})).unwrap_err();
        assert_eq!(param(e).as_deref(), Some("top_logprobs"));
        assert_eq!(
            completion(json!({"logprobs": 5})).unwrap().options.logprobs,
            Some(5)
        );
        assert_eq!(
            completion(json!({"logprobs": 0})).unwrap().options.logprobs,
            Some(0)
        );
        assert_eq!(completion(json!({})).unwrap().options.logprobs, None);
        // The generator's option names map back to the request's fields.
        for (option, field) in [
            ("logit-bias", "logit_bias"),
            ("frequency-penalty", "frequency_penalty"),
            ("presence-penalty", "presence_penalty"),
            ("logprobs", "logprobs"),
        ] {
            assert_eq!(request_field(option), Some(field));
        }
    }

    #[test]
    fn message_fields_and_parts() {
        let ask = |m: Value| {
            chat_request(
                json!({ "messages": [json!({"role": "user", "content": "a"}), m] })
                    .to_string()
                    .as_bytes(),
            )
        };
        for field in ["name", "refusal", "cache_control"] {
            let e = ask(json!({"role": "assistant", "content": "b", field: "x"})).unwrap_err();
            assert!(e.message.contains("not supported"), "{e:?}");
            assert_eq!(param(e), Some(format!("messages[1].{field}")));
        }
        // Tool fields on the wrong role, or of the wrong type.
        for (m, field) in [
            (
                json!({"role": "assistant", "content": "b", "tool_calls": "x"}),
                "tool_calls",
            ),
            (
                json!({"role": "user", "content": "b", "tool_calls": []}),
                "tool_calls",
            ),
            (
                json!({"role": "assistant", "content": "b", "tool_call_id": "x"}),
                "tool_call_id",
            ),
            (
                json!({"role": "tool", "content": "b", "tool_call_id": 5}),
                "tool_call_id",
            ),
        ] {
            assert_eq!(
                param(ask(m).unwrap_err()),
                Some(format!("messages[1].{field}"))
            );
        }
        ask(json!({"role": "assistant", "content": "b", "name": null, "tool_calls": null}))
            .unwrap();
        let image = json!({"role": "user", "content": [{"type": "text", "text": "a"},
            {"type": "image_url", "image_url": {"url": "data:"}}]});
        assert_eq!(
            param(ask(image).unwrap_err()).as_deref(),
            Some("messages[1].content")
        );
        let r = ask(json!({"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}))
            .unwrap();
        assert_eq!(r.input[1].content, "xy");
        assert_eq!(
            param(ask(json!({"content": "b"})).unwrap_err()).as_deref(),
            Some("messages[1].role")
        );
    }

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            "strict": true}})
    }

    #[test]
    fn tools_map_to_options() {
        let r = chat(
            json!({"tools": [weather(), {"type": "function", "function": {"name": "now"}}],
            "tool_choice": "required", "parallel_tool_calls": false}),
        )
        .unwrap();
        let tools = &r.options.tools;
        assert_eq!(tools.len(), 2);
        assert_eq!(tools[0].name, "get_weather");
        assert_eq!(
            tools[0].description.as_deref(),
            Some("The weather in a city")
        );
        let schema: Value = serde_json::from_str(tools[0].parameters.as_deref().unwrap()).unwrap();
        assert_eq!(schema, weather()["function"]["parameters"]);
        assert_eq!(
            (
                tools[1].name.as_str(),
                &tools[1].description,
                &tools[1].parameters
            ),
            ("now", &None, &None)
        );
        assert!(matches!(r.options.tool_choice, Some(ToolChoice::Required)));
        assert_eq!(r.options.parallel_tool_calls, Some(false));
        let choice = |c: Value| {
            chat(json!({"tools": [weather()], "tool_choice": c})).map(|r| r.options.tool_choice)
        };
        assert!(matches!(choice(json!("none")), Ok(Some(ToolChoice::None))));
        assert!(matches!(choice(json!("auto")), Ok(Some(ToolChoice::Auto))));
        assert!(matches!(choice(Value::Null), Ok(None)));
        assert!(matches!(
            choice(json!({"type": "function", "function": {"name": "get_weather"}})),
            Ok(Some(ToolChoice::Function(n))) if n == "get_weather"
        ));
        // Without tools: "none" asks for nothing; the others need tools.
        let r = chat(json!({"tool_choice": "none", "tools": null})).unwrap();
        assert!(r.options.tools.is_empty() && r.options.tool_choice.is_none());
        for extra in [
            json!({"tool_choice": "auto"}),
            json!({"tool_choice": "required"}),
            json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        ] {
            assert_eq!(
                param(chat(extra).unwrap_err()).as_deref(),
                Some("tool_choice")
            );
        }
        let e = chat(json!({"parallel_tool_calls": true})).unwrap_err();
        assert_eq!(param(e).as_deref(), Some("parallel_tool_calls"));
        // No request sets tools by default; text completions refuse them.
        let r = chat(json!({})).unwrap();
        assert!(r.options.tools.is_empty() && r.options.tool_choice.is_none());
        assert_eq!(r.options.parallel_tool_calls, None);
        for field in ["tools", "tool_choice", "parallel_tool_calls"] {
            let e = completion(json!({ field: "auto" })).unwrap_err();
            assert_eq!(param(e).as_deref(), Some(field));
        }
        // The generator's option names map back to the request's fields.
        for (option, field) in [
            ("tools", "tools"),
            ("tool-choice", "tool_choice"),
            ("parallel-tool-calls", "parallel_tool_calls"),
            ("format", "response_format"),
        ] {
            assert_eq!(request_field(option), Some(field));
        }
    }

    #[test]
    fn bad_tools_name_the_field() {
        let f = |extra: Value| json!({"type": "function", "function": extra});
        for (tools, at) in [
            (json!("get_weather"), "tools"),
            (json!([]), "tools"),
            (json!([7]), "tools[0]"),
            (
                json!([{"type": "custom", "custom": {"name": "x"}}]),
                "tools[0].type",
            ),
            (json!([{"function": {"name": "x"}}]), "tools[0].type"),
            (json!([{"type": "function"}]), "tools[0].function"),
            (
                json!([weather(), {"type": "function", "function": {"name": "x"}, "x": 1}]),
                "tools[1].x",
            ),
            (
                json!([f(json!({"description": "no name"}))]),
                "tools[0].function.name",
            ),
            (
                json!([f(json!({"name": "has space"}))]),
                "tools[0].function.name",
            ),
            (
                json!([f(json!({"name": "x".repeat(65)}))]),
                "tools[0].function.name",
            ),
            (json!([f(json!({"name": 5}))]), "tools[0].function.name"),
            (json!([weather(), weather()]), "tools[1].function.name"),
            (
                json!([f(json!({"name": "x", "description": 1}))]),
                "tools[0].function.description",
            ),
            (
                json!([f(json!({"name": "x", "parameters": "{}"}))]),
                "tools[0].function.parameters",
            ),
            (
                json!([f(json!({"name": "x", "parameters": true}))]),
                "tools[0].function.parameters",
            ),
            (
                json!([f(json!({"name": "x", "strict": "yes"}))]),
                "tools[0].function.strict",
            ),
            (
                json!([f(json!({"name": "x", "examples": []}))]),
                "tools[0].function.examples",
            ),
        ] {
            let e = chat(json!({ "tools": tools })).unwrap_err();
            assert_eq!(param(e).as_deref(), Some(at), "{tools}");
        }
        let many: Vec<Value> = (0..=crate::tools::MAX_TOOLS)
            .map(|i| f(json!({"name": format!("f{i}")})))
            .collect();
        assert_eq!(
            param(chat(json!({ "tools": many })).unwrap_err()).as_deref(),
            Some("tools")
        );
        for (c, at) in [
            (json!("always"), "tool_choice"),
            (json!(true), "tool_choice"),
            (
                json!({"type": "function", "function": {"name": "absent"}}),
                "tool_choice",
            ),
            (
                json!({"type": "allowed_tools", "allowed_tools": {}}),
                "tool_choice.type",
            ),
            (
                json!({"function": {"name": "get_weather"}}),
                "tool_choice.type",
            ),
            (json!({"type": "function"}), "tool_choice.function"),
            (
                json!({"type": "function", "function": {}}),
                "tool_choice.function.name",
            ),
            (
                json!({"type": "function", "function": {"name": "get_weather", "x": 1}}),
                "tool_choice.function.x",
            ),
            (
                json!({"type": "function", "function": {"name": "get_weather"}, "x": 1}),
                "tool_choice.x",
            ),
        ] {
            let e = chat(json!({"tools": [weather()], "tool_choice": c})).unwrap_err();
            assert_eq!(param(e).as_deref(), Some(at), "{c}");
        }
        let e = chat(json!({"tools": [weather()], "parallel_tool_calls": "no"})).unwrap_err();
        assert_eq!(param(e).as_deref(), Some("parallel_tool_calls"));
    }

    /// A conversation: the user asks, the assistant calls `calls`, the tool messages answer.
    fn round_trip(calls: Value, answers: &[(&str, Value)]) -> Result<Vec<Message>, ApiError> {
        let mut messages = vec![
            json!({"role": "user", "content": "Weather in Paris?"}),
            json!({"role": "assistant", "content": null, "tool_calls": calls}),
        ];
        for (id, content) in answers {
            messages.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
        }
        chat_request(
            json!({ "messages": messages, "tools": [weather()] })
                .to_string()
                .as_bytes(),
        )
        .map(|r| r.input)
    }

    fn call(id: &str, city: &str) -> Value {
        json!({"id": id, "type": "function", "function": {"name": "get_weather",
            "arguments": json!({"city": city}).to_string()}})
    }

    #[test]
    fn tool_calls_and_results_in_messages() {
        let m = round_trip(
            json!([call("call_1", "Paris"), call("call_2", "Lyon")]),
            &[
                ("call_2", json!("rain")),
                (
                    "call_1",
                    json!([{"type": "text", "text": "sun"}, {"type": "text", "text": "ny"}]),
                ),
            ],
        )
        .unwrap();
        assert_eq!(m.len(), 4);
        assert!(m[0].tool_calls.is_empty() && m[0].tool_call_id.is_none());
        assert_eq!(
            (m[1].role.as_str(), m[1].content.as_str()),
            ("assistant", "")
        );
        let calls: Vec<(&str, &str, &str)> = m[1]
            .tool_calls
            .iter()
            .map(|c| (c.id.as_str(), c.name.as_str(), c.arguments.as_str()))
            .collect();
        assert_eq!(
            calls,
            [
                ("call_1", "get_weather", r#"{"city":"Paris"}"#),
                ("call_2", "get_weather", r#"{"city":"Lyon"}"#)
            ]
        );
        assert!(m[1].tool_call_id.is_none());
        assert_eq!(
            (
                m[2].role.as_str(),
                m[2].content.as_str(),
                m[2].tool_call_id.as_deref()
            ),
            ("tool", "rain", Some("call_2"))
        );
        assert_eq!(
            (m[3].content.as_str(), m[3].tool_call_id.as_deref()),
            ("sunny", Some("call_1"))
        );
        // Content with the calls, or absent; an empty list is no calls.
        let r = chat_request(
            json!({"messages": [{"role": "user", "content": "a"},
                {"role": "assistant", "content": "Let me look.", "tool_calls": [call("c", "Paris")]},
                {"role": "tool", "tool_call_id": "c", "content": "sun"},
                {"role": "assistant", "tool_calls": []}, {"role": "user", "content": "b"}]})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(r.input[1].content, "Let me look.");
        assert!(r.input[3].tool_calls.is_empty());
        // Tool messages in a conversation without `tools` are still a conversation.
        let r = chat_request(
            json!({"messages": [{"role": "assistant", "tool_calls": [call("c", "Paris")]},
                {"role": "tool", "tool_call_id": "c", "content": "sun"}]})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(r.input.len(), 2);
    }

    #[test]
    fn bad_tool_calls_and_results_name_the_field() {
        let one = |c: Value| round_trip(json!([c]), &[("c", json!("sun"))]).unwrap_err();
        let mut c = call("c", "Paris");
        c["function"]["arguments"] = json!({"city": "Paris"});
        for (c, at) in [
            (json!("c"), "messages[1].tool_calls[0]"),
            (
                json!({"type": "function", "function": {"name": "f", "arguments": "{}"}}),
                "messages[1].tool_calls[0].id",
            ),
            (
                json!({"id": "c", "function": {"name": "f", "arguments": "{}"}}),
                "messages[1].tool_calls[0].type",
            ),
            (
                json!({"id": "c", "type": "custom", "custom": {}}),
                "messages[1].tool_calls[0].type",
            ),
            (
                json!({"id": "c", "type": "function"}),
                "messages[1].tool_calls[0].function",
            ),
            (
                json!({"id": "c", "type": "function", "function": {"arguments": "{}"}}),
                "messages[1].tool_calls[0].function.name",
            ),
            (
                json!({"id": "c", "type": "function", "function": {"name": "f"}}),
                "messages[1].tool_calls[0].function.arguments",
            ),
            (c, "messages[1].tool_calls[0].function.arguments"),
            (
                json!({"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}, "index": 0}),
                "messages[1].tool_calls[0].index",
            ),
            (
                json!({"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}", "x": 1}}),
                "messages[1].tool_calls[0].function.x",
            ),
        ] {
            assert_eq!(param(one(c.clone())).as_deref(), Some(at), "{c}");
        }
        let two = json!([call("c", "Paris"), call("d", "Lyon")]);
        // Each call answered, once, right after the assistant message.
        for (answers, at) in [
            (&[("c", json!("sun"))][..], "messages[1].tool_calls"),
            (&[][..], "messages[1].tool_calls"),
            (
                &[("c", json!("sun")), ("e", json!("x"))][..],
                "messages[3].tool_call_id",
            ),
            (
                &[("c", json!("sun")), ("c", json!("x"))][..],
                "messages[3].tool_call_id",
            ),
            (
                &[("c", json!(null)), ("d", json!("x"))][..],
                "messages[2].content",
            ),
            (
                &[("c", json!(5)), ("d", json!("x"))][..],
                "messages[2].content",
            ),
        ] {
            let e = round_trip(two.clone(), answers).unwrap_err();
            assert_eq!(param(e).as_deref(), Some(at), "{answers:?}");
        }
        let e = round_trip(
            json!([call("c", "Paris"), call("c", "Lyon")]),
            &[("c", json!("x"))],
        )
        .unwrap_err();
        assert_eq!(param(e).as_deref(), Some("messages[1].tool_calls[1].id"));
        let ask =
            |messages: Value| chat_request(json!({ "messages": messages }).to_string().as_bytes());
        for (messages, at) in [
            (
                json!([{"role": "tool", "tool_call_id": "c", "content": "x"}]),
                "messages[0].role",
            ),
            (
                json!([{"role": "tool", "content": "x"}]),
                "messages[0].tool_call_id",
            ),
            (
                json!([{"role": "assistant", "tool_calls": [call("c", "P")]}, {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "c", "content": "x"}]),
                "messages[0].tool_calls",
            ),
            (
                json!([{"role": "assistant", "tool_calls": [call("c", "P")]},
                {"role": "tool", "tool_call_id": "c", "content": "x"},
                {"role": "assistant", "content": "ok"},
                {"role": "tool", "tool_call_id": "c", "content": "x"}]),
                "messages[3].role",
            ),
        ] {
            assert_eq!(
                param(ask(messages.clone()).unwrap_err()).as_deref(),
                Some(at),
                "{messages}"
            );
        }
    }

    #[test]
    fn the_affinity_key() {
        let key = |extra| chat(extra).unwrap().affinity_key;
        assert_eq!(key(json!({})), None);
        assert_eq!(key(json!({"user": "u"})).as_deref(), Some("u"));
        assert_eq!(
            key(json!({"user": "u", "prompt_cache_key": "tenant-7"})).as_deref(),
            Some("tenant-7")
        );
        assert_eq!(
            key(json!({"user": "u", "prompt_cache_key": ""})).as_deref(),
            Some("u")
        );
        let long = "k".repeat(MAX_AFFINITY_KEY + 1);
        let e = chat(json!({ "prompt_cache_key": long })).unwrap_err();
        assert_eq!(param(e).as_deref(), Some("prompt_cache_key"));
        assert_eq!(
            param(chat(json!({"user": 5})).unwrap_err()).as_deref(),
            Some("user")
        );
        assert_eq!(header_value("tenant-7/a_b"), "tenant-7/a_b");
        assert_eq!(header_value("a b%é\n"), "a%20b%25%C3%A9%0A");
    }

    #[test]
    fn bad_requests_are_400() {
        for body in [
            &b"{"[..],
            br#"{"model":"m"}"#,
            br#"[]"#,
            br#"{"messages":[]}"#,
            br#"{"messages":"hi"}"#,
            br#"{"messages":[{"role":"user","content":"hi"}],"n":2}"#,
            br#"{"messages":[{"role":"tool","content":"hi"}]}"#,
            br#"{"messages":[{"role":"user","content":"hi"}],"temperature":"hot"}"#,
            br#"{"messages":[{"role":"user","content":"hi"}],"stop":[""]}"#,
            br#"{"messages":[{"role":"user","content":7}]}"#,
            b"\xff\xfe",
        ] {
            let e = chat_request(body).unwrap_err();
            assert_eq!(e.status, 400, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn the_server_token_limit() {
        assert_eq!(token_limit(None), Ok(None));
        assert_eq!(token_limit(Some("2048")), Ok(Some(2048)));
        assert_eq!(token_limit(Some(" 5\n")), Ok(Some(5)));
        for bad in ["", "0", "-1", "ten", "4294967296", "1e3"] {
            let e = token_limit(Some(bad)).unwrap_err();
            assert_eq!((e.status, e.kind), (500, "server_error"), "{bad:?}");
            assert!(e.message.contains("SLM_MAX_TOKENS"), "{}", e.message);
        }

        let chat = |body: &[u8]| chat_request(body).unwrap();
        let mut r = chat(br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":8192}"#);
        let e = r.limit_tokens(Some(2048)).unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("max_tokens")));
        assert_eq!(
            e.message,
            "max_tokens = 8192 is above this server's limit of 2048 tokens per request"
        );
        let mut r = chat(
            br#"{"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":9,"max_tokens":1}"#,
        );
        assert_eq!(
            r.limit_tokens(Some(5)).unwrap_err().param.as_deref(),
            Some("max_completion_tokens")
        );
        let mut r = chat(br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#);
        r.limit_tokens(Some(5)).unwrap();
        assert_eq!(r.options.max_tokens, Some(5));
        let mut r = chat(br#"{"messages":[{"role":"user","content":"hi"}]}"#);
        r.limit_tokens(None).unwrap();
        assert_eq!((r.options.max_tokens, r.max_tokens_field), (None, None));
        r.limit_tokens(Some(7)).unwrap();
        assert_eq!((r.options.max_tokens, r.max_tokens_field), (Some(7), None));
        let mut r = completion_request(br#"{"prompt":"a","max_tokens":3}"#).unwrap();
        r.limit_tokens(Some(2)).unwrap_err();
    }

    #[test]
    fn completion_prompt_forms() {
        assert_eq!(completion_request(br#"{"prompt":"a"}"#).unwrap().input, "a");
        assert_eq!(
            completion_request(br#"{"prompt":["b"]}"#).unwrap().input,
            "b"
        );
        for bad in [
            &br#"{"prompt":["a","b"]}"#[..],
            br#"{"prompt":3}"#,
            br#"{"prompt":[1,2]}"#,
            br#"{"prompt":null}"#,
            br#"{}"#,
        ] {
            let e = completion_request(bad).unwrap_err();
            assert_eq!(param(e).as_deref(), Some("prompt"));
        }
    }
}
