"""GGUF (llama architecture) -> Hugging Face / onnx-community model directory.

Modules, one job each:
  spec       model hyperparameters and weights in Hugging Face naming
  gguf_in    read a GGUF file into a spec (dequantized, Q/K un-permuted)
  tiny       a small random-weight spec for fast tests
  tokenizer  tokenizer.json / tokenizer_config.json from GGUF vocabulary
  graph      the ONNX decoder graph, one file per weight layout
  writer     the model directory, written atomically
"""
