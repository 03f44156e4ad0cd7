//! The chat templates render exactly as Python's jinja2 renders them for transformers.
//! Expected strings: fixtures/chat_templates.json, made by chat_template_fixture.py
//! (regenerate: `.venv/bin/python guest/generator/tests/chat_template_fixture.py`).

use std::path::PathBuf;

use generator::error::Error;
use generator::template::{ChatTemplate, Message, SpecialTokens};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn renders_like_jinja2() {
    let fixture =
        std::fs::read_to_string(root().join("guest/generator/tests/fixtures/chat_templates.json"))
            .unwrap();
    let cases: Vec<Value> = serde_json::from_str(&fixture).unwrap();
    let mut checked = 0;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let source = if let Some(model_template) = case["model_template"].as_str() {
            // The real model's template, read from its directory.
            let path = root()
                .join("models")
                .join(name)
                .join("tokenizer_config.json");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup)", path.display()));
            let cfg: Value = serde_json::from_str(&text).unwrap();
            let src = cfg["chat_template"].as_str().unwrap().to_string();
            assert_eq!(
                src, model_template,
                "{name}: the model's template changed; regenerate the fixture"
            );
            src
        } else {
            case["template"].as_str().unwrap().to_string()
        };
        let tokens = SpecialTokens {
            bos_token: case["bos_token"].as_str().map(String::from),
            eos_token: case["eos_token"].as_str().map(String::from),
            ..Default::default()
        };
        let t = ChatTemplate::new(&source, tokens).unwrap();
        for r in case["renders"].as_array().unwrap() {
            let msgs: Vec<Message> = r["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message {
                    role: m["role"].as_str().unwrap().into(),
                    content: m["content"].as_str().unwrap().into(),
                    ..Default::default()
                })
                .collect();
            let got = t.render(&msgs, true);
            match (r["ok"].as_str(), r["error"].as_str()) {
                (Some(expected), _) => assert_eq!(got.as_deref(), Ok(expected), "{name}: {msgs:?}"),
                (None, Some(err)) => match got {
                    Err(Error::InvalidRequest(m)) => assert!(m.contains(err), "{name}: {m}"),
                    other => panic!("{name}: expected the error {err:?}, got {other:?}"),
                },
                _ => panic!("bad fixture entry"),
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} renderings checked");
}
