//! `slm chat`: an interactive multi-turn chat on stdin, each reply streamed to stdout.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context as _, Result};

use crate::cli::GenArgs;
use crate::commands::app::App;
use crate::commands::generate::generate;
use crate::completion::Prompt;
use crate::runtime::Message;

pub fn chat(app: &App, gen: &GenArgs) -> Result<()> {
    let model = app.model(gen.model.as_deref())?;
    app.preload(&model);
    let mut inst = app.instance()?;
    let opts = gen.options(model.clone());
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!("chatting with {model}; /exit or Ctrl-D to end");
    }
    let mut messages = gen.system_messages();
    let mut lines = stdin.lock();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let mut line = String::new();
        if lines.read_line(&mut line).context("cannot read stdin")? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim() == "/exit" {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        messages.push(Message {
            role: "user".into(),
            content: line.to_string(),
            tool_calls: vec![],
            tool_call_id: None,
        });
        match generate(app, &mut inst, Prompt::Chat(&messages), &opts) {
            Ok(text) => messages.push(Message {
                role: "assistant".into(),
                content: text,
                tool_calls: vec![],
                tool_call_id: None,
            }),
            Err(e) if interactive => {
                messages.pop();
                eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
