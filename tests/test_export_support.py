"""Helpers shared by the export tests (no tests here): run directories, references, llama.cpp.

A "run" is what the train stage leaves behind (run.yaml, report.json's train section,
adapter/); `make_run` writes one by hand around a PEFT adapter whose lora_B is random and
non-zero, which is much faster than training and exercises every merged weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Every text class the issue names: English, Chinese, code with tabs and runs of spaces,
# digits, emoji; plus other scripts, quotes/contractions and whitespace runs. All NFC.
TEXTS = [
    "Hello world! This is a test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog. I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "我想在苹果公司工作，你呢？这是一个中文句子。深度求索",
    "日本語のテキストとカタカナ、한국어 문장도 있습니다. Ελληνικά, русский, עברית, العربية",
    "def f(x):\n\treturn x  +   1\n\n\n    # four spaces\n\t\tif x:\n        pass\n",
    "   leading and trailing spaces   ",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "3 33 333 3333 33333 333333 3333333 1234567890 3.14159 1,000,000 0x1F 2024-01-31",
    "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ 🦙🦙 👍🏽 👨‍👩‍👧‍👦",
    "informações São João ñandú Ærø µ ſ ﬁ K Ω",
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!??????",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // C++\r\nx = {'k': [1, 2]}",
]


def make_run(base: Path, run_dir: Path, chat_format: str, *, r: int = 8, alpha: int = 16,
             seed: int = 1, b_std: float = 0.05, targets=TARGETS, name: str = "test-run",
             **lora_kwargs) -> Path:
    """A run directory around a PEFT LoRA adapter with random, non-zero lora_B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ollama_ft.train.lora import exact_targets

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with exact_targets(_arch(base)):
        peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets if isinstance(targets, str) else list(targets),
                                            lora_dropout=0.0, **lora_kwargs))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:
                p.add_(torch.randn_like(p) * b_std)
    run_dir.mkdir(parents=True, exist_ok=True)
    peft.save_pretrained(run_dir / "adapter")
    arch = json.loads((Path(base) / "config.json").read_text())["model_type"]
    (run_dir / "run.yaml").write_text(f"name: {name}\nbase: {base}\nquant: q4_k_m\n")
    (run_dir / "report.json").write_text(json.dumps({"train": {
        "base": str(base), "base_path": str(base), "repo_id": None, "architecture": arch,
        "chat_format": chat_format}}))
    return run_dir


def torch_logits(base: Path, adapter: Path | None, ids: list[int]) -> np.ndarray:
    """fp32 PyTorch logits of the base (+ PEFT adapter), [len(ids), vocab]."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        from ollama_ft.train.lora import exact_targets

        with exact_targets(_arch(base)):
            model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy().astype(np.float64)


def _arch(base) -> str:
    from ollama_ft import catalog

    config = json.loads((Path(base) / "config.json").read_text())
    return catalog.short_name(config["architectures"][0]) or ""


def llama(path: Path, lora: Path | None = None, vocab_only: bool = False, n_ctx: int = 512):
    from ollama_ft.llamacpp import open_gguf

    return open_gguf(path, n_ctx=n_ctx, logits_all=not vocab_only,
                           vocab_only=vocab_only, verbose=False, n_threads=2, seed=0,
                           lora_path=str(lora) if lora else None)


def gguf_logits(path: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    llm = llama(path, lora)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_divergence(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL(ref || got) per position, in nats."""
    lp, lq = log_softmax(ref), log_softmax(got)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def top2_margin(logits: np.ndarray) -> np.ndarray:
    part = np.sort(logits, axis=-1)[:, -2:]
    return part[:, 1] - part[:, 0]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}


def read_gguf(path: Path) -> dict:
    """{key: value} of a GGUF's metadata, plus '__tensors__': {name: (type name, ne shape)}.

    A small reader of its own (gguf-py's GGUFReader takes seconds on a 150k-token vocab),
    which also cross-checks the files gguf-py's writer produced.
    """
    import struct

    import gguf

    data = Path(path).read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("<Q")
        pos += n
        return data[pos - n:pos].decode("utf-8")

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            sub, n = take("<I"), take("<Q")
            return [value(sub) for _ in range(n)]
        return take(_SCALARS[t])

    assert data[:4] == b"GGUF", path
    pos = 4
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    assert version == 3
    out = {}
    for _ in range(n_kv):
        key = string()
        out[key] = value(take("<I"))
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        dims = tuple(take("<Q") for _ in range(take("<I")))
        tensors[name] = (gguf.GGMLQuantizationType(take("<I")).name, dims)
        take("<Q")
    out["__tensors__"] = tensors
    return out
