"""Opening a GGUF with llama.cpp (llama-cpp-python) in this process: the one place that does.

llama.cpp's AMX kernels (Intel Sapphire Rapids and later, `AMX_INT8 = 1` in its system info)
crash with a segmentation fault in `ggml_backend_amx_mul_mat` on the first batch of a prompt
for quantized weights (Q4_K_M, Q8_0, ...) on some of these machines: ggml-org/llama.cpp#20824,
open and unfixed; seen on this project's CI machines with llama-cpp-python 0.3.36. The weights
reach the AMX kernels only through llama.cpp's "extra buffer types" (weight repacking), so on a
CPU where llama.cpp would use AMX, models are opened without them (`use_extra_bufts = false`,
what llama-server's `--no-repack` sets): the plain CPU kernels, the same answers.
`OLLAMA_FT_LLAMA_REPACK=1` keeps repacking on, `=0` turns it off on any CPU."""

from __future__ import annotations

import os
import threading
from functools import lru_cache

_lock = threading.Lock()


@lru_cache(maxsize=1)
def amx_in_use() -> bool:
    """Whether this process's llama.cpp was built with AMX and the CPU has it."""
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def repack() -> bool:
    """Whether models are opened with llama.cpp's extra buffer types (see the module text)."""
    setting = os.environ.get("OLLAMA_FT_LLAMA_REPACK", "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    return not amx_in_use()


def open_gguf(path, **kwargs):
    """llama_cpp.Llama(model_path=path, **kwargs), without extra buffer types where
    `repack()` says so."""
    import llama_cpp
    from llama_cpp import llama_cpp as capi

    if kwargs.get("vocab_only") or repack():
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    # Llama() reads its model parameters from llama_model_default_params() and offers no
    # argument for use_extra_bufts: the defaults are changed for this one construction
    with _lock:
        default = capi.llama_model_default_params

        def without_repack():
            params = default()
            params.use_extra_bufts = False
            return params

        capi.llama_model_default_params = without_repack
        try:
            return llama_cpp.Llama(model_path=str(path), **kwargs)
        finally:
            capi.llama_model_default_params = default
