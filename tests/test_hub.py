"""Resolving --base: local folders, aliases and repo ids through a local Hugging Face cache."""

import json
import shutil

import huggingface_hub
import pytest

from ollama_ft.errors import BaseModelError
from ollama_ft.hub import resolve_base

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_cache(cache, repo_id, src):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_local_folder(tiny_base):
    base = resolve_base(str(tiny_base("r1-qwen")))
    assert (base.source, base.architecture, base.gguf_architecture) == ("local", "qwen2", "qwen2")
    assert base.chat_format.name == "deepseek-r1"


def test_alias_resolves_through_the_hub_cache(tiny_base, tmp_path, offline):
    snap = make_cache(tmp_path, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", tiny_base("r1-qwen"))
    base = resolve_base("deepseek-r1:1.5b", cache_dir=str(tmp_path))
    assert base.path == snap and base.repo_id == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert base.entry.alias == "deepseek-r1:1.5b" and base.source == "hub"


def test_repo_id_resolves_through_the_hub_cache(tiny_base, tmp_path, offline):
    snap = make_cache(tmp_path, "someone/my-r1-llama", tiny_base("r1-llama"))
    base = resolve_base("someone/my-r1-llama", cache_dir=str(tmp_path))
    assert base.path == snap and base.architecture == "llama"


def test_not_cached_while_offline_is_a_clear_error(tmp_path, offline):
    with pytest.raises(BaseModelError, match="not in the local Hugging Face cache"):
        resolve_base("deepseek-r1:7b", cache_dir=str(tmp_path))


def test_unknown_spec(tmp_path):
    with pytest.raises(BaseModelError, match="not a folder, a known alias, a Hugging Face repo id"):
        resolve_base("deepseek-r9")


def test_v2_lite_alias_is_a_trainable_base_now(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError, match="deepseek-ai/DeepSeek-V2-Lite-Chat: not in the local "
                       "Hugging Face cache"):  # it goes to the Hub, no "not supported yet"
        resolve_base("deepseek-v2:16b", cache_dir=str(tmp_path))


@pytest.fixture
def copy_of(tiny_base, tmp_path):
    def make(family="r1-qwen"):
        dst = tmp_path / "ckpt"
        shutil.copytree(tiny_base(family), dst)
        return dst
    return make


def test_no_config(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(BaseModelError, match="no config.json"):
        resolve_base(str(tmp_path / "x"))


def test_pickle_only_refused_unless_allowed(copy_of):
    d = copy_of()
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(BaseModelError, match="--allow-pickle"):
        resolve_base(str(d))
    assert resolve_base(str(d), allow_pickle=True).architecture == "qwen2"


def test_no_tokenizer(copy_of):
    d = copy_of()
    (d / "tokenizer.json").unlink()
    with pytest.raises(BaseModelError, match="no tokenizer"):
        resolve_base(str(d))


def test_unsupported_architecture_names_the_supported_ones(copy_of):
    d = copy_of()
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BaseModelError, match=r"MistralForCausalLM.*supported: .*Qwen2ForCausalLM"):
        resolve_base(str(d))


def test_unknown_chat_template(copy_of):
    d = copy_of()
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(BaseModelError, match="not one of the DeepSeek formats we know"):
        resolve_base(str(d))
    assert resolve_base(str(d), chat_format="deepseek-llm").chat_format.name == "deepseek-llm"
