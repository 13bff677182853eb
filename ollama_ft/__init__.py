"""ollama-ft: fine-tune DeepSeek bases with LoRA and run them in Ollama."""

__version__ = "0.1.0"
