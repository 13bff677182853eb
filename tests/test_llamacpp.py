"""ollama_ft.llamacpp: quantized GGUFs are opened so that a prompt of many tokens decodes on
every CPU, AMX ones included (llama.cpp#20824 crashes there with repacked weights)."""

import json
import os
import subprocess
import sys

import pytest

DECODE = r"""
import json, sys
import numpy as np
from ollama_ft.llamacpp import open_gguf, repack
llm = open_gguf(sys.argv[1], n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
ids = llm.tokenize("<｜User｜>What is the capital of Zorbia? Tell me in one line.<｜Assistant｜>".encode(),
                   add_bos=True, special=True)
llm.eval(ids)
print(json.dumps({"tokens": len(ids), "repack": repack(),
                  "argmax": np.asarray(llm.scores[:len(ids)]).argmax(axis=1).tolist()}))
"""


def decode(path, **env):
    """The decode in a child process: a crash in llama.cpp is a return code, not the end of
    the test session."""
    p = subprocess.run([sys.executable, "-c", DECODE, str(path)], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=300)
    return p.returncode, (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0
                          else p.stderr[-2000:])


@pytest.mark.parametrize("quant", ["q4_k_m", "f16"])
def test_a_prompt_of_many_tokens_decodes(trained_run, quant):
    rc, out = decode(trained_run / f"model-{quant}.gguf")
    assert rc == 0, f"llama.cpp died ({rc}): {out}"
    assert out["tokens"] > 10 and len(out["argmax"]) == out["tokens"]


def test_the_same_logits_with_and_without_repacking_where_repacking_is_safe(trained_run):
    from ollama_ft.llamacpp import amx_in_use

    if amx_in_use():
        pytest.skip("this CPU has AMX: repacking is the crash (llama.cpp#20824), never compared")
    path = trained_run / "model-q4_k_m.gguf"
    on, off = decode(path, OLLAMA_FT_LLAMA_REPACK="1"), decode(path, OLLAMA_FT_LLAMA_REPACK="0")
    assert on[0] == off[0] == 0 and on[1]["repack"] and not off[1]["repack"]
    assert on[1]["argmax"] == off[1]["argmax"]


def test_repack_setting(monkeypatch):
    from ollama_ft import llamacpp

    monkeypatch.setattr(llamacpp, "amx_in_use", lambda: True)
    monkeypatch.delenv("OLLAMA_FT_LLAMA_REPACK", raising=False)
    assert llamacpp.repack() is False
    monkeypatch.setenv("OLLAMA_FT_LLAMA_REPACK", "1")
    assert llamacpp.repack() is True
    monkeypatch.setattr(llamacpp, "amx_in_use", lambda: False)
    monkeypatch.setenv("OLLAMA_FT_LLAMA_REPACK", "0")
    assert llamacpp.repack() is False
    monkeypatch.delenv("OLLAMA_FT_LLAMA_REPACK")
    assert llamacpp.repack() is True
