// The playground: fetch a model directory, mount it at /models in the in-memory WASI filesystem of
// jco's browser shim, then run the generator component (dist/slm-generator-portable.wasm,
// transpiled) and stream its chat answer into the page.
//
// Query parameters: model (default smollm2-135m-instruct, under models/ next to this page),
// max_tokens (default 64), q (a message to send on load; the tests use it).
import { _setPreopens } from "@bytecodealliance/preview2-shim/filesystem";

const params = new URLSearchParams(location.search);
const model = params.get("model") ?? "smollm2-135m-instruct";
const maxTokens = Number(params.get("max_tokens") ?? 64);
const $ = (id) => document.getElementById(id);

// What the generator and the in-wasm wasi:nn read (guest/generator/src/model.rs, guest/nn).
const REQUIRED = ["config.json", "tokenizer.json", "model.onnx"];
const OPTIONAL = ["tokenizer_config.json", "generation_config.json", "chat_template.jinja"];

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function fetchModel(name) {
  const files = {};
  for (const file of [...REQUIRED, ...OPTIONAL]) {
    status(`Downloading ${name}/${file}…`);
    const response = await fetch(`models/${name}/${file}`);
    if (response.status === 404 && OPTIONAL.includes(file)) continue;
    if (!response.ok) throw new Error(`models/${name}/${file}: HTTP ${response.status}`);
    files[file] = { source: new Uint8Array(await response.arrayBuffer()) };
  }
  return files;
}

// Let the browser paint between tokens: each `next()` runs the model synchronously.
const yieldToBrowser = () => new Promise((resolve) => setTimeout(resolve, 0));

async function chat(generator, content) {
  const options = {
    model,
    maxTokens,
    stop: [],
    sampling: { temperature: 0, logitBias: [] },
    tools: [],
  };
  const messages = [{ role: "user", content, toolCalls: [] }];
  const completion = generator.chat(messages, options);
  const started = performance.now();
  let first = null;
  let text = "";
  for (;;) {
    const piece = completion.next();
    if (piece === undefined) break;
    first ??= performance.now();
    text += piece;
    $("answer").textContent = text;
    await yieldToBrowser();
  }
  const summary = completion.summary();
  return { text, summary, firstTokenMs: first === null ? null : first - started };
}

async function main() {
  const files = await fetchModel(model);
  _setPreopens({ "/models": { dir: { [model]: { dir: files } } } });
  status("Compiling the generator…");
  const { generator } = await import("./generator/generator.js");
  status(`Ready: ${model}, running in this page.`);

  const send = async (content) => {
    $("send").disabled = true;
    $("answer").textContent = "";
    $("answer").removeAttribute("data-done");
    status("Generating…");
    try {
      const { text, summary, firstTokenMs } = await chat(generator, content);
      const tokens = summary.usage.completionTokens;
      const decodeMs = summary.timings.decodeMs;
      const tps = decodeMs > 0 ? (Math.max(tokens - 1, 0) / (decodeMs / 1000)).toFixed(1) : "-";
      status(`${tokens} tokens (${summary.finishReason}); first token after ` +
        `${Math.round(firstTokenMs ?? 0)} ms; decode ${tps} tokens/s.`);
      $("answer").dataset.done = "1";
      window.playgroundResult = { text, finishReason: summary.finishReason, completionTokens: tokens, firstTokenMs };
    } catch (e) {
      status(`Error: ${e.payload ? JSON.stringify(e.payload) : e}`, true);
      window.playgroundResult = { error: String(e.payload ? JSON.stringify(e.payload) : e) };
    } finally {
      $("send").disabled = false;
    }
  };
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    send($("prompt").value);
  });
  $("send").disabled = false;
  if (params.has("q")) {
    $("prompt").value = params.get("q");
    await send(params.get("q"));
  }
}

main().catch((e) => {
  status(`Error: ${e.message ?? e}`, true);
  window.playgroundResult = { error: String(e.message ?? e) };
});
