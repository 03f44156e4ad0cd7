// Imported (jco --jco-import) before a transpiled portable component runs: the component reads
// models from /models/<name>/, so map /models to the host directory in SLM_MODELS_DIR.
import { _setPreopens } from "@bytecodealliance/preview2-shim/filesystem";

const dir = process.env.SLM_MODELS_DIR;
if (!dir) {
  throw new Error("SLM_MODELS_DIR is not set (the host directory to mount at /models)");
}
_setPreopens({ "/models": dir });
