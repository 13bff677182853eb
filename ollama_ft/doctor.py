"""`ollama-ft doctor`: what this machine has for training, export and Ollama, and what to fix."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _version(mod: str, dist: str | None = None) -> str | None:
    try:
        m = importlib.import_module(mod)
    except Exception:
        return None
    v = getattr(m, "__version__", None)
    if v is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version(dist or mod)
        except PackageNotFoundError:
            v = "installed"
    return v


def run_checks(host: str | None = None, bridge: str = "127.0.0.1:11435",
               hub_timeout: float = 3.0) -> list[Check]:
    checks = [Check("python", sys.version_info >= (3, 10), sys.version.split()[0],
                    "use Python 3.10 or newer")]
    torch_v = _version("torch")
    if torch_v is None:
        checks.append(Check("torch", False, "missing", "pip install torch (CUDA: the build for "
                            "your CUDA from download.pytorch.org)"))
    else:
        import torch

        if torch.cuda.is_available():
            dev = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}" + (
                ", bf16" if torch.cuda.is_bf16_supported() else ", fp16")
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            dev = "Apple MPS"
        else:
            dev = f"CPU only ({os.cpu_count()} cores): fine for small models, slow for 7B+"
        checks.append(Check("torch", True, f"{torch_v}, {dev}"))
    for mod, pip in (("transformers", "transformers"), ("peft", "peft"), ("accelerate", "accelerate"),
                     ("gguf", "gguf"), ("llama_cpp", "llama-cpp-python")):
        v = _version(mod, pip)
        checks.append(Check(mod, v is not None, v or "missing", f"pip install {pip}"))
        if mod == "llama_cpp" and v is not None:
            checks.append(_amx_check())
    bnb = _version("bitsandbytes")
    checks.append(Check("bitsandbytes", bnb is not None, bnb or "missing (only for --load-in-4bit)",
                        "pip install 'bitsandbytes>=0.50' (CUDA, or the CPU)", required=False))
    for label, path in (("disk (runs/)", Path.cwd()), ("disk (model store)", _store_root())):
        probe = path if path.exists() else path.parent
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free / 2**30
        checks.append(Check(label, free > 10, f"{free:.0f} GiB free at {probe}",
                            "free space: a 7B model needs about 30 GiB to train and export",
                            required=False))
    checks.append(_http_check("Ollama daemon", host))
    checks.append(_http_check("ollama-ft bridge", bridge, daemon=False))
    checks.append(_hub_check(hub_timeout))
    return checks


def _amx_check() -> Check:
    """llama.cpp's AMX kernels crash on quantized models on some Intel CPUs (llama.cpp#20824):
    whether ollama-ft keeps its models away from them here (ollama_ft/llamacpp.py)."""
    from ollama_ft.llamacpp import amx_in_use, repack

    name = "llama.cpp kernels"
    if not amx_in_use():
        return Check(name, True, "no AMX in use: weights repacked as llama.cpp chooses",
                     required=False)
    if repack():
        return Check(name, False, "AMX CPU with repacking forced on (OLLAMA_FT_LLAMA_REPACK=1): "
                     "quantized models can crash the bridge and eval (llama.cpp#20824)",
                     "unset OLLAMA_FT_LLAMA_REPACK", required=False)
    return Check(name, True, "AMX CPU: the bridge and eval open models without repacking "
                 "(llama.cpp#20824); an Ollama on this CPU may crash on quantized models, see "
                 "README (Troubleshooting)", required=False)


def _store_root() -> Path:
    from ollama_ft.serve.store import default_root

    return default_root()


def _http_check(label: str, host: str | None, daemon: bool = True) -> Check:
    import httpx

    from ollama_ft.ollama.client import ollama_url

    url = ollama_url(host)
    try:
        v = httpx.get(f"{url}/api/version", timeout=2.0).json().get("version")
        return Check(label, True, f"{url} answers (version {v})", required=False)
    except (httpx.HTTPError, ValueError):
        fix = ("start it with `ollama serve` (or set OLLAMA_HOST); without it, `ollama-ft serve` "
               "runs the models") if daemon else "optional: `ollama-ft serve` starts it"
        return Check(label, False, f"nothing answers at {url}", fix, required=False)


def _hub_check(timeout: float) -> Check:
    import httpx

    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return Check("Hugging Face Hub", False, "HF_HUB_OFFLINE is set: only cached models",
                     "unset HF_HUB_OFFLINE to download bases", required=False)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    token = "HF_TOKEN set" if os.environ.get("HF_TOKEN") else "no HF_TOKEN (gated repos need one)"
    try:
        httpx.head(f"{endpoint}/api/models", timeout=timeout)
        return Check("Hugging Face Hub", True, f"{endpoint} reachable, {token}", required=False)
    except httpx.HTTPError as e:
        return Check("Hugging Face Hub", False, f"{endpoint} unreachable ({type(e).__name__})",
                     "use local checkpoint folders or a pre-filled HF cache", required=False)
