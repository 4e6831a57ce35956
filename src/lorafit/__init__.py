"""lorafit: LoRA fine-tuning for Hugging Face transformers models."""
