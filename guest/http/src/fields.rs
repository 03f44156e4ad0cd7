//! Which request fields this server accepts: the list ([`FIELDS`]), the OpenAI fields it
//! refuses, and a body read field by field, so that none is ignored: each is implemented or
//! refused with 400 `invalid_request_error` naming it in `param`.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::openai::ApiError;

impl ApiError {
    /// A field this server does not implement (`what` it would ask for, if known).
    pub(crate) fn unsupported(field: &str, what: Option<&str>) -> Self {
        let message = match what {
            Some(what) => format!("`{field}` ({what}) is not supported by this server"),
            None => format!("`{field}` is not supported by this server (unknown field)"),
        };
        Self::invalid(message, Some(field))
    }
}

/// The endpoint a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completions,
}

/// Which endpoints take a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takes {
    Both,
    Chat,
    Completions,
}

impl Takes {
    fn includes(self, e: Endpoint) -> bool {
        matches!(
            (self, e),
            (Takes::Both, _)
                | (Takes::Chat, Endpoint::Chat)
                | (Takes::Completions, Endpoint::Completions)
        )
    }
}

/// Every request field this server accepts, the endpoints that take it, and what it means here.
/// A field not listed for the endpoint is refused (400, `param` = the field). README.md
/// ("Serving: the OpenAI-compatible API") lists the same fields (a test checks).
pub const FIELDS: &[(&str, Takes, &str)] = &[
    ("model", Takes::Both, "the model; absent: the default model"),
    (
        "messages",
        Takes::Chat,
        "roles system, developer (= system), user, assistant (tool_calls), tool (tool_call_id); \
         text content",
    ),
    (
        "prompt",
        Takes::Completions,
        "one string (or a list of one)",
    ),
    ("max_tokens", Takes::Both, "the most tokens to generate"),
    (
        "max_completion_tokens",
        Takes::Both,
        "the same; wins over max_tokens",
    ),
    ("temperature", Takes::Both, "0: greedy (the default)"),
    ("top_p", Takes::Both, "nucleus sampling"),
    (
        "top_k",
        Takes::Both,
        "extension: keep the k most likely tokens",
    ),
    ("min_p", Takes::Both, "extension: min-p sampling"),
    (
        "repetition_penalty",
        Takes::Both,
        "extension: Hugging Face's repetition penalty",
    ),
    (
        "frequency_penalty",
        Takes::Both,
        "OpenAI's, in [-2, 2], on counts of generated tokens",
    ),
    ("presence_penalty", Takes::Both, "OpenAI's, in [-2, 2]"),
    (
        "seed",
        Takes::Both,
        "the same seed, prompt and options give the same output",
    ),
    ("stop", Takes::Both, "a string or a list of up to 16"),
    ("stream", Takes::Both, "Server-Sent Events"),
    (
        "stream_options",
        Takes::Both,
        "include_usage; include_obfuscation false only",
    ),
    ("n", Takes::Both, "1 only"),
    (
        "logprobs",
        Takes::Both,
        "chat: true/false; completions: 0 to 5 alternatives",
    ),
    (
        "top_logprobs",
        Takes::Chat,
        "0 to 20 alternatives; needs logprobs true",
    ),
    ("logit_bias", Takes::Both, "token id -> bias in [-100, 100]"),
    (
        "response_format",
        Takes::Both,
        "text, json_object, json_schema (enforced while generating)",
    ),
    (
        "tools",
        Takes::Chat,
        "functions the model may call; arguments always valid against parameters",
    ),
    (
        "tool_choice",
        Takes::Chat,
        "none, auto, required or one function; needs tools unless none",
    ),
    (
        "parallel_tool_calls",
        Takes::Chat,
        "false: at most one call per answer; needs tools",
    ),
    (
        "user",
        Takes::Both,
        "a string: the affinity key when prompt_cache_key is absent",
    ),
    (
        "prompt_cache_key",
        Takes::Both,
        "a string: the affinity key (x-slm-affinity-key)",
    ),
    (
        "safety_identifier",
        Takes::Both,
        "a string; accepted, nothing else (no abuse monitoring)",
    ),
    ("metadata", Takes::Both, "an object of strings; not stored"),
    ("store", Takes::Both, "false only: nothing is stored"),
    ("echo", Takes::Completions, "false only"),
    ("best_of", Takes::Completions, "1 only"),
];

/// OpenAI request fields this server does not implement, and what they ask for (the error
/// message says it). Any other field not in [`FIELDS`] is refused as unknown.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("functions", "function calling (legacy: use tools)"),
    (
        "function_call",
        "function calling (legacy: use tool_choice)",
    ),
    ("audio", "audio output"),
    ("modalities", "output modalities other than text"),
    ("prediction", "predicted outputs"),
    ("web_search_options", "web search"),
    ("suffix", "text after the insertion point"),
    ("service_tier", "service tiers"),
    ("reasoning_effort", "reasoning effort"),
    ("verbosity", "verbosity"),
    ("moderation", "moderation"),
    ("prompt_cache_options", "prompt cache options"),
    ("prompt_cache_retention", "prompt cache retention policies"),
];

/// Message fields (besides `role`, `content`, `tool_calls` and `tool_call_id`) this server
/// does not implement.
pub(crate) const MESSAGE_UNSUPPORTED: &[(&str, &str)] = &[
    ("name", "participant names"),
    ("function_call", "function calling (legacy: use tool_calls)"),
    ("audio", "audio"),
    ("refusal", "refusals"),
];

/// A body's fields, each checked against [`FIELDS`] for `endpoint`.
pub(crate) struct Body {
    fields: Map<String, Value>,
}

impl Body {
    pub(crate) fn parse(body: &[u8], endpoint: Endpoint) -> Result<Self, ApiError> {
        let text = std::str::from_utf8(body)
            .map_err(|_| ApiError::invalid("request body is not valid UTF-8", None))?;
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))?;
        let Value::Object(mut fields) = value else {
            return Err(ApiError::invalid(
                "the request body must be a JSON object",
                None,
            ));
        };
        let mut absent = vec![];
        for (name, value) in &fields {
            if FIELDS
                .iter()
                .any(|(f, takes, _)| f == name && takes.includes(endpoint))
            {
                continue;
            }
            // An OpenAI field set to null asks for nothing (null is its absence).
            let known = UNSUPPORTED.iter().find(|(f, _)| f == name);
            if value.is_null() && known.is_some() {
                absent.push(name.clone());
                continue;
            }
            let what = match (known, FIELDS.iter().any(|(f, _, _)| f == name)) {
                (Some((_, what)), _) => Some(*what),
                (None, true) => Some(match endpoint {
                    Endpoint::Chat => "a /v1/completions field",
                    Endpoint::Completions => "a /v1/chat/completions field",
                }),
                (None, false) => None,
            };
            return Err(ApiError::unsupported(name, what));
        }
        for name in absent {
            fields.remove(&name);
        }
        Ok(Body { fields })
    }

    /// After every field was taken: one left over is listed in [`FIELDS`] without code that
    /// reads it, and is refused rather than ignored.
    pub(crate) fn finish(self) -> Result<(), ApiError> {
        match self.fields.keys().next() {
            Some(name) => Err(ApiError::unsupported(name, None)),
            None => Ok(()),
        }
    }

    /// Field `name` as a `T`; None when absent or null. A value of the wrong type is a 400
    /// naming the field.
    pub(crate) fn take<T: DeserializeOwned>(&mut self, name: &str) -> Result<Option<T>, ApiError> {
        match self.fields.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| ApiError::invalid(format!("invalid {name}: {e}"), Some(name))),
        }
    }
}

/// Refuses field `name` unless its value is the one that asks for nothing.
pub(crate) fn only(name: &str, ok: bool, accepted: &str) -> Result<(), ApiError> {
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            format!("`{name}` other than {accepted} is not supported by this server"),
            Some(name),
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bindings::edge::slm::types::Message;
    use crate::openai::{chat_request, completion_request, Request};
    use serde_json::json;

    pub fn chat(extra: Value) -> Result<Request<Vec<Message>>, ApiError> {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        chat_request(body.to_string().as_bytes())
    }

    pub fn completion(extra: Value) -> Result<Request<String>, ApiError> {
        let mut body = json!({"prompt": "a"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        completion_request(body.to_string().as_bytes())
    }

    pub fn param(e: ApiError) -> Option<String> {
        assert_eq!((e.status, e.kind), (400, "invalid_request_error"), "{e:?}");
        e.param
    }

    /// A value of each accepted field that a client may send.
    fn sample(field: &str) -> Value {
        match field {
            "model" => json!("m"),
            "messages" => json!([{"role": "user", "content": "hi"}]),
            "prompt" => json!("a"),
            "stop" => json!(["x"]),
            "stream" | "store" | "echo" => json!(false),
            "logprobs" => Value::Null, // chat: a bool, completions: a number
            "top_logprobs" => json!(1),
            "response_format" => json!({"type": "json_object"}),
            "tools" => json!([{"type": "function", "function": {"name": "f"}}]),
            "tool_choice" => json!("none"),
            "parallel_tool_calls" => json!(false),

            "stream_options" => json!({"include_usage": true, "include_obfuscation": false}),
            "logit_bias" | "metadata" => json!({}),
            "user" | "prompt_cache_key" | "safety_identifier" => json!("k"),
            "temperature" | "top_p" | "repetition_penalty" => json!(1.0),
            "frequency_penalty" | "presence_penalty" | "min_p" => json!(0.0),
            _ => json!(1),
        }
    }

    #[test]
    fn every_listed_field_is_accepted_where_listed_and_refused_elsewhere() {
        for &(field, takes, _) in FIELDS {
            let mut v = json!({ field: sample(field) });
            if field == "top_logprobs" {
                v["logprobs"] = json!(true);
            }
            if field == "parallel_tool_calls" {
                v["tools"] = sample("tools");
            }
            assert_eq!(
                chat(v.clone()).map(|_| ()).map_err(param),
                if takes.includes(Endpoint::Chat) {
                    Ok(())
                } else {
                    Err(Some(field.to_string()))
                },
                "chat {field}"
            );
            if field == "messages" {
                continue;
            }
            assert_eq!(
                completion(v).map(|_| ()).map_err(param),
                if takes.includes(Endpoint::Completions) {
                    Ok(())
                } else {
                    Err(Some(field.to_string()))
                },
                "completions {field}"
            );
        }
    }

    #[test]
    fn unsupported_and_unknown_fields_are_refused_by_name() {
        for &(field, what) in UNSUPPORTED {
            for e in [
                chat(json!({ field: {"type": "x"} })).unwrap_err(),
                completion(json!({ field: true })).unwrap_err(),
            ] {
                assert!(
                    e.message.contains(what) && e.message.contains("not supported"),
                    "{e:?}"
                );
                assert_eq!(param(e).as_deref(), Some(field));
            }
            // null is the field's absence
            chat(json!({ field: null })).unwrap();
        }
        for (field, value) in [
            ("frobnicate", json!(1)),
            ("Temperature", json!(1)),
            ("x", Value::Null),
        ] {
            let e = chat(json!({ field: value })).unwrap_err();
            assert!(e.message.contains("unknown field"), "{e:?}");
            assert_eq!(param(e).as_deref(), Some(field));
        }
        let e = completion(json!({"messages": []})).unwrap_err();
        assert!(e.message.contains("/v1/chat/completions"), "{e:?}");
        assert_eq!(
            param(chat(json!({"prompt": "a"})).unwrap_err()).as_deref(),
            Some("prompt")
        );
    }

    #[test]
    fn only_the_values_that_ask_for_nothing() {
        for (field, bad) in [
            ("n", json!(2)),
            ("store", json!(true)),
            ("top_logprobs", json!(21)),
            ("logit_bias", json!({"five": 1})),
            ("logit_bias", json!({"5": "x"})),
        ] {
            assert_eq!(
                param(chat(json!({ field: bad })).unwrap_err()).as_deref(),
                Some(field)
            );
        }
        for (field, bad) in [
            ("echo", json!(true)),
            ("best_of", json!(2)),
            ("logprobs", json!(6)),
            ("logprobs", json!(true)),
        ] {
            assert_eq!(
                param(completion(json!({ field: bad })).unwrap_err()).as_deref(),
                Some(field)
            );
        }
        let e = chat(json!({"stream_options": {"include_obfuscation": true}})).unwrap_err();
        assert_eq!(
            param(e).as_deref(),
            Some("stream_options.include_obfuscation")
        );
        let e = chat(json!({"stream_options": {"chunk_size": 1}})).unwrap_err();
        assert_eq!(param(e).as_deref(), Some("stream_options.chunk_size"));
        // A wrong type names the field.
        let e = chat(json!({"temperature": "hot"})).unwrap_err();
        assert_eq!(param(e).as_deref(), Some("temperature"));
        let e = chat(json!({"metadata": {"a": 1}})).unwrap_err();
        assert_eq!(param(e).as_deref(), Some("metadata"));
    }

    #[test]
    fn readme_lists_the_fields() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("## Serving")
            .expect("README has a Serving section");
        let section = &readme[start..];
        let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
        for &(field, _, _) in FIELDS {
            assert!(
                section.contains(&format!("`{field}`")),
                "README's Serving section does not list `{field}`"
            );
        }
        for &(field, _) in UNSUPPORTED {
            assert!(
                section.contains(&format!("`{field}`")),
                "README's Serving section does not name the refused `{field}`"
            );
        }
    }
}
