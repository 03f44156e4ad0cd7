#!/usr/bin/env bash
# Transpile dist/slm-generator.wasm with jco (wasi:nn mapped to fake-nn.js) and run smoke.mjs.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../../../.." && pwd)"
OUT="$ROOT/target/jco-generator"
rm -rf "$OUT" && mkdir -p "$OUT"
ln -s "$ROOT/tests/node/node_modules" "$OUT/node_modules"
echo '{"type":"module"}' > "$OUT/package.json"
cp "$HERE/fake-nn.js" "$HERE/smoke.mjs" "$OUT/"
"$ROOT/tests/node/node_modules/.bin/jco" transpile "$ROOT/dist/slm-generator.wasm" -o "$OUT/gen" --name gen \
  --map 'wasi:nn/*=../fake-nn.js' >/dev/null
cd "$OUT"
GEN_JS="$OUT/gen/gen.js" FAKE_NN_JS="$OUT/fake-nn.js" MODELS_DIR="${MODELS_DIR:-$ROOT/models}" node smoke.mjs
