"""A PEFT LoRA adapter as a llama.cpp LoRA-adapter GGUF (for a Modelfile ADAPTER line).

Format (llama.cpp src/llama-adapter.cpp): general.type = adapter, general.architecture = the
base's, adapter.type = lora, adapter.lora.alpha; per adapted weight two tensors
`<gguf weight name>.lora_a` (PEFT's A, [r, in]) and `.lora_b` (PEFT's B, [out, r]). llama.cpp
scales by alpha / r with r = the rank of each pair, or by 1 when alpha is 0.

When every module shares one scale and rank, alpha is written as PEFT has it and B as is.
Otherwise (rank_pattern / alpha_pattern) each B is pre-multiplied by its own scale and
alpha is written as 0, so llama.cpp applies exactly PEFT's scales.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ollama_ft.export.errors import AdapterError
from ollama_ft.export.gguf import (
    GeneralMetadata,
    add_base_model,
    arch_spec,
    synced_writer,
)
from ollama_ft.export.merge import Checkpoint, LoraAdapter


def adapter_alpha(adapter: LoraAdapter) -> tuple[float, bool]:
    """(alpha to write, whether B must carry the scale itself)."""
    pairs = {(m.rank, m.scale) for m in adapter.modules.values()}
    if len(pairs) == 1:
        rank, scale = pairs.pop()
        return float(scale * rank), False
    return 0.0, True


def write_adapter_gguf(out_path: Path, adapter: LoraAdapter, checkpoint: Checkpoint,
                       config: dict, general: GeneralMetadata, where: str) -> int:
    import gguf

    if adapter.dora:
        raise AdapterError(f"{adapter.dir}: a DoRA adapter cannot be written as a llama.cpp "
                           "LoRA adapter (llama.cpp has no magnitude vectors); export the merged "
                           "model instead (drop --adapter-only)")
    if adapter.replacements:
        names = ", ".join(sorted(adapter.replacements)[:3])
        raise AdapterError(f"{adapter.dir}: the adapter saves full copies of {names}; a llama.cpp "
                           "adapter can only carry LoRA pairs: export the merged model instead "
                           "(drop --adapter-only)")
    spec = arch_spec(config, where)
    if spec.gguf_arch == "deepseek2":
        from ollama_ft.export.deepseek2 import check_adapter_targets

        check_adapter_targets(adapter.modules, adapter.dir)
    name_map = gguf.get_tensor_name_map(spec.model_arch(), int(config["num_hidden_layers"]))
    alpha, fold = adapter_alpha(adapter)
    with synced_writer(spec.gguf_arch) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(general.name)
        if general.finetune:
            writer.add_finetune(general.finetune)
        add_base_model(writer, general)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for target in sorted(adapter.modules, key=_order):
            m = adapter.modules[target]
            gguf_name = name_map.get_name(target, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise AdapterError(f"{adapter.file.path}: the adapter changes {target}, which has "
                                   f"no place in a {spec.gguf_arch} GGUF")
            if target not in checkpoint or checkpoint.info(target).shape != (
                    adapter.file.tensors[m.b_key].shape[0], adapter.file.tensors[m.a_key].shape[1]):
                raise AdapterError(f"{adapter.file.path}: {target} does not fit the base "
                                   f"{checkpoint.dir}: export it with the base it was trained on")
            a = adapter.a(m)
            b = adapter.b(m)
            if fold:
                b = b * np.float32(m.scale)
            index = spec.row_index(target, b.shape[0], config)  # B's rows are the output rows
            if index is not None:
                b = b[index]
            writer.add_tensor(f"{gguf_name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
            writer.add_tensor(f"{gguf_name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
        writer.write_header_to_file(Path(out_path))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return Path(out_path).stat().st_size


def _order(name: str):
    parts = name.split(".")
    nums = [int(p) for p in parts if p.isdigit()]
    return (nums[0] if nums else -1, name)
