//! `slm run`: one reply to a prompt (through the chat template unless --raw), streamed to stdout.

use anyhow::{bail, Result};

use crate::cli::GenArgs;
use crate::commands::app::App;
use crate::commands::generate::generate;
use crate::completion::Prompt;
use crate::runtime::Message;

pub fn run(app: &App, gen: &GenArgs, raw: bool, prompt: &str) -> Result<()> {
    let r = reply(app, gen, raw, prompt);
    // For `slm bench`'s cold-start runs, which read it from the -v log.
    if let Some(mb) = crate::bench::peak_rss_mb() {
        tracing::debug!("peak RSS {mb:.1} MiB");
    }
    r
}

fn reply(app: &App, gen: &GenArgs, raw: bool, prompt: &str) -> Result<()> {
    if prompt.trim().is_empty() {
        bail!("the prompt is empty (pass the text to generate from)");
    }
    let model = app.model(gen.model.as_deref())?;
    app.preload(&model);
    let mut inst = app.instance()?;
    let opts = gen.options(model);
    if raw {
        generate(app, &mut inst, Prompt::Raw(prompt), &opts)?;
    } else {
        let mut messages = gen.system_messages();
        messages.push(Message {
            role: "user".into(),
            content: prompt.to_string(),
            tool_calls: vec![],
            tool_call_id: None,
        });
        generate(app, &mut inst, Prompt::Chat(&messages), &opts)?;
    }
    Ok(())
}
