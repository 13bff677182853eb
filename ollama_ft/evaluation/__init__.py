"""`ollama-ft eval RUN`: the base and the fine-tune compared through llama.cpp on the
exported GGUF files, on held-out examples (see stage.py)."""

from ollama_ft.evaluation.stage import eval_stage

__all__ = ["eval_stage"]
