//! Tool calling: the tools go into the prompt, the model's answer is constrained to text or to
//! tool calls in one fixed form, and the calls are read back out of the text as it comes.
//!
//! The form is the one Hermes-style and Qwen2.5 models are trained on, and the one the system
//! message below teaches models that were not:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! Calls are separated by one newline. The grammar (llguidance Lark) fixes every byte outside
//! the arguments, and the arguments are JSON valid against the tool's `parameters`, so
//! [`CallReader`] can follow the text byte by byte.

use serde_json::{json, Map, Value};

use crate::constraint::json_layout;
use crate::error::{Error, Result};
use crate::template::Message;

const OPEN: &str = "<tool_call>\n{\"name\": \"";
const MID: &str = "\", \"arguments\": ";
const CLOSE: &str = "}\n</tool_call>";
const BETWEEN: &str = "\n";

#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON Schema of the arguments (an object).
    pub parameters: Value,
}

impl Tool {
    /// The tool as OpenAI and Hugging Face templates write it: `{"type": "function",
    /// "function": {"name", "description"?, "parameters"}}`.
    fn definition(&self) -> Value {
        let mut f = Map::new();
        f.insert("name".into(), Value::String(self.name.clone()));
        if let Some(d) = &self.description {
            f.insert("description".into(), Value::String(d.clone()));
        }
        f.insert("parameters".into(), self.parameters.clone());
        json!({"type": "function", "function": f})
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Function(String),
}

/// A call the model made, or one from the conversation's history.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// Part of a call as it is written (see the WIT `tool-call-delta`).
#[derive(Debug, Clone, PartialEq)]
pub struct CallDelta {
    pub index: u32,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

/// The tools of one request.
#[derive(Debug, Clone)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: Choice,
    pub parallel: bool,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl Tools {
    /// Checks names, schemas and the choice. `parameters` are JSON texts (absent: no arguments).
    pub fn new(
        tools: Vec<(String, Option<String>, Option<String>)>,
        choice: Option<Choice>,
        parallel: Option<bool>,
    ) -> Result<Option<Tools>> {
        let mut out: Vec<Tool> = Vec::with_capacity(tools.len());
        for (name, description, parameters) in tools {
            if !valid_name(&name) {
                return Err(Error::invalid_option(
                    "tools",
                    format!("tool name {name:?}: use a-z, A-Z, 0-9, _ and -, at most 64"),
                ));
            }
            if out.iter().any(|t| t.name == name) {
                return Err(Error::invalid_option(
                    "tools",
                    format!("tool {name:?} is listed twice"),
                ));
            }
            let parameters = match parameters {
                None => json!({"type": "object", "properties": {}, "additionalProperties": false}),
                Some(text) => match serde_json::from_str::<Value>(&text) {
                    Ok(v @ Value::Object(_)) => v,
                    Ok(_) => {
                        return Err(Error::invalid_option(
                            "tools",
                            format!("tool {name:?}: parameters must be a JSON Schema object"),
                        ))
                    }
                    Err(e) => {
                        return Err(Error::invalid_option(
                            "tools",
                            format!("tool {name:?}: parameters are not JSON: {e}"),
                        ))
                    }
                },
            };
            out.push(Tool {
                name,
                description,
                parameters,
            });
        }
        let choice = choice.unwrap_or(Choice::Auto);
        if out.is_empty() {
            return match choice {
                Choice::None | Choice::Auto => Ok(None),
                _ => Err(Error::invalid_option(
                    "tool-choice",
                    "tool-choice asks for a tool call, but there are no tools",
                )),
            };
        }
        if let Choice::Function(name) = &choice {
            if !out.iter().any(|t| &t.name == name) {
                return Err(Error::invalid_option(
                    "tool-choice",
                    format!("tool-choice names {name:?}, which is not among the tools"),
                ));
            }
        }
        Ok(Some(Tools {
            tools: out,
            choice,
            parallel: parallel.unwrap_or(true),
        }))
    }

    /// Whether the answer is constrained (and the tools described to the model).
    pub fn active(&self) -> bool {
        self.choice != Choice::None
    }

    /// The text that tells the model about the tools (appended to the system message).
    pub fn instructions(&self) -> String {
        let mut s = String::from(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
        );
        for t in &self.tools {
            s.push('\n');
            s.push_str(&t.definition().to_string());
        }
        s.push_str(
            "\n</tools>\n\nFor each function call, return a json object with function name and \
             arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
             {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
        );
        s
    }

    /// The Lark grammar of the answer: text (with `auto` and `none`: anything that does not
    /// start with "<", like a call), or calls of the allowed tools, one or (with `parallel`)
    /// several.
    pub fn grammar(&self) -> String {
        let allowed: Vec<&Tool> = match &self.choice {
            Choice::Function(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
            _ => self.tools.iter().collect(),
        };
        let mut g = String::new();
        let calls = if self.parallel {
            format!("call ({} call)*", lit(BETWEEN))
        } else {
            "call".to_string()
        };
        const TEXT: &str = "TEXT: /[^<](.|\\n)*/\n";
        match self.choice {
            Choice::None => return format!("start: TEXT\n{TEXT}"),
            Choice::Auto => g.push_str(&format!("start: TEXT | {calls}\n{TEXT}")),
            _ => g.push_str(&format!("start: {calls}\n")),
        }
        let names: Vec<String> = (0..allowed.len()).map(|i| format!("call_{i}")).collect();
        g.push_str(&format!("call: {}\n", names.join(" | ")));
        for (i, t) in allowed.iter().enumerate() {
            let mut schema = t.parameters.clone();
            if let Value::Object(m) = &mut schema {
                m.entry("x-guidance").or_insert_with(json_layout);
            }
            g.push_str(&format!(
                "call_{i}: {} args_{i} {}\nargs_{i}: %json {schema}\n",
                lit(&format!("{OPEN}{}{MID}", t.name)),
                lit(CLOSE),
            ));
        }
        g
    }
}

/// A Lark string literal (Lark strings are JSON strings).
fn lit(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// The text a call is written as (in the model's answer, and for the history).
pub fn call_text(name: &str, arguments: &str) -> String {
    format!("{OPEN}{name}{MID}{arguments}{CLOSE}")
}

/// A "tool" message names the call it answers; only assistant messages carry calls.
fn check_tool_fields(m: &Message, calls: &[Call], call_id: &Option<String>) -> Result<()> {
    if m.role == "tool" && call_id.is_none() {
        return Err(Error::invalid("a tool message needs the id of its call"));
    }
    if m.role != "assistant" && !calls.is_empty() {
        return Err(Error::invalid(format!(
            "a {} message cannot carry tool calls",
            m.role
        )));
    }
    Ok(())
}

/// Messages with tool calls and tool results, in the generic form any chat template renders:
/// an assistant's calls as their text after its content, each run of "tool" messages as one
/// user message of `<tool_response>` blocks. With `tools` active, their instructions end the
/// system message (one is added when the conversation has none).
pub fn render_messages(
    messages: Vec<(Message, Vec<Call>, Option<String>)>,
    tools: Option<&Tools>,
) -> Result<Vec<Message>> {
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    let mut in_tool_run = false;
    for (m, calls, call_id) in messages {
        check_tool_fields(&m, &calls, &call_id)?;
        match m.role.as_str() {
            "tool" => {
                let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
                match out.last_mut() {
                    Some(last) if in_tool_run => {
                        last.content.push('\n');
                        last.content.push_str(&block);
                    }
                    _ => out.push(Message {
                        role: "user".into(),
                        content: block,
                        ..Default::default()
                    }),
                }
                in_tool_run = true;
                continue;
            }
            "assistant" => {
                let mut content = m.content;
                for c in &calls {
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(&call_text(&c.name, &c.arguments));
                }
                out.push(Message {
                    role: m.role,
                    content,
                    ..Default::default()
                });
            }
            _ => out.push(m),
        }
        in_tool_run = false;
    }
    if let Some(t) = tools.filter(|t| t.active()) {
        let text = t.instructions();
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content.push_str("\n\n");
                first.content.push_str(&text);
            }
            _ => out.insert(
                0,
                Message {
                    role: "system".into(),
                    content: text,
                    ..Default::default()
                },
            ),
        }
    }
    Ok(out)
}

/// Messages and tools for a chat template that renders them itself ([`ChatTemplate::takes_tools`]):
/// Hugging Face's shapes (an assistant's `tool_calls` with their arguments as JSON values, "tool"
/// messages with `tool_call_id`), and the `tools` variable when the tools are active.
///
/// [`ChatTemplate::takes_tools`]: crate::template::ChatTemplate::takes_tools
pub fn template_messages(
    messages: Vec<(Message, Vec<Call>, Option<String>)>,
    tools: Option<&Tools>,
) -> Result<(Vec<Message>, Option<Value>)> {
    let mut out = Vec::with_capacity(messages.len());
    for (mut m, calls, call_id) in messages {
        check_tool_fields(&m, &calls, &call_id)?;
        m.tool_calls = calls
            .into_iter()
            .map(|c| {
                let arguments = serde_json::from_str::<Value>(&c.arguments)
                    .unwrap_or(Value::String(c.arguments));
                json!({"id": c.id, "type": "function",
                       "function": {"name": c.name, "arguments": arguments}})
            })
            .collect();
        m.tool_call_id = call_id;
        out.push(m);
    }
    let tools = tools
        .filter(|t| t.active())
        .map(|t| Value::Array(t.tools.iter().map(Tool::definition).collect()));
    Ok((out, tools))
}

/// Follows the answer's text and hands out its calls in parts. The first byte tells text
/// ("<" starts a call) from calls; after that, the grammar guarantees the layout.
pub struct CallReader {
    state: State,
    /// Bytes of the current fixed piece matched so far, or of the name read so far.
    buf: String,
    index: u32,
    depth: u32,
    in_string: bool,
    escaped: bool,
    pending: Vec<CallDelta>,
    new_id: Box<dyn FnMut() -> String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Nothing seen yet.
    Start,
    /// The answer is text: nothing to do.
    Text,
    Open,
    Name,
    Args,
    Close,
    Between,
}

impl CallReader {
    pub fn new(new_id: Box<dyn FnMut() -> String>) -> Self {
        CallReader {
            state: State::Start,
            buf: String::new(),
            index: 0,
            depth: 0,
            in_string: false,
            escaped: false,
            pending: Vec::new(),
            new_id,
        }
    }

    /// Whether the answer is tool calls (known from its first byte).
    pub fn is_calls(&self) -> bool {
        !matches!(self.state, State::Start | State::Text)
    }

    /// Whether the answer is text (known from its first byte).
    pub fn is_text(&self) -> bool {
        self.state == State::Text
    }

    /// Whether parts are waiting for `take`.
    pub fn has_parts(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The parts written since the last call.
    pub fn take(&mut self) -> Vec<CallDelta> {
        std::mem::take(&mut self.pending)
    }

    fn args(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        match self.pending.last_mut() {
            Some(d) if d.index == self.index => d.arguments.push_str(s),
            _ => self.pending.push(CallDelta {
                index: self.index,
                id: None,
                name: None,
                arguments: s.to_string(),
            }),
        }
    }

    /// Follow more of the answer.
    pub fn push(&mut self, text: &str) {
        let mut args_from: Option<usize> = None;
        for (at, c) in text.char_indices() {
            match self.state {
                State::Start => {
                    self.state = if c == '<' { State::Open } else { State::Text };
                    if self.state == State::Text {
                        return;
                    }
                    self.buf.clear();
                    self.buf.push(c);
                }
                State::Text => return,
                State::Open => {
                    self.buf.push(c);
                    if self.buf == OPEN {
                        self.state = State::Name;
                        self.buf.clear();
                    }
                }
                State::Name => {
                    self.buf.push(c);
                    if self.buf.ends_with(MID) {
                        let name = self.buf[..self.buf.len() - MID.len()].to_string();
                        self.pending.push(CallDelta {
                            index: self.index,
                            id: Some((self.new_id)()),
                            name: Some(name),
                            arguments: String::new(),
                        });
                        self.state = State::Args;
                        self.buf.clear();
                        self.depth = 0;
                        args_from = Some(at + c.len_utf8());
                    }
                }
                State::Args => {
                    if args_from.is_none() {
                        args_from = Some(at);
                    }
                    if self.in_string {
                        if self.escaped {
                            self.escaped = false;
                        } else if c == '\\' {
                            self.escaped = true;
                        } else if c == '"' {
                            self.in_string = false;
                        }
                    } else if c == '"' {
                        self.in_string = true;
                    } else if c == '{' || c == '[' {
                        self.depth += 1;
                    } else if c == '}' || c == ']' {
                        self.depth = self.depth.saturating_sub(1);
                        if self.depth == 0 {
                            let from = args_from.take().unwrap_or(at);
                            self.args(&text[from..at + c.len_utf8()]);
                            self.state = State::Close;
                            self.buf.clear();
                        }
                    }
                }
                // Whitespace the JSON grammar allows after the arguments.
                State::Close if self.buf.is_empty() && c != '}' && c.is_whitespace() => {}
                State::Close => {
                    self.buf.push(c);
                    if self.buf == CLOSE {
                        self.state = State::Between;
                        self.buf.clear();
                        self.index += 1;
                    }
                }
                State::Between => {
                    self.buf.push(c);
                    if self.buf == BETWEEN {
                        self.state = State::Open;
                        self.buf.clear();
                    }
                }
            }
        }
        if let (State::Args, Some(from)) = (self.state, args_from) {
            let rest = &text[from..];
            self.args(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(choice: Choice, parallel: bool) -> Tools {
        Tools::new(
            vec![
                (
                    "get_weather".into(),
                    Some("Weather in a city".into()),
                    Some(r#"{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}"#.into()),
                ),
                ("now".into(), None, None),
            ],
            Some(choice),
            Some(parallel),
        )
        .unwrap()
        .unwrap()
    }

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }

    fn ids() -> Box<dyn FnMut() -> String> {
        let mut n = 0;
        Box::new(move || {
            n += 1;
            format!("call_{n}")
        })
    }

    #[test]
    fn calls_are_read_in_parts_however_the_text_is_cut() {
        let text = format!(
            "{}\n{}",
            call_text("get_weather", r#"{"city": "Pa\"ris {x}"}"#),
            call_text("now", "{}")
        );
        for cut in 1..8 {
            let mut r = CallReader::new(ids());
            let mut all = vec![];
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(cut) {
                r.push(&piece.iter().collect::<String>());
                all.extend(r.take());
            }
            assert!(r.is_calls());
            let mut calls: Vec<(String, String, String)> = vec![];
            for d in all {
                if let Some(name) = d.name {
                    assert_eq!(d.index as usize, calls.len());
                    calls.push((d.id.unwrap(), name, d.arguments));
                } else {
                    assert_eq!(d.index as usize, calls.len() - 1, "cut {cut}");
                    calls.last_mut().unwrap().2.push_str(&d.arguments);
                }
            }
            assert_eq!(
                calls,
                [
                    (
                        "call_1".into(),
                        "get_weather".into(),
                        r#"{"city": "Pa\"ris {x}"}"#.into()
                    ),
                    ("call_2".into(), "now".into(), "{}".into())
                ],
                "cut {cut}"
            );
        }
    }

    #[test]
    fn text_answers_are_left_alone() {
        let mut r = CallReader::new(ids());
        r.push("Hello <tool_call>");
        assert!(r.is_text() && r.take().is_empty());
    }

    #[test]
    fn bad_tools_and_choices_are_invalid_options() {
        let named = |n: &str| {
            Tools::new(
                vec![("a".into(), None, None)],
                Some(Choice::Function(n.into())),
                None,
            )
        };
        assert!(named("a").is_ok());
        for (r, option) in [
            (named("b").map(|_| ()), "tool-choice"),
            (
                Tools::new(vec![("a b".into(), None, None)], None, None).map(|_| ()),
                "tools",
            ),
            (
                Tools::new(
                    vec![("a".into(), None, None), ("a".into(), None, None)],
                    None,
                    None,
                )
                .map(|_| ()),
                "tools",
            ),
            (
                Tools::new(vec![("a".into(), None, Some("[1]".into()))], None, None).map(|_| ()),
                "tools",
            ),
            (
                Tools::new(vec![], Some(Choice::Required), None).map(|_| ()),
                "tool-choice",
            ),
        ] {
            match r {
                Err(Error::InvalidOption { name, .. }) => assert_eq!(name, option),
                other => panic!("{other:?}"),
            }
        }
        assert!(Tools::new(vec![], Some(Choice::None), None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn history_renders_in_the_generic_form() {
        let m = msg;
        let call = Call {
            id: "call_1".into(),
            name: "now".into(),
            arguments: "{}".into(),
        };
        let out = render_messages(
            vec![
                (m("user", "time?"), vec![], None),
                (m("assistant", ""), vec![call], None),
                (m("tool", "12:00"), vec![], Some("call_1".into())),
                (m("tool", "UTC"), vec![], Some("call_1".into())),
            ],
            Some(&tools(Choice::Auto, true)),
        )
        .unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].role, "system");
        assert!(
            out[0].content.contains("\"name\":\"get_weather\""),
            "{}",
            out[0].content
        );
        assert_eq!(out[2].content, call_text("now", "{}"));
        assert_eq!(out[3].role, "user");
        assert_eq!(
            out[3].content,
            "<tool_response>\n12:00\n</tool_response>\n<tool_response>\nUTC\n</tool_response>"
        );
    }

    #[test]
    fn grammars_compile_for_every_choice() {
        let m = crate::generate::tests::model();
        for choice in [
            Choice::Auto,
            Choice::Required,
            Choice::Function("now".into()),
        ] {
            for parallel in [false, true] {
                let g = tools(choice.clone(), parallel).grammar();
                m.constrain(&crate::constraint::Format::Lark(g.clone()))
                    .unwrap_or_else(|e| panic!("{e}\n{g}"));
            }
        }
    }

    /// A template in the Hermes / Qwen2.5 style: tools in the system turn, calls as
    /// <tool_call> JSON, results in user turns.
    const HERMES: &str = r#"{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call them as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}{% if m.role == 'system' %}{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% elif m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

    #[test]
    fn a_template_with_its_own_tool_form_renders_tools_and_history() {
        use crate::template::{ChatTemplate, SpecialTokens};
        let t = ChatTemplate::new(HERMES, SpecialTokens::default()).unwrap();
        assert!(t.takes_tools());
        let m = msg;
        let call = Call {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city": "Paris"}"#.into(),
        };
        let (msgs, tools_json) = template_messages(
            vec![
                (m("system", "Be brief."), vec![], None),
                (m("user", "Weather?"), vec![], None),
                (m("assistant", ""), vec![call], None),
                (m("tool", "sunny"), vec![], Some("call_1".into())),
            ],
            Some(&tools(Choice::Auto, true)),
        )
        .unwrap();
        let prompt = crate::chat::render_with_tools(&t, &msgs, tools_json.as_ref()).unwrap();
        let text = &prompt.text;
        assert!(
            text.starts_with("<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\n{"),
            "{text}"
        );
        assert!(text.contains(r#""name": "get_weather""#), "{text}");
        assert!(text.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"), "{text}");
        assert!(
            text.contains("<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>"),
            "{text}"
        );
        // Content is still located (and so kept plain text) around the tools.
        assert!(prompt.content.is_some());
        // Without tools the same conversation renders no tool list.
        let (msgs, none) = template_messages(vec![(m("user", "hi"), vec![], None)], None).unwrap();
        assert!(none.is_none());
        assert!(!t.render(&msgs, true).unwrap().contains("<tools>"));
    }
}
