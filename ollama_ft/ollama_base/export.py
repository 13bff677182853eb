"""Export a run whose base is an Ollama model: the LoRA as `adapter.gguf` (Ollama keeps the
base's blob and adds only this), and, for daemons that no longer create adapter models or when
asked (`merged`), `model-<quant>.gguf`: the base blob with the LoRA merged in.

The merged file is the base GGUF itself with its metadata and tokenizer copied verbatim and
every tensor the LoRA does not touch copied byte for byte; a touched tensor is dequantized
(gguf-py), gets the LoRA delta in fp32, and is written in its own type if that has 8 bits or
more (F32, F16, BF16, Q8_0), else in Q8_0: quantized back to 4 or 5 bits, the delta is mostly
rounded away (measured in `_requant_type`). One tensor at a time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ollama_ft.errors import ExportError
from ollama_ft.run import Run
from ollama_ft.rundir import temp_path


def export_ollama_run(run, merged: bool = False, log=print):
    """adapter.gguf (and with `merged`, model-<base quant>.gguf) in the run (a Run or its
    folder); returns the export stage's ExportResult."""
    from ollama_ft.export.adapter import write_adapter_gguf
    from ollama_ft.export.gguf import GeneralMetadata
    from ollama_ft.export.merge import Checkpoint, load_adapter
    from ollama_ft.export.stage import ExportResult
    from ollama_ft.ollama_base.resolve import of_run

    t0 = time.perf_counter()
    run = Run.open(run)
    run_dir = run.dir
    ob, fmt = of_run(run)
    base_path = Path(run.train["base_path"])
    if not (base_path / "config.json").is_file():
        raise ExportError(f"{base_path}: the checkpoint {ob.name} was converted to is gone; "
                          f"train again with --base ollama:{ob.name} (it is rebuilt from the blob)")
    import json

    config = json.loads((base_path / "config.json").read_text(encoding="utf-8"))
    adapter = load_adapter(run.path("adapter"))
    ckpt = Checkpoint(base_path)
    files, sizes = {}, {}
    try:
        name = run_dir.name
        general = GeneralMetadata(name=name, basename=ob.name, finetune=name,
                                  size_label=None, license=None, base_model_name=ob.name,
                                  base_model_org=None, base_model_repo_url=None)
        out = run.adapter_gguf
        tmp = temp_path(out)
        try:
            sizes["adapter"] = write_adapter_gguf(tmp, adapter, ckpt, config, general, str(base_path))
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        files["adapter"] = out
        log(f"  wrote {out.name} (LoRA adapter for {ob.name}, {len(adapter.modules)} weights)")
        if merged:
            quant = ob.quant.lower()
            out = run.gguf(quant)
            tmp = temp_path(out)
            try:
                log(f"  writing {out.name} ({ob.name}'s GGUF with the LoRA merged in)")
                notes = write_merged_blob(Path(ob.blob), adapter, config, tmp, log)
                os.replace(tmp, out)
            finally:
                tmp.unlink(missing_ok=True)
            files[quant] = out
            sizes[quant] = out.stat().st_size
            for n in notes:
                log(f"  {n}")
    finally:
        adapter.close()
        ckpt.close()
    result = ExportResult(run_dir, files, sizes, not merged, round(time.perf_counter() - t0, 2),
                          "(the base's own)", False, f"the Ollama model {ob.name}")
    run.record("export", {
        "base_path": str(base_path), "ollama_base": ob.name, "base_blob": ob.blob,
        "base_digest": ob.digest, "adapter": str(run.path("adapter")),
        "adapter_only": not merged, "files": {k: p.name for k, p in files.items()},
        "sizes": sizes, "runtime_s": result.runtime_s, "chat_format": fmt.name})
    return result


def _lora_deltas(adapter, config: dict, spec, name_map) -> dict:
    """GGUF tensor name -> (adapter module, rows order or None)."""
    out = {}
    for target, m in adapter.modules.items():
        gname = name_map.get_name(target, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(f"{adapter.dir}: the adapter changes {target}, which has no place "
                              f"in a {spec.gguf_arch} GGUF")
        out[gname] = (target, m)  # the target is the weight itself: blk.N.attn_q.weight
    return out


def write_merged_blob(blob: Path, adapter, config: dict, out_path: Path, log=print,
                      merged_type: str | None = None) -> list[str]:
    """The base GGUF with the adapter merged into the tensors it changes (see the module
    docstring). Returns notes on types that changed."""
    import gguf
    from tqdm.auto import tqdm

    from ollama_ft.export.gguf import arch_spec

    spec = arch_spec(config, str(blob))
    reader = gguf.GGUFReader(blob)
    name_map = gguf.get_tensor_name_map(spec.model_arch(), int(config["num_hidden_layers"]))
    deltas = _lora_deltas(adapter, config, spec, name_map)
    missing = set(deltas) - {t.name for t in reader.tensors}
    if missing:
        raise ExportError(f"{blob}: the adapter changes {sorted(missing)[0]}, which this GGUF "
                          "does not have: it was trained on another base")
    writer = gguf.GGUFWriter(out_path, spec.gguf_arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    changed: dict[str, str] = {}
    plans = []
    for t in reader.tensors:
        if t.name in deltas:
            qtype = _requant_type(t, merged_type)
            if qtype != t.tensor_type:
                changed[t.tensor_type.name] = qtype.name
            rows, cols = int(t.shape[1]), int(t.shape[0])
            shape = gguf.quant_shape_to_byte_shape((rows, cols), qtype)
            nbytes = int(np.prod(shape))
            writer.add_tensor_info(t.name, (rows, cols), np.dtype(np.float32), nbytes,
                                   raw_dtype=qtype)
            plans.append((t, qtype))
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes,
                                   raw_dtype=t.tensor_type)
            plans.append((t, None))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, qtype in tqdm(plans, desc="merging", unit="tensor", disable=len(plans) < 50):
        if qtype is None:
            writer.write_tensor_data(t.data)
            continue
        target, m = deltas[t.name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=True)
        w = w.reshape(int(t.shape[1]), int(t.shape[0]))
        b = adapter.b(m).astype(np.float32) * np.float32(m.scale)
        index = spec.row_index(target, b.shape[0], config)
        if index is not None:
            b = b[index]
        w += b @ adapter.a(m).astype(np.float32)
        writer.write_tensor_data(gguf.quants.quantize(w, qtype))
    writer.close()
    return [f"{src} tensors the LoRA changes were written as {dst} (a LoRA delta does not "
            f"survive rounding to {src})" for src, dst in changed.items()]


def _requant_type(t, merged_type: str | None = None):
    """The type a tensor the LoRA changed is written in: merged_type when given; else its own
    type when that has 8 bits or more, else Q8_0. A LoRA delta is far smaller than a 4-bit
    quantization step: merged into SmolLM2's Q4_1 tensors and quantized back to Q4_1 it was
    mostly rounded away (KL 0.57 against blob + adapter.gguf, 64% of the top tokens the same),
    in Q8_0 it stays (KL 0.008, 94%; F16 0.006, 96%)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if merged_type:
        qtype = Q[merged_type.upper()]
    elif t.tensor_type in (Q.F32, Q.F16, Q.BF16, Q.Q8_0):
        qtype = t.tensor_type
    else:
        qtype = Q.Q8_0
    try:
        gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), qtype)
        return qtype
    except NotImplementedError:
        pass
    if int(t.shape[0]) % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16
