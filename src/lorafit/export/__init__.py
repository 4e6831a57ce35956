"""Exports for other runtimes: GGUF LoRA adapters and merged GGUF models for llama.cpp (and an Ollama
Modelfile beside them), and merged classifiers as ONNX for ONNX Runtime. `lorafit export` is the command;
each module here is a plain function of a loaded adapter and an output path."""
