//! An example application component: reads text on stdin and prints a summary.
//!
//! It knows nothing of models, tokenizers or wasi:nn. It imports `edge:slm/generator` (the
//! `generator-client` world of wit/slm.wit) and exports `wasi:cli/run` (a Rust `main` on
//! wasm32-wasip2). Composing it with the generator (and, for hosts without wasi:nn, with the
//! in-wasm wasi:nn) gives a command any WASI host runs:
//!
//! ```sh
//! echo "some long text" | wasmtime run --dir models::/models dist/summarize-portable.wasm
//! ```
//!
//! Options: `--max-tokens N` (default 64), `--model NAME`, `--system TEXT` (the instruction).
//! The summary goes to stdout; token counts and timings to stderr.

use std::io::{Read, Write};

wit_bindgen::generate!({ path: "../../wit", world: "edge:slm/generator-client" });

use edge::slm::generator;
use edge::slm::types::{Error, Message, Options, Sampling};

const DEFAULT_SYSTEM: &str = "Summarize the user's text in one or two short sentences.";

struct Args {
    max_tokens: u32,
    model: Option<String>,
    system: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        max_tokens: 64,
        model: None,
        system: DEFAULT_SYSTEM.to_string(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |flag: &str| it.next().ok_or_else(|| format!("{flag} needs a value"));
        match a.as_str() {
            "--max-tokens" => {
                let v = value("--max-tokens")?;
                args.max_tokens = v
                    .parse()
                    .map_err(|_| format!("--max-tokens: not a number: {v}"))?;
            }
            "--model" => args.model = Some(value("--model")?),
            "--system" => args.system = value("--system")?,
            "-h" | "--help" => {
                println!("usage: summarize [--max-tokens N] [--model NAME] [--system TEXT] < text");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(args)
}

fn describe(e: &Error) -> String {
    match e {
        Error::ModelNotFound(m) => format!("model not found: {m}"),
        Error::InvalidRequest(m) => format!("invalid request: {m}"),
        Error::InvalidOption(o) => format!("invalid request: {}", o.message),
        Error::ContextOverflow(o) => {
            format!(
                "the text is too long: {} tokens, the model takes {}",
                o.prompt_tokens, o.context_length
            )
        }
        Error::ModelError(m) => format!("model error: {m}"),
        Error::BackendFailure(m) => format!("backend failure: {m}"),
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read stdin: {e}"))?;
    let text = text.trim();
    if text.is_empty() {
        return Err("nothing to summarize: stdin is empty".into());
    }
    let messages = vec![
        Message {
            role: "system".into(),
            content: args.system,
            tool_calls: vec![],
            tool_call_id: None,
        },
        Message {
            role: "user".into(),
            content: text.to_string(),
            tool_calls: vec![],
            tool_call_id: None,
        },
    ];
    let options = Options {
        model: args.model,
        max_tokens: Some(args.max_tokens),
        stop: vec![],
        // Greedy: the same text on every host.
        sampling: Sampling {
            temperature: Some(0.0),
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: None,
            seed: None,
            frequency_penalty: None,
            presence_penalty: None,
            logit_bias: vec![],
        },
        logprobs: None,
        format: None,
        tools: vec![],
        tool_choice: None,
        parallel_tool_calls: None,
    };
    let completion = generator::chat(&messages, &options).map_err(|e| describe(&e))?;
    let mut out = std::io::stdout().lock();
    while let Some(piece) = completion.next().map_err(|e| describe(&e))? {
        out.write_all(piece.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| e.to_string())?;
    }
    writeln!(out).map_err(|e| e.to_string())?;
    let s = completion.summary();
    let decoded = s.usage.completion_tokens.saturating_sub(1);
    let decode_tps = if s.timings.decode_ms > 0.0 {
        decoded as f64 * 1e3 / s.timings.decode_ms
    } else {
        0.0
    };
    eprintln!(
        "summarize: {} prompt tokens, {} generated ({:?}); prefill {:.0} ms, first token {:.0} ms, decode {:.1} tok/s",
        s.usage.prompt_tokens,
        s.usage.completion_tokens,
        s.finish_reason,
        s.timings.prefill_ms,
        s.timings.time_to_first_token_ms,
        decode_tps
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("summarize: error: {e}");
        std::process::exit(1);
    }
}
