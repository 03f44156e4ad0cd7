//! Generation as `slm run` and `slm chat` do it: the request options from the flags, the pieces
//! streamed to stdout as they come, and the summary line on stderr.

use std::io::{StdoutLock, Write};

use anyhow::{Context as _, Result};

use crate::cli::GenArgs;
use crate::commands::app::App;
use crate::completion::{self, Instance, Prompt, Sink};
use crate::runtime::{
    FinishReason, Format, Message, Options, Sampling, Summary, Tool, ToolCallDelta, ToolChoice,
};

impl GenArgs {
    /// The request options these flags ask for, with `model`.
    pub fn options(&self, model: String) -> Options {
        Options {
            model: Some(model),
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            sampling: Sampling {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repeat_penalty,
                seed: self.seed,
                frequency_penalty: None,
                presence_penalty: None,
                logit_bias: vec![],
            },
            logprobs: None,
            format: self.format(),
            tools: self
                .tools
                .iter()
                .flat_map(|t| t.0.iter())
                .map(|(name, description, parameters)| Tool {
                    name: name.clone(),
                    description: description.clone(),
                    parameters: parameters.clone(),
                })
                .collect(),
            tool_choice: self.tool_choice.as_deref().map(|c| match c {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                name => ToolChoice::Function(name.to_string()),
            }),
            parallel_tool_calls: None,
        }
    }

    /// The output format the flags ask for (clap lets at most one through).
    fn format(&self) -> Option<Format> {
        if let Some(schema) = &self.json_schema {
            Some(Format::JsonSchema(schema.clone()))
        } else if let Some(grammar) = &self.grammar {
            Some(Format::Lark(grammar.clone()))
        } else if let Some(rx) = &self.regex {
            Some(Format::Regex(rx.clone()))
        } else if self.json {
            Some(Format::JsonObject)
        } else {
            None
        }
    }

    /// The start of a conversation: the `--system` message, if any.
    pub fn system_messages(&self) -> Vec<Message> {
        self.system
            .iter()
            .map(|s| Message {
                role: "system".into(),
                content: s.clone(),
                tool_calls: vec![],
                tool_call_id: None,
            })
            .collect()
    }
}

/// Writes each piece to stdout as it comes (and keeps the text); a newline at the end.
struct Stdout<'a> {
    out: StdoutLock<'a>,
    text: String,
    /// Tool calls: (id, name, arguments so far).
    calls: Vec<(String, String, String)>,
}

impl Sink for Stdout<'_> {
    fn piece(&mut self, piece: &str) -> Result<()> {
        self.out
            .write_all(piece.as_bytes())
            .and_then(|_| self.out.flush())
            .context("cannot write to stdout")?;
        self.text.push_str(piece);
        Ok(())
    }

    fn tool_calls(&mut self, deltas: Vec<ToolCallDelta>) -> Result<()> {
        for d in deltas {
            let i = d.index as usize;
            if i == self.calls.len() {
                self.calls.push((
                    d.id.unwrap_or_default(),
                    d.name.unwrap_or_default(),
                    String::new(),
                ));
            }
            if let Some(call) = self.calls.get_mut(i) {
                call.2.push_str(&d.arguments);
            }
        }
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        // Tool calls, complete, one JSON line each (the arguments as JSON when they parse).
        for (id, name, arguments) in &self.calls {
            let arguments = serde_json::from_str::<serde_json::Value>(arguments)
                .unwrap_or_else(|_| serde_json::Value::String(arguments.clone()));
            let line = serde_json::json!({"id": id, "name": name, "arguments": arguments});
            writeln!(self.out, "{line}").context("cannot write to stdout")?;
        }
        if self.calls.is_empty() {
            writeln!(self.out).context("cannot write to stdout")?;
        }
        self.out.flush().context("cannot write to stdout")
    }

    fn interrupted(&mut self) {
        let _ = writeln!(self.out);
    }
}

/// Completes `prompt` in `inst`, streaming the pieces to stdout, then prints the summary line on
/// stderr (unless --quiet); the text.
pub fn generate(app: &App, inst: &mut Instance, prompt: Prompt, opts: &Options) -> Result<String> {
    let mut sink = Stdout {
        out: std::io::stdout().lock(),
        text: String::new(),
        calls: Vec::new(),
    };
    let summary =
        completion::complete(inst, prompt, opts, &mut sink).map_err(|f| app.failure(f))?;
    if !app.quiet {
        eprintln!("{}", summary_line(&summary));
    }
    Ok(sink.text)
}

/// The stderr line after a reply: tokens, time to first token, decode speed, total, finish.
fn summary_line(s: &Summary) -> String {
    let u = &s.usage;
    let t = &s.timings;
    let decode_tps = completion::decode_tps(s)
        .map(|tps| format!("{tps:.1} tokens/s"))
        .unwrap_or_else(|| "n/a".to_string());
    let finish = match s.finish_reason {
        FinishReason::Stop => "stop",
        FinishReason::StopString => "stop-string",
        FinishReason::Length => "length",
        FinishReason::ContextFull => "context-full",
        FinishReason::ToolCalls => "tool-calls",
    };
    format!(
        "[prompt {} tokens ({} cached), completion {} tokens, time to first token {:.0} ms, decode {}, total {:.0} ms, finish {}]",
        u.prompt_tokens, u.cached_tokens, u.completion_tokens, t.time_to_first_token_ms, decode_tps, t.total_ms, finish
    )
}
