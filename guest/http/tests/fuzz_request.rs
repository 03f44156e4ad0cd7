//! Fuzzing the OpenAI request parser (issue 16, "Fuzzing"): any JSON value, requests that are
//! right but for one or two fields, bodies cut short or with bytes flipped, invalid UTF-8, deep
//! nesting. `chat_request` and `completion_request` return a request or a 400
//! `invalid_request_error`, never panic; a request they accept keeps what the client sent.
//!
//! Deterministic: cases come from fixed seeds; a failure names the case and its body.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use serde_json::{json, Map, Value};
use slm_http::{chat_request, completion_request, ApiError};

/// splitmix64: a small, seeded, reproducible source of cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Text a hostile client sends: template and chat-format syntax, control and bidi characters,
/// quotes and escapes, long runs, any Unicode scalar.
fn hostile(rng: &mut Rng) -> String {
    const PIECES: [&str; 24] = [
        "hi",
        "{{",
        "}}",
        "{% for m in messages %}",
        "{% endfor %}",
        "{#",
        "{{ raise_exception('x') }}",
        "<|im_start|>system\n",
        "<|im_end|>",
        "<|endoftext|>",
        "[INST]",
        "<</SYS>>",
        "\u{0}",
        "\u{202e}",
        "\r\n",
        "\\",
        "\"",
        "'",
        "\\u0000",
        "é",
        "🦀",
        "\u{feff}",
        " ",
        "\t",
    ];
    let mut s = String::new();
    for _ in 0..rng.below(8) {
        match rng.below(10) {
            0 => s.push_str(&"a".repeat(rng.below(5000))),
            1 => s.extend(
                (0..1 + rng.below(8)).filter_map(|_| char::from_u32(rng.next() as u32 % 0x11_0000)),
            ),
            _ => s.push_str(*rng.pick(&PIECES)),
        }
    }
    s
}

fn number(rng: &mut Rng) -> Value {
    match rng.below(12) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1),
        3 => json!(2),
        4 => json!(0.5),
        5 => json!(-0.0),
        6 => json!(1e308),
        7 => json!(u64::MAX),
        8 => json!(i64::MIN),
        9 => json!(4_294_967_296u64),
        10 => json!(5e-324),
        _ => json!(1e39),
    }
}

/// Any JSON value, nested up to `depth`.
fn any(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth == 0 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => number(rng),
        3 | 4 => json!(hostile(rng)),
        5 => Value::Array((0..rng.below(4)).map(|_| any(rng, depth - 1)).collect()),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.below(4) {
                let key = if rng.chance(50) {
                    rng.pick(&FIELDS).to_string()
                } else {
                    hostile(rng)
                };
                m.insert(key, any(rng, depth - 1));
            }
            Value::Object(m)
        }
    }
}

/// The fields the parser reads.
const FIELDS: [&str; 25] = [
    "messages",
    "prompt",
    "role",
    "content",
    "type",
    "text",
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stream",
    "n",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "function",
    "name",
    "tool_calls",
    "tool_call_id",
    "arguments",
];

/// The right type for the field, or (`bad` times in 100) any value.
fn field_value(rng: &mut Rng, field: &str, bad: u64) -> Value {
    if rng.chance(bad) {
        return any(rng, 2);
    }
    match field {
        "model" => json!(hostile(rng)),
        "stop" => match rng.below(4) {
            0 => json!(hostile(rng)),
            1 => json!(""),
            _ => Value::Array((0..rng.below(4)).map(|_| json!(hostile(rng))).collect()),
        },
        "stream" => json!(rng.chance(50)),
        "stream_options" => json!({ "include_usage": rng.chance(50) }),
        "tools" => Value::Array(
            (0..rng.below(4))
                .map(|_| {
                    let name = match rng.below(3) {
                        0 => json!("get_weather"),
                        1 => json!("f"),
                        _ => json!(hostile(rng)),
                    };
                    json!({"type": "function", "function": {"name": name,
                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
                })
                .collect(),
        ),
        "tool_choice" => match rng.below(5) {
            0 => json!("none"),
            1 => json!("auto"),
            2 => json!("required"),
            3 => json!({"type": "function", "function": {"name": "f"}}),
            _ => json!(hostile(rng)),
        },
        "parallel_tool_calls" => json!(rng.chance(50)),
        _ => number(rng),
    }
}

/// A message: a role (known or not) and content as a string, parts, null, or (`bad` times in
/// 100) something else.
fn message(rng: &mut Rng, bad: u64) -> Value {
    let role = if rng.chance(bad) {
        match rng.below(3) {
            0 => json!(hostile(rng)),
            1 => any(rng, 1),
            _ => json!(rng.pick(&["tool", "USER", "function", ""])),
        }
    } else {
        json!(rng.pick(&["system", "user", "assistant", "developer"]))
    };
    let mut m = Map::new();
    if !rng.chance(bad / 4) {
        m.insert("role".into(), role);
    }
    let content = match rng.below(8) {
        0 => Value::Null,
        1 if rng.chance(bad) => any(rng, 2),
        2 | 3 => Value::Array(
            (0..rng.below(4))
                .map(|_| match if rng.chance(bad) { rng.below(4) } else { 3 } {
                    0 => any(rng, 1),
                    1 => json!({ "type": "image_url", "image_url": { "url": hostile(rng) } }),
                    2 => json!({ "type": "text" }),
                    _ => json!({ "type": "text", "text": hostile(rng) }),
                })
                .collect(),
        ),
        _ => json!(hostile(rng)),
    };
    if rng.chance(95) {
        m.insert("content".into(), content);
    }
    Value::Object(m)
}

/// A request body that is right but for some fields: `chat` picks `messages` or `prompt`;
/// each field or message is wrong `bad` times in 100.
fn near_request(rng: &mut Rng, chat: bool, bad: u64) -> Value {
    let mut body = Map::new();
    if chat {
        let kind = if rng.chance(bad) { rng.below(2) } else { 2 };
        let messages = match kind {
            0 => any(rng, 2),
            1 => json!([]),
            _ => {
                let mut ms: Vec<Value> = (0..1 + rng.below(4)).map(|_| message(rng, bad)).collect();
                // A tool call and its result.
                if rng.chance(30) {
                    ms.push(json!({"role": "assistant", "content": null, "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "f", "arguments": hostile(rng)}}]}));
                    let id = if rng.chance(100 - bad) {
                        json!("call_1")
                    } else {
                        any(rng, 1)
                    };
                    ms.push(json!({"role": "tool", "tool_call_id": id, "content": hostile(rng)}));
                }
                Value::Array(ms)
            }
        };
        body.insert("messages".into(), messages);
    } else {
        let prompt = match rng.below(8) {
            0 if rng.chance(bad) => any(rng, 2),
            1 => json!([]),
            2 => json!([hostile(rng), hostile(rng)]),
            3 => json!([hostile(rng)]),
            _ => json!(hostile(rng)),
        };
        body.insert("prompt".into(), prompt);
    }
    for _ in 0..rng.below(5) {
        let field = *rng.pick(&[
            "model",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "stop",
            "repetition_penalty",
            "stream",
            "stream_options",
            "n",
            "logprobs",
            "tools",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
        ]);
        let v = field_value(rng, field, bad);
        body.insert(field.into(), v);
    }
    if rng.chance(bad / 5) {
        return Value::Array(vec![Value::Object(body)]);
    }
    Value::Object(body)
}

/// The case failed as a client error should.
fn check_error(e: &ApiError, what: &str) {
    assert_eq!(e.status, 400, "{what}: {e:?}");
    assert_eq!(e.kind, "invalid_request_error", "{what}: {e:?}");
    assert!(!e.message.is_empty(), "{what}: {e:?}");
}

/// Parses `body` both ways; a panic that escapes is this case's failure. `sent`: the JSON value
/// the body holds, to check what an accepted request keeps.
fn parse_both(body: &[u8], sent: Option<&Value>, what: &str) -> (bool, bool) {
    let chat = match chat_request(body) {
        Ok(r) => {
            assert!(!r.input.is_empty(), "{what}: no messages");
            let messages = sent.and_then(|v| v["messages"].as_array());
            for (i, m) in r.input.iter().enumerate() {
                assert!(
                    ["system", "user", "assistant", "tool"].contains(&m.role.as_str()),
                    "{what}: role {:?} accepted",
                    m.role
                );
                assert_eq!(
                    m.role == "tool",
                    m.tool_call_id.is_some(),
                    "{what}: tool_call_id"
                );
                assert!(
                    m.role == "assistant" || m.tool_calls.is_empty(),
                    "{what}: tool_calls on {}",
                    m.role
                );
                // String content arrives unchanged, whatever it holds.
                if let Some(text) = messages.and_then(|ms| ms[i]["content"].as_str()) {
                    assert_eq!(m.content, text, "{what}: content changed");
                }
            }
            assert!(
                r.options.stop.iter().all(|s| !s.is_empty()),
                "{what}: empty stop"
            );
            for t in &r.options.tools {
                assert!(
                    !t.name.is_empty()
                        && t.name.len() <= 64
                        && t.name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                    "{what}: tool name {:?}",
                    t.name
                );
            }
            assert!(
                !r.options.tools.is_empty()
                    || (r.options.tool_choice.is_none() && r.options.parallel_tool_calls.is_none()),
                "{what}: tool options without tools"
            );
            true
        }
        Err(e) => {
            check_error(&e, what);
            false
        }
    };
    let completion = match completion_request(body) {
        Ok(r) => {
            if let Some(p) = sent.and_then(|v| v["prompt"].as_str()) {
                assert_eq!(r.input, p, "{what}: prompt changed");
            }
            assert!(r.options.tools.is_empty(), "{what}: tools on a completion");
            assert!(
                r.options.stop.iter().all(|s| !s.is_empty()),
                "{what}: empty stop"
            );
            true
        }
        Err(e) => {
            check_error(&e, what);
            false
        }
    };
    (chat, completion)
}

/// Runs the cases `make` draws, catching each escaped panic; fails listing them.
fn fuzz(
    test: &str,
    seed: u64,
    cases: usize,
    mut make: impl FnMut(&mut Rng) -> (Vec<u8>, Option<Value>),
) {
    let started = Instant::now();
    let mut rng = Rng(seed);
    let (mut chats, mut completions) = (0, 0);
    let mut panics = vec![];
    for case in 0..cases {
        let (body, sent) = make(&mut rng);
        let what = format!(
            "{test} case {case}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
        match catch_unwind(AssertUnwindSafe(|| parse_both(&body, sent.as_ref(), &what))) {
            Ok((c, p)) => {
                chats += c as usize;
                completions += p as usize;
            }
            Err(p) => panics.push(format!(
                "{what}: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        }
    }
    eprintln!(
        "{test}: {cases} cases, {chats} chat requests and {completions} completion requests \
         accepted, {} panics, {:.2} s",
        panics.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        panics.is_empty(),
        "{test}: {} cases failed:\n{}",
        panics.len(),
        panics.join("\n")
    );
}

#[test]
fn any_json_value_is_a_request_or_a_400() {
    fuzz("any JSON", 0x6a73_6f6e, 1000, |rng| {
        let v = any(rng, 4);
        (serde_json::to_vec(&v).unwrap(), Some(v))
    });
}

#[test]
fn near_requests_are_a_request_or_a_400() {
    fuzz("near requests", 0x7265_7175, 2000, |rng| {
        let (chat, bad) = (rng.chance(60), *rng.pick(&[2, 10, 40]));
        let v = near_request(rng, chat, bad);
        (serde_json::to_vec(&v).unwrap(), Some(v))
    });
}

#[test]
fn mangled_bytes_are_a_request_or_a_400() {
    fuzz("mangled bytes", 0x6279_7465, 1000, |rng| {
        let (chat, bad) = (rng.chance(60), *rng.pick(&[2, 10, 40]));
        let v = near_request(rng, chat, bad);
        let mut body = serde_json::to_vec(&v).unwrap();
        match rng.below(4) {
            0 if !body.is_empty() => body.truncate(rng.below(body.len())),
            1 if !body.is_empty() => {
                let i = rng.below(body.len());
                body[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(body.len() + 1);
                body.insert(
                    i,
                    *rng.pick(&[0xff, 0xc0, 0x80, 0xed, b'"', b'{', b'[', b',', 0]),
                );
            }
            _ => {
                let tail: [&[u8]; 5] = [b" x", b"}", b"\xff", b"{}", b"\n"];
                body.extend_from_slice(*rng.pick(&tail))
            }
        }
        (body, None)
    });
}

/// The edge cases one by one: empty and non-JSON bodies, invalid UTF-8, nesting past serde_json's
/// recursion limit (in content, in an unknown field), duplicate fields, numbers out of range.
#[test]
fn named_hostile_bodies_are_400s() {
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let user = r#"{"role":"user","content":"hi"}"#;
    let cases: Vec<(&str, String)> = vec![
        ("empty body", String::new()),
        ("whitespace", " \n".into()),
        ("null", "null".into()),
        ("a string", r#""messages""#.into()),
        (
            "deep content",
            format!(
                r#"{{"messages":[{{"role":"user","content":{}}}]}}"#,
                deep(100_000)
            ),
        ),
        (
            "deep unknown field",
            format!(r#"{{"messages":[{user}],"x":{}}}"#, deep(100_000)),
        ),
        ("deep prompt", format!(r#"{{"prompt":{}}}"#, deep(100_000))),
        (
            "max_tokens too large",
            format!(r#"{{"messages":[{user}],"max_tokens":4294967296}}"#),
        ),
        (
            "max_tokens negative",
            format!(r#"{{"messages":[{user}],"max_tokens":-1}}"#),
        ),
        (
            "max_tokens fraction",
            format!(r#"{{"messages":[{user}],"max_tokens":1.5}}"#),
        ),
        (
            "seed too large",
            format!(r#"{{"messages":[{user}],"seed":18446744073709551616}}"#),
        ),
        ("n = 0", format!(r#"{{"messages":[{user}],"n":0}}"#)),
        (
            "stream as a string",
            format!(r#"{{"messages":[{user}],"stream":"true"}}"#),
        ),
        (
            "empty stop",
            format!(r#"{{"messages":[{user}],"stop":[""]}}"#),
        ),
        ("no role", r#"{"messages":[{"content":"hi"}]}"#.into()),
        (
            "tool role",
            r#"{"messages":[{"role":"tool","content":"hi"}]}"#.into(),
        ),
        (
            "image part",
            r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#.into(),
        ),
        ("two prompts", r#"{"prompt":["a","b"]}"#.into()),
        ("number prompt", r#"{"prompt":7}"#.into()),
    ];
    for (name, body) in &cases {
        let r = catch_unwind(|| {
            let chat = chat_request(body.as_bytes());
            let completion = completion_request(body.as_bytes());
            (chat.err(), completion.err())
        });
        let Ok((chat, completion)) = r else {
            panic!("{name}: panicked");
        };
        // Each body is wrong for at least the route it names (chat unless it has a prompt).
        let e = if body.contains("\"prompt\"") {
            completion
        } else {
            chat
        };
        let e = e.unwrap_or_else(|| panic!("{name}: accepted"));
        check_error(&e, name);
    }
    let invalid_utf8 = b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}";
    check_error(&chat_request(invalid_utf8).unwrap_err(), "invalid UTF-8");
}
