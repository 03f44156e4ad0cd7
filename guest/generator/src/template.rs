//! Chat templates: the model's Hugging Face `chat_template` (Jinja), rendered with minijinja
//! the way `transformers` renders it (trim_blocks, lstrip_blocks, `raise_exception`, `tojson`,
//! Python string methods).

use crate::error::{Error, Result};
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

#[derive(Debug, Clone, Default, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant's tool calls, in Hugging Face's form (`{"type": "function", "function":
    /// {"name", "arguments"}}`), for templates that render them (crate::tools).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<serde_json::Value>,
    /// A "tool" message: the call it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// Special-token strings the templates refer to.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    tokens: SpecialTokens,
    takes_tools: bool,
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`
/// (Python separators, no HTML escaping, keys in their given order).
fn tojson(
    value: Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    py_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// Python's `json.dumps` layout: `", "` and `": "` without indent; newlines with it.
fn py_json(
    v: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind as K;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    let json_str = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    match v.kind() {
        K::Undefined | K::None => out.push_str("null"),
        K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        K::Number => {
            if let Some(i) = v.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                out.push_str(&if f.is_finite() {
                    serde_json::Value::from(f).to_string()
                } else {
                    "NaN".into()
                });
            }
        }
        K::String | K::Bytes | K::Plain | K::Invalid => {
            out.push_str(&json_str(v.as_str().unwrap_or(&v.to_string())))
        }
        K::Seq | K::Iterable | K::Map => {
            // A map iterates over its keys; each item is then `key: value`.
            let is_map = matches!(v.kind(), K::Map);
            let (open, close) = if is_map { ('{', '}') } else { ('[', ']') };
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push(open);
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                if is_map {
                    out.push_str(&json_str(x.as_str().unwrap_or(&x.to_string())));
                    out.push_str(": ");
                    py_json(&v.get_item(x)?, indent, depth + 1, out)?;
                } else {
                    py_json(x, indent, depth + 1, out)?;
                }
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(close);
        }
        _ => out.push_str(&json_str(&v.to_string())),
    }
    Ok(())
}

/// `strftime_now(fmt)`: templates (Llama 3) print today's date; the guest has no time zone
/// data, so this formats UTC and supports the common directives.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d)
}

impl ChatTemplate {
    pub fn new(source: &str, tokens: SpecialTokens) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::model(format!("chat template: {e}")))?;
        // A template that renders `tools` and writes calls as <tool_call> JSON (Hermes-style,
        // Qwen2.5): the form crate::tools constrains calls to, so its own rendering is used.
        let takes_tools = source.contains("tools") && source.contains("<tool_call>");
        Ok(ChatTemplate {
            env,
            tokens,
            takes_tools,
        })
    }

    /// Whether the template renders tools, tool calls and tool results itself, in the
    /// `<tool_call>` form (then "tool" messages and `tools` go to it as Hugging Face passes them).
    pub fn takes_tools(&self) -> bool {
        self.takes_tools
    }

    /// The prompt for `messages`, with the generation prompt for the assistant's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`ChatTemplate::render`] with Hugging Face's `tools` variable (a list of
    /// `{"type": "function", "function": {...}}`), for a template that [`takes_tools`].
    ///
    /// [`takes_tools`]: ChatTemplate::takes_tools
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::invalid("messages must not be empty"));
        }
        for m in messages {
            if !ROLES.contains(&m.role.as_str()) && !(self.takes_tools && m.role == "tool") {
                return Err(Error::invalid(format!(
                    "unknown role {:?}: expected system, user or assistant",
                    m.role
                )));
            }
        }
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::model(format!("chat template: {e}")))?;
        let t = &self.tokens;
        let ctx = minijinja::context! {
            messages => messages,
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => t.bos_token.clone().unwrap_or_default(),
            eos_token => t.eos_token.clone().unwrap_or_default(),
            unk_token => t.unk_token.clone(),
            pad_token => t.pad_token.clone(),
        };
        tmpl.render(ctx).map_err(|e| match e.kind() {
            // raise_exception: the template rejected the conversation.
            ErrorKind::InvalidOperation => {
                Error::invalid(format!("chat template: {}", e.detail().unwrap_or("error")))
            }
            _ => Error::model(format!("chat template: {e}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }

    fn tokens() -> SpecialTokens {
        SpecialTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            ..Default::default()
        }
    }

    #[test]
    fn idioms() {
        let src = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] | trim %}{% else %}{% set sys = '' %}{% endif %}\n\
            {% for m in messages %}\n\
            {% if loop.first %}[first]{% endif %}{{ '<' + m['role'] + '>' + m.content.strip() + eos_token }}\n\
            {% endfor %}\n\
            {{ sys | tojson }}{% if add_generation_prompt %}<assistant>{% endif %}";
        let t = ChatTemplate::new(src, tokens()).unwrap();
        let out = t
            .render(&[msg("system", "  be brief "), msg("user", " hi ")], true)
            .unwrap();
        assert_eq!(
            out,
            "<s>[first]<system>be brief</s>\n<user>hi</s>\n\"be brief\"<assistant>"
        );
    }

    #[test]
    fn raise_exception_is_invalid_request() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok";
        let t = ChatTemplate::new(src, tokens()).unwrap();
        assert_eq!(t.render(&[msg("user", "x")], true).unwrap(), "ok");
        match t.render(&[msg("assistant", "x")], true) {
            Err(Error::InvalidRequest(m)) => {
                assert!(m.contains("first message must be user"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn roles_and_empty() {
        let t = ChatTemplate::new("x", tokens()).unwrap();
        assert!(matches!(t.render(&[], true), Err(Error::InvalidRequest(_))));
        assert!(matches!(
            t.render(&[msg("tool", "x")], true),
            Err(Error::InvalidRequest(_))
        ));
    }

    /// Gemma 3's template (its GGUFs' `tokenizer.chat_template`): the system message folded into
    /// the first user turn, `model` for the assistant, `| trim`, list contents, and an exception
    /// when the roles do not alternate.
    #[test]
    fn gemma3_template() {
        let src = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"#;
        let gemma = SpecialTokens {
            bos_token: Some("<bos>".into()),
            eos_token: Some("<eos>".into()),
            ..Default::default()
        };
        let t = ChatTemplate::new(src, gemma).unwrap();
        let out = t
            .render(
                &[
                    msg("system", "Be helpful."),
                    msg("user", " Hello "),
                    msg("assistant", "Hi!"),
                    msg("user", "Bye"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe helpful.\n\nHello<end_of_turn>\n\
             <start_of_turn>model\nHi!<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        match t.render(&[msg("user", "a"), msg("user", "b")], true) {
            Err(Error::InvalidRequest(m)) => assert!(m.contains("must alternate"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_template_is_model_error() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", tokens()),
            Err(Error::ModelError(_))
        ));
    }

    #[test]
    fn tojson_like_python() {
        let t = ChatTemplate::new(
            "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ [] | tojson }}|{{ {} | tojson(indent=2) }}",
            tokens(),
        )
        .unwrap();
        let out = t
            .render(&[msg("user", "<|im_start|> \"é\"\n")], true)
            .unwrap();
        assert_eq!(
            out,
            "[{\"role\": \"user\", \"content\": \"<|im_start|> \\\"é\\\"\\n\"}]|{\n  \"role\": \"user\",\n  \"content\": \"<|im_start|> \\\"é\\\"\\n\"\n}|[]|{}"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert!(strftime_now("%d %b %Y".into()).len() == 11);
    }
}
