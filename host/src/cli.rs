//! The command line's grammar: the clap types of `slm` and their docs, which are `slm --help`.
//! What each command does is in [`crate::commands`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run small language models as WebAssembly components (wasmtime + wasi:nn on tract).
///
/// Generated text goes to stdout; timings and diagnostics go to stderr.
#[derive(Parser)]
#[command(name = "slm", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Args)]
pub struct Global {
    /// Models directory: every subdirectory with a model.onnx is a model named after it, and
    /// every NAME.gguf file a model NAME (converted on first use, cached by content).
    #[arg(
        long,
        global = true,
        env = "SLM_MODELS",
        default_value = "models",
        value_name = "DIR"
    )]
    pub models: PathBuf,
    /// The component to run (default: slm-generator.wasm, for `serve` slm-http.wasm; looked up
    /// next to the slm executable, then in dist/).
    #[arg(long, global = true, env = "SLM_COMPONENT", value_name = "PATH")]
    pub component: Option<PathBuf>,
    /// Inference threads (default: the number of CPU cores).
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    /// Where models run: `gpu` (an NVIDIA GPU through CUDA; fails with the reason when there is
    /// none), `cpu`, or `auto`: the GPU when one is usable (named on stderr), else the CPU.
    /// GPU support is a build option: scripts/build-gpu. Guests asking wasi:nn for the `gpu`
    /// target get the GPU unless this is `cpu`.
    #[arg(long, global = true, env = "SLM_DEVICE", default_value = "auto", value_name = "DEVICE",
          value_parser = ["auto", "gpu", "cpu"])]
    pub device: String,
    /// Prefix cache size per model, in MiB: KV caches of earlier prompts (a shared system
    /// prompt, earlier chat turns) are reused by later ones that start the same way. 0 disables it.
    #[arg(
        long,
        global = true,
        env = "SLM_PREFIX_CACHE_MB",
        default_value_t = 256,
        value_name = "MIB"
    )]
    pub prefix_cache_mb: usize,
    /// No summary line on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Debug logging on stderr (also: SLM_LOG=debug).
    #[arg(long, short, global = true)]
    pub verbose: bool,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Generate a reply to PROMPT (through the chat template unless --raw), streamed to stdout.
    Run {
        #[command(flatten)]
        gen: GenArgs,
        /// Plain completion of PROMPT, without the chat template.
        #[arg(long)]
        raw: bool,
        /// The prompt.
        prompt: String,
    },
    /// Interactive multi-turn chat (reads lines from stdin; `/exit` or end of input ends it).
    Chat {
        #[command(flatten)]
        gen: GenArgs,
    },
    /// Print the token ids of TEXT as a JSON array (no BOS; special-token text becomes special tokens).
    Tokenize {
        /// Model whose tokenizer to use (a name, or a GGUF file).
        #[arg(long, short)]
        model: Option<String>,
        /// The text.
        text: String,
    },
    /// List the models found in the models directory.
    Models,
    /// Convert a GGUF file into a model directory (model.onnx and its JSON files), in Rust.
    ///
    /// Llama-architecture (Llama, SmolLM, Mistral), qwen2, phi3 and gemma3 files convert, with
    /// every matrix type GGUF files use (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
    /// Q4_K, Q5_K, Q6_K) kept exactly; a tied embedding table of a 4-bit or offset type becomes
    /// int8 rows. The vocabulary (byte-level BPE or SentencePiece) becomes a tokenizer.json. Other
    /// architectures are refused with the reason.
    Convert {
        /// The GGUF file.
        gguf: PathBuf,
        /// The model directory to write [default: MODELS/<file stem>]; replaced when complete.
        #[arg(long, short, value_name = "DIR")]
        output: Option<PathBuf>,
    },
    /// Measure time to first token, prefill and decode speed, peak memory, cold start and the
    /// prefix cache (greedy, through the generator component; median of --runs after a warm-up).
    ///
    /// With --json the last line of stdout is one JSON object.
    Bench {
        /// Model name, or a GGUF file [default: smollm2-135m-instruct if present, else the
        /// first model].
        #[arg(long, short)]
        model: Option<String>,
        /// Prompt length in tokens (cut from --prompt-file).
        #[arg(long, default_value_t = 128, value_name = "N")]
        prompt_tokens: usize,
        /// Tokens to generate per run.
        #[arg(long, default_value_t = 64, value_name = "M")]
        gen_tokens: u32,
        /// Timed runs (the median is reported).
        #[arg(long, default_value_t = 3, value_name = "R")]
        runs: usize,
        /// Text the prompt is cut from [default: a built-in English text].
        #[arg(long, value_name = "PATH")]
        prompt_file: Option<PathBuf>,
        /// Print only the JSON report.
        #[arg(long)]
        json: bool,
        /// Measure the in-wasm path: slm-generator-portable.wasm, with wasi:nn compiled to wasm.
        #[arg(long)]
        portable: bool,
    },
    /// Diagnostic (scripts/gpu-check): greedy decoding straight on the engine (no component),
    /// its logits written to a file, timings, and the session contract (rewind, prefix snapshot)
    /// checked on this device. One JSON line on stdout.
    #[command(hide = true)]
    Logits(LogitsArgs),
    /// Serve the OpenAI-compatible HTTP API (dist/slm-http.wasm) with wasi:nn on this host.
    ///
    /// Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
    /// GET /metrics (Prometheus). An instance that answered cleanly answers later requests too
    /// (--instance-reuse); one log line per request on stderr.
    /// Every limit below answers in OpenAI's error shape; README "Security and limits".
    Serve(ServeArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the address is printed on stderr).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR:PORT")]
    pub listen: std::net::SocketAddr,
    /// Serve slm-http-portable.wasm, which carries its own wasi:nn (tract compiled to wasm),
    /// instead of using this host's native one.
    #[arg(long)]
    pub portable: bool,
    /// Require `Authorization: Bearer KEY` on every route but /health (401 otherwise).
    /// Repeatable; see also --api-key-file.
    #[arg(long, env = "SLM_API_KEY", hide_env_values = true, value_name = "KEY")]
    pub api_key: Vec<String>,
    /// Accepted API keys, one per line (blank lines and lines starting with # are skipped).
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// With API keys: serve `GET /metrics` without one (for scrapers that cannot send a key,
    /// such as the Gateway API Inference Extension's endpoint picker); other routes still need it.
    #[arg(long)]
    pub public_metrics: bool,
    /// Largest request body, in KiB (413 above it, refused before it is read).
    #[arg(long, default_value_t = 1024, value_name = "KIB")]
    pub max_body_kib: usize,
    /// Seconds a client has to send a request's headers; also how long an idle keep-alive
    /// connection stays open.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub header_timeout: u64,
    /// Seconds a client has to send a request's body (408 after it).
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub body_timeout: u64,
    /// On SIGTERM or Ctrl-C: stop accepting, let requests in progress finish for at most this
    /// many seconds, then exit (idle connections close at once).
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub drain_timeout: u64,
    /// Open connections at most; one more is answered 503 and closed.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_connections: usize,
    /// Generations running at once per model; more wait in its queue [default: 8, --portable 4].
    /// Natively their steps run together (continuous batching), so more of them raise the
    /// tokens per second in all; with --portable each holds its own engine and model.
    #[arg(long, value_name = "N")]
    pub max_running: Option<usize>,
    /// Generations waiting per model; one more is answered 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_queue: usize,
    /// Seconds a request may take from arrival to its last byte, waiting included (503 if no
    /// answer has started by then; a stream is cut).
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub request_timeout: u64,
    /// Tokens one request may generate: a larger max_tokens is refused (400), a request
    /// without one gets this.
    #[arg(long, default_value_t = 2048, value_name = "N")]
    pub max_tokens_limit: u32,
    /// Linear memory one request's instance may use, in MiB [default: 512, --portable 2048
    /// (it holds the model)].
    #[arg(long, value_name = "MIB")]
    pub max_instance_memory_mib: Option<usize>,
    /// Requests one component instance may answer. An instance that answered cleanly is kept
    /// warm for the next request, with the tokenizers and chat templates it has parsed (with
    /// --portable, the model it has loaded); 1 starts a fresh instance for every request.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub instance_reuse: u32,
    /// Seconds an idle instance is kept for the next request before its memory is freed.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub instance_idle_timeout: u64,
    /// Start taking requests without first running one short completion on the default model
    /// (the warm-up loads the model and leaves a warm instance for the first request).
    #[arg(long)]
    pub no_warmup: bool,
}

#[derive(Args, Clone, Default)]
pub struct GenArgs {
    /// Model name (in the models directory), or a GGUF file (FILE.gguf: converted on first use,
    /// cached by content) [default: smollm2-135m-instruct if present, else the first model].
    #[arg(long, short)]
    pub model: Option<String>,
    /// The most tokens to generate [default: until end of sequence or a full context].
    #[arg(long, short = 'n', value_name = "N")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature; 0 is greedy decoding [default: 0].
    #[arg(long, short, value_name = "T", allow_hyphen_values = true)]
    pub temperature: Option<f32>,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, value_name = "K")]
    pub top_k: Option<u32>,
    /// Nucleus sampling: keep the most likely tokens up to probability P, in (0, 1].
    #[arg(long, value_name = "P", allow_hyphen_values = true)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely one, in [0, 1).
    #[arg(long, value_name = "P", allow_hyphen_values = true)]
    pub min_p: Option<f32>,
    /// Repetition penalty (> 0; 1 is off).
    #[arg(long, value_name = "R", allow_hyphen_values = true)]
    pub repeat_penalty: Option<f32>,
    /// Random seed: same seed, prompt and options give the same output.
    #[arg(long, short, value_name = "S")]
    pub seed: Option<u64>,
    /// Stop before this string (repeatable; the stop string is not printed).
    #[arg(long, value_name = "STR")]
    pub stop: Vec<String>,
    /// System message (chat only).
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Output JSON valid against the JSON Schema in FILE (constrained decoding; the answer ends
    /// when the JSON is complete).
    #[arg(long, value_name = "FILE", value_parser = read_text_file, group = "format")]
    pub json_schema: Option<String>,
    /// Output a JSON object (any keys).
    #[arg(long, group = "format")]
    pub json: bool,
    /// Output text of the Lark grammar in FILE (llguidance's Lark dialect, `start` rule).
    #[arg(long, value_name = "FILE", value_parser = read_text_file, group = "format")]
    pub grammar: Option<String>,
    /// Output text matched whole by this regular expression.
    #[arg(long, value_name = "REGEX", group = "format")]
    pub regex: Option<String>,
    /// Tools the model may call: a JSON array in OpenAI's form (`{"type": "function",
    /// "function": {"name", "description", "parameters"}}`, or the function objects alone).
    /// Calls are printed on stdout as JSON lines: {"id", "name", "arguments"} (chat only).
    #[arg(long, value_name = "FILE", value_parser = read_tools, conflicts_with = "format")]
    pub tools: Option<ToolList>,
    /// Whether the model calls a tool: auto (it chooses), none, required, or a tool's name
    /// [default: auto].
    #[arg(long, value_name = "CHOICE", requires = "tools")]
    pub tool_choice: Option<String>,
}

/// The tools of `--tools`: (name, description, parameters as JSON text).
#[derive(Clone, Debug, Default)]
pub struct ToolList(pub Vec<(String, Option<String>, Option<String>)>);

/// `--tools FILE`: read and checked for shape at parse time (the generator checks the rest).
fn read_tools(path: &str) -> Result<ToolList, String> {
    let text = read_text_file(path)?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{path} is not JSON: {e}"))?;
    let items = value
        .as_array()
        .ok_or_else(|| format!("{path}: expected a JSON array of tools"))?;
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let f = match item.get("function") {
            Some(f) if item.get("type").and_then(|t| t.as_str()) == Some("function") => f,
            Some(_) => return Err(format!("{path}: tool {i}: \"type\" must be \"function\"")),
            None => item,
        };
        let name = f
            .get("name")
            .and_then(|n| n.as_str())
            .ok_or_else(|| format!("{path}: tool {i} has no \"name\""))?;
        let description = f
            .get("description")
            .and_then(|d| d.as_str())
            .map(str::to_string);
        let parameters = f.get("parameters").map(|p| p.to_string());
        out.push((name.to_string(), description, parameters));
    }
    Ok(ToolList(out))
}

/// A flag's FILE argument, read at parse time (so a missing file is a usage error naming it).
fn read_text_file(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))
}

#[derive(Args)]
pub struct LogitsArgs {
    /// Model name [default: smollm2-135m-instruct if present, else the first model].
    #[arg(long, short)]
    pub model: Option<String>,
    /// Prompt token ids: a JSON array (what `slm tokenize` prints).
    #[arg(long)]
    pub ids: String,
    /// Greedy decoding steps after the prefill.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// Feed these tokens (a JSON array, e.g. another device's greedy `tokens`) instead of this
    /// device's own choices, so that every step's logits compare with that run's.
    #[arg(long, value_name = "IDS")]
    pub follow: Option<String>,
    /// Write the prefill's and every step's last-position logits here: f32 little-endian,
    /// (1 + steps) rows of vocab.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Run the GPU plan's graph (plain tract-onnx, f32 weights) on the CPU instead.
    #[arg(long)]
    pub plain: bool,
    /// Run the engine compiled to wasm instead (slm-nn.wasm, as the portable components do;
    /// one thread), through its wasi:nn exports.
    #[arg(long)]
    pub portable: bool,
    /// Timed prefills (time to first token: the median), after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}
