//! Tool calling in OpenAI request bodies: `tools`, `tool_choice`, `parallel_tool_calls`, an
//! assistant message's `tool_calls`, and the rule that tool messages answer the calls just
//! before them. Every key is read; what is refused names its path in `param`.

use serde_json::Value;

use crate::bindings::edge::slm::types::{Message, Tool, ToolCall, ToolChoice};
use crate::fields::Body;
use crate::openai::ApiError;

/// The most tools a request may list (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// A function's name as OpenAI allows it: a-z, A-Z, 0-9, _ and -, at most 64 characters.
pub(crate) fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// What `tools`, `tool_choice` and `parallel_tool_calls` ask for.
pub(crate) struct ToolOptions {
    pub(crate) tools: Vec<Tool>,
    pub(crate) choice: Option<ToolChoice>,
    pub(crate) parallel: Option<bool>,
}

/// `tools` (functions: `name`, `description`, `parameters`, `strict`), `tool_choice` and
/// `parallel_tool_calls`. Every key is read. Without tools, `tool_choice` may only be "none"
/// and `parallel_tool_calls` is refused (as OpenAI does).
pub(crate) fn tool_options(b: &mut Body) -> Result<ToolOptions, ApiError> {
    let list = b.take::<Vec<Value>>("tools")?;
    let choice = b.take::<Value>("tool_choice")?;
    let parallel = b.take::<bool>("parallel_tool_calls")?;
    let tools = match list {
        None => vec![],
        Some(list) if list.is_empty() => {
            return Err(ApiError::invalid(
                "tools must list at least one tool (or be left out)",
                Some("tools"),
            ))
        }
        Some(list) if list.len() > MAX_TOOLS => {
            return Err(ApiError::invalid(
                format!("tools lists {} tools, more than {MAX_TOOLS}", list.len()),
                Some("tools"),
            ))
        }
        Some(list) => list
            .into_iter()
            .enumerate()
            .map(|(i, t)| tool(i, t))
            .collect::<Result<Vec<_>, _>>()?,
    };
    for (i, t) in tools.iter().enumerate() {
        if tools[..i].iter().any(|u| u.name == t.name) {
            let param = format!("tools[{i}].function.name");
            return Err(ApiError::invalid(
                format!("{param}: {:?} names two tools", t.name),
                Some(&param),
            ));
        }
    }
    let choice = choice.map(tool_choice).transpose()?;
    if tools.is_empty() {
        if !matches!(choice, None | Some(ToolChoice::None)) {
            return Err(ApiError::invalid(
                "tool_choice is only allowed when tools are specified",
                Some("tool_choice"),
            ));
        }
        if parallel.is_some() {
            return Err(ApiError::invalid(
                "parallel_tool_calls is only allowed when tools are specified",
                Some("parallel_tool_calls"),
            ));
        }
        // "none" without tools asks for what happens anyway.
        return Ok(ToolOptions {
            tools,
            choice: None,
            parallel: None,
        });
    }
    if let Some(ToolChoice::Function(name)) = &choice {
        if !tools.iter().any(|t| &t.name == name) {
            return Err(ApiError::invalid(
                format!("tool_choice names the function {name:?}, which is not in tools"),
                Some("tool_choice"),
            ));
        }
    }
    Ok(ToolOptions {
        tools,
        choice,
        parallel,
    })
}

/// Tool `i` of `tools`: `{"type": "function", "function": {"name", "description"?,
/// "parameters"?, "strict"?}}`. `strict` is accepted either way: arguments always validate
/// against `parameters`.
fn tool(i: usize, v: Value) -> Result<Tool, ApiError> {
    let at = |k: &str| format!("tools[{i}].{k}");
    let bad = |param: String, msg: String| ApiError::invalid(msg, Some(&param));
    let Value::Object(mut t) = v else {
        return Err(bad(
            format!("tools[{i}]"),
            format!(
                "tools[{i}] must be an object: {{\"type\": \"function\", \"function\": {{...}}}}"
            ),
        ));
    };
    match t.remove("type") {
        Some(Value::String(k)) if k == "function" => {}
        Some(Value::String(k)) => {
            return Err(bad(
                at("type"),
                format!(
                    "{} {k:?} is not supported: only \"function\" tools",
                    at("type")
                ),
            ))
        }
        _ => {
            return Err(bad(
                at("type"),
                format!("{} is required: \"function\"", at("type")),
            ))
        }
    }
    let mut f = match t.remove("function") {
        Some(Value::Object(f)) => f,
        _ => {
            return Err(bad(
                at("function"),
                format!(
                    "{} is required: an object with name, description and parameters",
                    at("function")
                ),
            ))
        }
    };
    if let Some(k) = t.keys().next() {
        return Err(ApiError::unsupported(&at(k), None));
    }
    let at = |k: &str| format!("tools[{i}].function.{k}");
    let name = match f.remove("name") {
        Some(Value::String(n)) if valid_name(&n) => n,
        Some(Value::String(n)) => {
            return Err(bad(
                at("name"),
                format!(
                    "{}: {n:?} is not a valid name: a-z, A-Z, 0-9, _ and -, at most 64 characters",
                    at("name")
                ),
            ))
        }
        _ => {
            return Err(bad(
                at("name"),
                format!("{} is required (a string)", at("name")),
            ))
        }
    };
    let description = match f.remove("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d),
        Some(_) => {
            return Err(bad(
                at("description"),
                format!("invalid {}: expected a string", at("description")),
            ))
        }
    };
    let parameters = match f.remove("parameters") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p.to_string()),
        Some(_) => {
            return Err(bad(
                at("parameters"),
                format!(
                    "invalid {}: expected an object (a JSON Schema)",
                    at("parameters")
                ),
            ))
        }
    };
    match f.remove("strict") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => {}
        Some(_) => {
            return Err(bad(
                at("strict"),
                format!("invalid {}: expected a boolean", at("strict")),
            ))
        }
    }
    if let Some(k) = f.keys().next() {
        return Err(ApiError::unsupported(&at(k), None));
    }
    Ok(Tool {
        name,
        description,
        parameters,
    })
}

/// `tool_choice`: "none", "auto", "required" or `{"type": "function", "function": {"name"}}`.
fn tool_choice(v: Value) -> Result<ToolChoice, ApiError> {
    const HOW: &str =
        "\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}";
    let bad = |param: &str, msg: String| ApiError::invalid(msg, Some(param));
    let mut o = match v {
        Value::String(s) => {
            return match s.as_str() {
                "none" => Ok(ToolChoice::None),
                "auto" => Ok(ToolChoice::Auto),
                "required" => Ok(ToolChoice::Required),
                _ => Err(bad(
                    "tool_choice",
                    format!("tool_choice {s:?} is not supported: {HOW}"),
                )),
            }
        }
        Value::Object(o) => o,
        _ => return Err(bad("tool_choice", format!("tool_choice must be {HOW}"))),
    };
    match o.remove("type") {
        Some(Value::String(t)) if t == "function" => {}
        Some(Value::String(t)) => {
            return Err(bad(
                "tool_choice.type",
                format!("tool_choice.type {t:?} is not supported: only \"function\""),
            ))
        }
        _ => {
            return Err(bad(
                "tool_choice.type",
                "tool_choice.type is required: \"function\"".into(),
            ))
        }
    }
    let mut f = match o.remove("function") {
        Some(Value::Object(f)) => f,
        _ => {
            return Err(bad(
                "tool_choice.function",
                "tool_choice.function is required: {\"name\": ...}".into(),
            ))
        }
    };
    if let Some(k) = o.keys().next() {
        return Err(ApiError::unsupported(&format!("tool_choice.{k}"), None));
    }
    let name = match f.remove("name") {
        Some(Value::String(n)) => n,
        _ => {
            return Err(bad(
                "tool_choice.function.name",
                "tool_choice.function.name is required (a string)".into(),
            ))
        }
    };
    if let Some(k) = f.keys().next() {
        return Err(ApiError::unsupported(
            &format!("tool_choice.function.{k}"),
            None,
        ));
    }
    Ok(ToolChoice::Function(name))
}

/// Call `j` of message `i`'s `tool_calls`: `{"id", "type": "function", "function": {"name",
/// "arguments"}}` (the arguments as JSON text, passed on as written).
pub(crate) fn tool_call(i: usize, j: usize, c: Value) -> Result<ToolCall, ApiError> {
    let here = format!("messages[{i}].tool_calls[{j}]");
    let at = |k: &str| format!("{here}.{k}");
    let bad = |param: String, msg: String| ApiError::invalid(msg, Some(&param));
    let Value::Object(mut c) = c else {
        return Err(bad(
            here.clone(),
            format!("{here} must be an object: {{\"id\", \"type\": \"function\", \"function\"}}"),
        ));
    };
    let id = match c.remove("id") {
        Some(Value::String(id)) if !id.is_empty() => id,
        _ => {
            return Err(bad(
                at("id"),
                format!("{} is required: the call's id (a string)", at("id")),
            ))
        }
    };
    match c.remove("type") {
        Some(Value::String(t)) if t == "function" => {}
        Some(Value::String(t)) => {
            return Err(bad(
                at("type"),
                format!("{} {t:?} is not supported: only \"function\"", at("type")),
            ))
        }
        _ => {
            return Err(bad(
                at("type"),
                format!("{} is required: \"function\"", at("type")),
            ))
        }
    }
    let mut f = match c.remove("function") {
        Some(Value::Object(f)) => f,
        _ => {
            return Err(bad(
                at("function"),
                format!(
                    "{} is required: an object with name and arguments",
                    at("function")
                ),
            ))
        }
    };
    if let Some(k) = c.keys().next() {
        return Err(ApiError::unsupported(&at(k), None));
    }
    let at = |k: &str| format!("{here}.function.{k}");
    let name = match f.remove("name") {
        Some(Value::String(n)) => n,
        _ => {
            return Err(bad(
                at("name"),
                format!("{} is required (a string)", at("name")),
            ))
        }
    };
    let arguments = match f.remove("arguments") {
        Some(Value::String(a)) => a,
        _ => {
            return Err(bad(
                at("arguments"),
                format!(
                    "{} is required: the arguments as JSON text (a string)",
                    at("arguments")
                ),
            ))
        }
    };
    if let Some(k) = f.keys().next() {
        return Err(ApiError::unsupported(&at(k), None));
    }
    Ok(ToolCall {
        id,
        name,
        arguments,
    })
}

/// OpenAI's rules for tool results: the calls of an assistant message have distinct ids; the
/// messages that follow it answer each call once (`role` "tool", `tool_call_id`) before any
/// message of another role; a tool message answers a call of the assistant message before it.
pub(crate) fn tool_results(messages: &[Message]) -> Result<(), ApiError> {
    // The assistant message whose calls are being answered, and the ids not answered yet.
    let mut open: Option<(usize, Vec<&str>)> = None;
    let unanswered = |a: usize, ids: &[&str]| {
        let param = format!("messages[{a}].tool_calls");
        ApiError::invalid(
            format!(
                "an assistant message with tool_calls must be followed by tool messages \
                 answering each call; not answered: {}",
                ids.join(", ")
            ),
            Some(&param),
        )
    };
    for (i, m) in messages.iter().enumerate() {
        if m.role == "tool" {
            let id = m.tool_call_id.as_deref().unwrap_or_default();
            let Some((a, ids)) = &mut open else {
                let param = format!("messages[{i}].role");
                return Err(ApiError::invalid(
                    format!(
                        "messages[{i}]: a tool message must answer a call of the assistant \
                         message with tool_calls before it"
                    ),
                    Some(&param),
                ));
            };
            match ids.iter().position(|x| *x == id) {
                Some(p) => {
                    ids.remove(p);
                }
                None => {
                    let param = format!("messages[{i}].tool_call_id");
                    return Err(ApiError::invalid(
                        format!(
                            "{param}: {id:?} is not the id of a call in messages[{a}].tool_calls \
                             that is not answered yet"
                        ),
                        Some(&param),
                    ));
                }
            }
            continue;
        }
        if let Some((a, ids)) = open.take() {
            if !ids.is_empty() {
                return Err(unanswered(a, &ids));
            }
        }
        if !m.tool_calls.is_empty() {
            let mut ids: Vec<&str> = vec![];
            for (j, c) in m.tool_calls.iter().enumerate() {
                if ids.contains(&c.id.as_str()) {
                    let param = format!("messages[{i}].tool_calls[{j}].id");
                    return Err(ApiError::invalid(
                        format!("{param}: {:?} is the id of two calls", c.id),
                        Some(&param),
                    ));
                }
                ids.push(&c.id);
            }
            open = Some((i, ids));
        }
    }
    match open {
        Some((a, ids)) if !ids.is_empty() => Err(unanswered(a, &ids)),
        _ => Ok(()),
    }
}
