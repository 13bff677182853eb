"""The memory plan of a training run: its expected peak on the chosen device, before loading.

`ollama-ft train --dry-run` prints it; a run whose plan cannot fit stops before the model is
loaded, saying what to change (batch, max_len, gradient checkpointing, 4-bit).

The plan reads the base's config.json (and, for a local folder, the safetensors headers: the
exact parameter count and the bytes loading maps) and the RunConfig. Each term:

  runtime      Python, torch, transformers, PEFT, the tokenizer, the trainer (measured)
  weights      every parameter at the run's precision; with --load-in-4bit the decoder's
               linear weights in NF4 (4.127 bits with double quantization) and the rest at
               the run's precision (train/qlora.py)
  loading      on the CPU, weights loaded at the checkpoint's own dtype (bf16 on bf16) stay
               pages of its mapped files, resident as they are used (the embedding's rows
               only on lookup); a converted copy (fp32 from bf16) is anonymous memory, and
               while it is made the checkpoint's pages are mapped too: the loading peak
  lora         the adapter's parameters, gradients and AdamW's two moments, fp32: 16 B each
  activations  what autograd keeps per token (batch x max_len tokens): per decoder layer
               c_h * hidden + c_i * intermediate + c_l * max_len bytes + 4 r per adapted
               projection, counted with saved_tensors_hooks on the real modules (c by the
               base's precision, PER_TOKEN_LAYER); with gradient checkpointing only each
               layer's input stays, plus one layer's worth while it is recomputed
  loss         train/loss.py's chunked cross-entropy: one chunk of fp32 logits and the
               gradient of the hidden states, fp32
  allocator    on the CPU, glibc's heaps keep what the first steps freed (about 81 MiB per
               decoder layer; malloc_trim returns it); activations reuse it, so the plan
               counts the larger of the two

The constants were calibrated on this project's CPU measurements (scripts/bench_scale.py,
docs/benchmarks.md: R1-Distill-Qwen-1.5B-shaped runs in fp32 and bf16); the GPU terms (CUDA
context, caching allocator) are estimates until a GPU run measures them
(scripts/gpu_check.sh records the plan beside the measured peak).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ollama_ft.errors import TrainingError

MIB = 2**20
GIB = 2**30

# --- calibration (CPU; scripts/bench_scale.py, docs/benchmarks.md) --------------------------
RUNTIME_CPU = 400 * MIB  # python, torch, transformers, peft, the tokenizer, the trainer
LIBS = 100 * MIB  # mapped shared libraries (file pages of the resident set)
# glibc's heaps keep what the first training steps freed (malloc_trim gives it back): measured
# 2.2 GiB at 1.5B (28 layers) in fp32 and bf16 alike, 0.25-0.3 GiB with four 7B layers: it goes
# with the number of layers, not their size. Activations reuse it.
RETENTION_PER_LAYER = 81 * MIB
ACTIVATION_OVERHEAD = 1.15  # peak / counted activations (allocator, temporaries)
RUNTIME_GPU_HOST = 1500 * MIB  # host RSS of a CUDA run besides the mapped checkpoint (estimate)
CUDA_CONTEXT = 600 * MIB  # CUDA context + cuBLAS workspaces on the device (estimate)
GPU_FRAGMENTATION = 1.10  # caching allocator slack on the device (estimate)
# bytes per token that autograd keeps per decoder layer, counted with saved_tensors_hooks on
# the real modules (PEFT LoRA, train/dropout.py, train/loss.py): per hidden unit, per
# intermediate unit, per position of the row (the mask), by the precision of the frozen base;
# plus 4 * r per adapted projection (the fp32 LoRA A outputs)
PER_TOKEN_LAYER = {"fp32": (54, 17, 4), "16bit": (46, 11, 2)}
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit values, 8-bit absmax per 64, fp32 per 256 absmax
LOSS_CHUNK_ELEMENTS = 1 << 25  # train/loss.py CHUNK_ELEMENTS


class MemoryPlanError(TrainingError):
    """The run cannot fit in the device's memory, or cannot be planned."""


# --- the model's shape ----------------------------------------------------------------------
@dataclass
class ModelShape:
    architecture: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    parameters: int
    linear_parameters: int  # decoder linear weights: what 4-bit quantizes
    checkpoint_bytes: int  # what loading maps (the safetensors files), 0 if unknown
    lora_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # target -> (in, out)
    exact: bool = True  # the parameter count comes from the safetensors headers

    def lora_parameters(self, r: int, targets: list[str] | None) -> int:
        names = targets or list(self.lora_shapes)
        return self.layers * r * sum(sum(self.lora_shapes[t]) for t in names if t in self.lora_shapes)


DENSE = ("qwen2", "llama", "qwen3")


def shape_from_config(config: dict, checkpoint: Path | None = None) -> ModelShape:
    """The shape of a dense DeepSeek base (Qwen2 / Llama / Qwen3 architecture) from its
    config.json; the parameter count from the safetensors headers when the folder has them."""
    from ollama_ft import catalog

    archs = config.get("architectures") or [config.get("model_type", "?")]
    arch = catalog.short_name(archs[0]) or str(archs[0])
    try:
        h, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        inter = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise MemoryPlanError(f"config.json: no usable {e} for a memory plan") from None
    hd = int(config.get("head_dim") or h // heads)
    q_out, kv_out = heads * hd, kv * hd
    shapes = {"q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out),
              "o_proj": (q_out, h), "gate_proj": (h, inter), "up_proj": (h, inter),
              "down_proj": (inter, h)}
    linear = layers * sum(i * o for i, o in shapes.values())
    bias = layers * (q_out + 2 * kv_out) if arch == "qwen2" else 0
    norms = layers * (2 * h + (2 * hd if arch == "qwen3" else 0)) + h
    embed = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    params, exact, nbytes = linear + bias + norms + embed, False, 0
    if checkpoint is not None:
        counted = _safetensors_totals(Path(checkpoint))
        if counted:
            params, nbytes = counted
            exact = True
    if arch not in DENSE:  # MoE / MLA: weights exact from the headers, the rest approximate
        exact = False
    return ModelShape(arch, h, inter, layers, heads, kv, hd, vocab, params,
                      min(linear, params), nbytes, shapes, exact)


def _safetensors_totals(folder: Path) -> tuple[int, int] | None:
    """(parameters, bytes) of a folder's safetensors, from their headers alone."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    params = nbytes = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (OSError, ValueError):
            return None
        header.pop("__metadata__", None)
        params += sum(math.prod(t["shape"]) for t in header.values())
        nbytes += f.stat().st_size
    return params, nbytes


# --- the plan -------------------------------------------------------------------------------
@dataclass
class Settings:
    """What a run chooses that changes its memory."""

    device: str  # cpu | cuda | mps
    precision: str  # fp32 | bf16 | fp16
    batch_size: int
    max_len: int
    gradient_checkpointing: bool
    load_in_4bit: bool
    lora_r: int
    lora_targets: list[str] | None = None

    def replace(self, **kw) -> "Settings":
        import dataclasses

        return dataclasses.replace(self, **kw)



@dataclass
class Plan:
    shape: ModelShape
    settings: Settings
    terms: dict[str, int]  # bytes: runtime, weights, lora, activations, loss
    loading_peak: int  # resident set while loading (CPU: includes mapped checkpoint pages)
    training_peak: int
    peak: int  # what a run's peak memory will read (RSS on the CPU, allocated on the GPU)
    required: int  # what must fit in available memory
    anon: int = 0  # CPU: the anonymous memory of the training peak (the rest is file pages)
    available: int | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.required <= self.available

    def lines(self) -> list[str]:
        s, m = self.settings, self.shape
        dev = {"cpu": "CPU RAM", "cuda": "GPU memory", "mps": "unified memory"}.get(s.device, s.device)
        where = "4-bit NF4 linear weights" if s.load_in_4bit else f"{s.precision} weights"
        lines = [f"memory plan: {m.architecture}, {m.parameters / 1e9:.2f}B parameters, "
                 f"{where}, batch {s.batch_size} x {s.max_len} tokens, gradient checkpointing "
                 f"{'on' if s.gradient_checkpointing else 'off'}, on {s.device}"]
        for key, label in (("runtime", "runtime (python, torch, tokenizer)"),
                           ("weights", "weights"), ("lora", "LoRA + gradients + AdamW state"),
                           ("activations", "activations"), ("loss", "chunked loss")):
            lines.append(f"  {label:<38} {_gib(self.terms[key]):>9}")
        lines.append(f"  {'training peak':<38} {_gib(self.training_peak):>9}")
        if self.loading_peak > self.training_peak:
            lines.append(f"  {'loading peak (incl. mapped checkpoint)':<38} {_gib(self.loading_peak):>9}"
                         "  (file pages the kernel can drop)")
        lines.append(f"  {'expected peak ' + ('RSS' if s.device == 'cpu' else dev):<38} {_gib(self.peak):>9}")
        if self.available is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {'available ' + dev:<38} {_gib(self.available):>9}  -> {verdict} "
                         f"(needs {_gib(self.required).strip()})")
        if not m.exact:
            lines.append("  (approximate: parameters counted from config.json, or an MoE/MLA "
                         "architecture the plan was not calibrated on)")
        return lines


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _sixteen(s: Settings) -> bool:
    """Whether the frozen base computes in 16 bits (bf16/fp16, or 4-bit with a 16-bit compute)."""
    return s.precision in ("bf16", "fp16")


def activation_bytes(shape: ModelShape, s: Settings) -> int:
    """Bytes autograd keeps for one step of batch x max_len tokens (module docstring), before
    the allocator's overhead."""
    tokens = s.batch_size * s.max_len
    act = 2 if _sixteen(s) else 4
    c_h, c_i, c_l = PER_TOKEN_LAYER["16bit" if _sixteen(s) else "fp32"]
    n_lora = len([t for t in (s.lora_targets or shape.lora_shapes) if t in shape.lora_shapes])
    per_layer = (c_h * shape.hidden + c_i * shape.intermediate + c_l * s.max_len
                 + 4 * n_lora * s.lora_r)
    if s.gradient_checkpointing:  # each layer's input, and one layer while it is recomputed
        return tokens * (shape.layers * act * shape.hidden + per_layer)
    return tokens * shape.layers * per_layer


def loss_bytes(shape: ModelShape, s: Settings) -> int:
    """One chunk of fp32 logits (+ its 16-bit original) and the fp32 hidden-state gradient."""
    tokens = s.batch_size * s.max_len
    chunk = min(LOSS_CHUNK_ELEMENTS, tokens * shape.vocab)
    low = 2 if _sixteen(s) else 0
    return int(chunk * (4 + low) + 2 * tokens * shape.hidden * 4)


def weight_bytes(shape: ModelShape, s: Settings) -> int:
    """The frozen base in memory: NF4 decoder linears (+ the rest at the run's precision,
    train/qlora.py), or every parameter at the run's precision."""
    width = 4 if s.precision == "fp32" else 2
    if s.load_in_4bit:
        return int(shape.linear_parameters * NF4_BITS / 8
                   + (shape.parameters - shape.linear_parameters) * width)
    return shape.parameters * width


def mapped_weights(shape: ModelShape, s: Settings) -> bool:
    """Whether the weights stay pages of the checkpoint's files: loaded at the checkpoint's own
    dtype, transformers uses the mapped tensors as they are (no copy)."""
    width = 4 if s.precision == "fp32" else 2
    return (not s.load_in_4bit and s.device == "cpu" and shape.checkpoint_bytes > 0
            and abs(shape.checkpoint_bytes - shape.parameters * width) < 0.02 * shape.checkpoint_bytes)


def plan(shape: ModelShape, s: Settings, available: int | None = None) -> Plan:
    weights = weight_bytes(shape, s)
    lora = 16 * shape.lora_parameters(s.lora_r, s.lora_targets)
    acts, loss = activation_bytes(shape, s), loss_bytes(shape, s)
    if s.device == "cpu":
        runtime = RUNTIME_CPU
        retained = RETENTION_PER_LAYER * shape.layers
        anon = runtime + lora + loss + max(int(acts * ACTIVATION_OVERHEAD), retained)
        if mapped_weights(shape, s):  # resident as file pages; the embedding's rows on demand
            resident = weights - shape.vocab * shape.hidden * (2 if _sixteen(s) else 4)
            training = anon + resident + LIBS
            loading = runtime + resident + LIBS
            required = anon + resident
        else:  # a converted copy; the checkpoint's pages are mapped while it is made
            training = anon + weights + LIBS
            loading = runtime + weights + shape.checkpoint_bytes + LIBS
            required = anon + weights
        peak = max(training, loading)
        anon_peak = required - (resident if mapped_weights(shape, s) else 0)
    else:  # the device: what torch allocates there
        runtime = CUDA_CONTEXT
        training = int(runtime + (weights + lora + acts + loss) * GPU_FRAGMENTATION)
        loading = runtime + weights
        required = peak = max(training, loading)
        anon_peak = 0
    terms = {"runtime": runtime, "weights": weights, "lora": lora, "activations": acts, "loss": loss}
    return Plan(shape, s, terms, loading, training, peak, required, anon_peak, available)


# --- options to suggest ---------------------------------------------------------------------
def alternatives(shape: ModelShape, s: Settings, available: int, four_bit_ok: bool,
                 bf16_ok: bool = False) -> list[Plan]:
    """Changes that fit, smallest change first: bf16 weights where the device computes bf16,
    halve the batch (more grad-accum), checkpointing on, shorter rows, 4-bit weights."""
    tries: list[Settings] = []
    if bf16_ok and s.precision == "fp32" and not s.load_in_4bit:
        tries.append(s.replace(precision="bf16"))
        s = s.replace(precision="bf16")  # and every other change on top of it
    b = s.batch_size
    while b > 1:
        b //= 2
        tries.append(s.replace(batch_size=b))
    if not s.gradient_checkpointing:
        tries.append(s.replace(gradient_checkpointing=True))
        tries.append(s.replace(gradient_checkpointing=True, batch_size=1))
    n = s.max_len
    while n > 256:
        n //= 2
        tries.append(s.replace(max_len=n, batch_size=1, gradient_checkpointing=True))
    if four_bit_ok and not s.load_in_4bit:
        tries.append(s.replace(load_in_4bit=True))
        tries.append(s.replace(load_in_4bit=True, batch_size=1, gradient_checkpointing=True))
    out = []
    for t in tries:
        p = plan(shape, t, available)
        if p.fits and all(p.settings != q.settings for q in out):
            out.append(p)
        if len(out) >= 3:
            break
    return out


def describe_change(old: Settings, new: Settings, grad_accum: int = 1) -> str:
    """The flags that turn `old` into `new`; a smaller batch keeps the examples per optimizer
    step with a larger --grad-accum."""
    out = []
    if new.batch_size != old.batch_size:
        out.append(f"--batch-size {new.batch_size}")
        accum = grad_accum * old.batch_size // new.batch_size
        if accum > 1:
            out.append(f"--grad-accum {accum}")
    if new.max_len != old.max_len:
        out.append(f"--max-len {new.max_len}")
    if new.gradient_checkpointing != old.gradient_checkpointing:
        out.append("--gradient-checkpointing" if new.gradient_checkpointing
                   else "--no-gradient-checkpointing")
    if new.load_in_4bit != old.load_in_4bit:
        out.append("--load-in-4bit")
    if new.precision != old.precision:
        out.append(f"--precision {new.precision}")
    return " ".join(out)


# --- what the CLI calls -----------------------------------------------------------------------
def settings_for(cfg, device: str, precision: str) -> Settings:
    return Settings(device, precision, cfg.batch_size, cfg.max_len, cfg.gradient_checkpointing,
                    cfg.load_in_4bit, cfg.lora_r, cfg.lora_targets)


def available_memory(device: str) -> int | None:
    """Free memory where the run will live: the GPU's free memory, or the host's available."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def base_config(spec: str) -> tuple[dict, Path | None]:
    """config.json of a --base (local folder, alias or Hub id: only config.json is fetched) and
    the local folder, if any."""
    path = Path(spec).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise MemoryPlanError(f"--base {spec}: no config.json in the folder; pass the "
                                  "checkpoint folder (the one with config.json)")
        return json.loads(cfg_file.read_text(encoding="utf-8")), path
    if spec.startswith("ollama:"):
        raise MemoryPlanError(f"--base {spec}: no memory plan for an Ollama base yet (its "
                              "weights are a GGUF); plan with the matching Hugging Face base")
    from ollama_ft import catalog

    entry = catalog.lookup_alias(spec)
    repo = entry.repo_id if entry is not None else spec
    try:
        from huggingface_hub import hf_hub_download

        local = Path(hf_hub_download(repo, "config.json"))
    except Exception as e:
        raise MemoryPlanError(f"--base {spec}: config.json could not be fetched ({type(e).__name__}); "
                              "download the base once or pass a local folder") from None
    folder = local.parent
    return json.loads(local.read_text(encoding="utf-8")), (
        folder if any(folder.glob("*.safetensors")) else None)


def make_plan(cfg, device: str, precision: str, available: int | None = None) -> Plan:
    config, folder = base_config(cfg.base)
    return plan(shape_from_config(config, folder), settings_for(cfg, device, precision), available)


def preflight(cfg, dry_run: bool = False, log=print) -> bool:
    """Before a run: plan its memory. dry_run: print the plan and return True (train nothing).
    Otherwise raise MemoryPlanError when the plan does not fit, and return False (go on)."""
    from ollama_ft.train.trainer import pick_device_and_precision

    device, precision = pick_device_and_precision(cfg)
    try:
        config, folder = base_config(cfg.base)
    except MemoryPlanError as e:
        if dry_run:
            raise
        log(f"memory plan skipped: {e}")
        return False
    shape = shape_from_config(config, folder)
    settings = settings_for(cfg, device, precision)
    p = plan(shape, settings, available_memory(device))
    if dry_run:
        for line in p.lines():
            log(line)
    if p.fits is False:
        four_bit = _bitsandbytes_available()
        alts = alternatives(shape, settings, p.available, four_bit, _bf16_ok(device))
        advice = "; ".join(f"{describe_change(settings, a.settings, cfg.grad_accum)} "
                           f"(~{_gib(a.required).strip()})" for a in alts)
        msg = (f"memory plan: this run needs about {_gib(p.required).strip()} on {device} and "
               f"{_gib(p.available).strip()} are available. "
               + (f"Options that fit: {advice}." if alts else
                  "Nothing smaller fits on this machine: pick a smaller base or a bigger machine.")
               + " (`ollama-ft train ... --dry-run` shows the plan.)")
        if dry_run:
            log(msg)
            return True
        raise MemoryPlanError(msg)
    return dry_run


def _bf16_ok(device: str) -> bool:
    if device == "cpu":
        from ollama_ft.train.precision import cpu_has_bf16

        return cpu_has_bf16()
    return device == "cuda"


def _bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None
