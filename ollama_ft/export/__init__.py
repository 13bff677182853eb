"""Export: base checkpoint + LoRA adapter -> GGUF files llama.cpp and Ollama run.

    merge.py     lazy merge of LoRA deltas (memory-mapped, block by block); merged safetensors
    gguf.py      per-architecture tables (hyperparameters, tensor names, transforms) + writer
    vocab.py     tokenizer metadata, pre-tokenizer identification, chat template, BOS policy
    quantize.py  GGUF types; llama.cpp's quantizer for K-quants and friends
    adapter.py   LoRA -> llama.cpp adapter GGUF
    stage.py     export_stage / merge_stage: the stage functions the CLI and service call

Nothing heavy is imported here: `from ollama_ft.export import export_stage` is cheap.
"""

from __future__ import annotations


def export_stage(run, quants=None, adapter_only=False, log=print, base=None, threads=None):
    from ollama_ft.export.stage import export_stage as _export

    return _export(run, quants=quants, adapter_only=adapter_only, log=log, base=base,
                   threads=threads)


def export_base_gguf(run, quant, log=print, threads=None):
    from ollama_ft.export.stage import export_base_gguf as _base

    return _base(run, quant, log=log, threads=threads)


def merge_stage(run_dir, out_dir=None, log=print, base=None):
    from ollama_ft.export.stage import merge_stage as _merge

    return _merge(run_dir, out_dir=out_dir, log=log, base=base)


__all__ = ["export_base_gguf", "export_stage", "merge_stage"]
