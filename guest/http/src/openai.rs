//! OpenAI request bodies: parsing and validation into generator calls.

use serde::Deserialize;
use serde_json::Value;

use crate::bindings::edge::slm::types::{Message, Options, Sampling};

/// A request that could not be accepted, with the HTTP status and OpenAI error fields it maps to.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param,
        }
    }
}

/// `stop`: a string or a list of strings.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields shared by chat and text completions. Unknown fields are ignored, as OpenAI clients
/// send many that do not apply here.
#[derive(Deserialize, Debug)]
struct Common {
    model: Option<String>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    repetition_penalty: Option<f32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
}

#[derive(Deserialize, Debug)]
struct ChatBody {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize, Debug)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

/// Message content: a string or a list of parts, of which only text parts are supported.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize, Debug)]
struct CompletionBody {
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

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

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::invalid("request body is not valid UTF-8", None))?;
    serde_json::from_str(text).map_err(|e| {
        let msg = e.to_string();
        ApiError::invalid(format!("invalid request body: {msg}"), None)
    })
}

/// What the shared fields ask for: options, stream, include_usage and the field that set
/// max_tokens.
type CommonOptions = (Options, bool, bool, Option<&'static str>);

fn common_options(c: Common) -> Result<CommonOptions, ApiError> {
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::invalid(
                format!("n = {n} is not supported: only one choice (n = 1) per request"),
                Some("n"),
            ));
        }
    }
    let stop = match c.stop {
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
    let max_tokens_field = if c.max_completion_tokens.is_some() {
        Some("max_completion_tokens")
    } else if c.max_tokens.is_some() {
        Some("max_tokens")
    } else {
        None
    };
    let options = Options {
        model: c.model,
        max_tokens: c.max_completion_tokens.or(c.max_tokens),
        stop,
        sampling: Sampling {
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            min_p: c.min_p,
            repetition_penalty: c.repetition_penalty,
            seed: c.seed,
        },
    };
    let include_usage = c.stream_options.map(|o| o.include_usage).unwrap_or(false);
    Ok((options, c.stream, include_usage, max_tokens_field))
}

/// The request field that sets a generator option (`name` as in the WIT `options` /
/// `sampling` records), for the `param` of an error about it.
pub fn request_field(name: &str) -> Option<&'static str> {
    Some(match name {
        "temperature" => "temperature",
        "top-p" => "top_p",
        "min-p" => "min_p",
        "repetition-penalty" => "repetition_penalty",
        "stop" => "stop",
        _ => return None,
    })
}

pub fn chat_request(body: &[u8]) -> Result<Request<Vec<Message>>, ApiError> {
    let body: ChatBody = parse(body)?;
    if body.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must contain at least one message",
            Some("messages"),
        ));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for m in body.messages {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer"
        ) {
            return Err(ApiError::invalid(
                format!("unsupported message role '{}'", m.role),
                Some("messages"),
            ));
        }
        // OpenAI's newer "developer" role is the system role under another name.
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => text_parts(&parts)?,
        };
        messages.push(Message { role, content });
    }
    let (options, stream, include_usage, max_tokens_field) = common_options(body.common)?;
    Ok(Request {
        input: messages,
        options,
        stream,
        include_usage,
        max_tokens_field,
    })
}

fn text_parts(parts: &[Value]) -> Result<String, ApiError> {
    let mut text = String::new();
    for p in parts {
        match (
            p.get("type").and_then(Value::as_str),
            p.get("text").and_then(Value::as_str),
        ) {
            (Some("text"), Some(t)) => text.push_str(t),
            _ => {
                return Err(ApiError::invalid(
                    "only text content parts are supported",
                    Some("messages"),
                ))
            }
        }
    }
    Ok(text)
}

pub fn completion_request(body: &[u8]) -> Result<Request<String>, ApiError> {
    let body: CompletionBody = parse(body)?;
    let prompt = match body.prompt {
        Prompt::One(p) => p,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(_) => {
            return Err(ApiError::invalid(
                "prompt must be one string (batches are not supported)",
                Some("prompt"),
            ))
        }
    };
    let (options, stream, include_usage, max_tokens_field) = common_options(body.common)?;
    Ok(Request {
        input: prompt,
        options,
        stream,
        include_usage,
        max_tokens_field,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_fields_map_to_options() {
        let r = chat_request(br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":5,
            "temperature":0.5,"top_p":0.9,"top_k":4,"min_p":0.1,"seed":7,"stop":"x","repetition_penalty":1.1,
            "stream":true,"stream_options":{"include_usage":true},"user":"ignored"}"#).unwrap();
        assert_eq!(r.input[0].content, "hi");
        assert_eq!(r.options.max_tokens, Some(5));
        assert_eq!(r.options.stop, vec!["x".to_string()]);
        assert_eq!(r.options.sampling.seed, Some(7));
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn bad_requests_are_400() {
        for body in [
            &b"{"[..],
            br#"{"model":"m"}"#,
            br#"{"messages":[]}"#,
            br#"{"messages":"hi"}"#,
            br#"{"messages":[{"role":"user","content":"hi"}],"n":2}"#,
            br#"{"messages":[{"role":"tool","content":"hi"}]}"#,
            br#"{"messages":[{"role":"user","content":"hi"}],"temperature":"hot"}"#,
            br#"{"messages":[{"role":"user","content":"hi"}],"stop":[""]}"#,
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
        assert_eq!((e.status, e.param), (400, Some("max_tokens")));
        assert_eq!(
            e.message,
            "max_tokens = 8192 is above this server's limit of 2048 tokens per request"
        );
        let mut r = chat(
            br#"{"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":9,"max_tokens":1}"#,
        );
        assert_eq!(
            r.limit_tokens(Some(5)).unwrap_err().param,
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
        assert!(completion_request(br#"{"prompt":["a","b"]}"#).is_err());
        assert!(completion_request(br#"{"prompt":3}"#).is_err());
    }
}
