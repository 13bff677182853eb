"""The DeepSeek bases we support: alias -> Hugging Face repo, architecture, chat format.

One table, read by `ollama-ft models`, the Hub resolver and the export/Modelfile stages.
"""

from __future__ import annotations

from dataclasses import dataclass

# HF architecture class -> (short name used everywhere here, GGUF architecture). The one table
# of that fact: export/gguf.py keys its per-architecture specs by the short name and takes the
# GGUF architecture from here; train/lora.py keys its LoRA targets by the short name.
ARCHITECTURES = {
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
    "LlamaForCausalLM": ("llama", "llama"),
    "Qwen3ForCausalLM": ("qwen3", "qwen3"),
    "DeepseekV2ForCausalLM": ("deepseek2", "deepseek2"),
    # V3 and R1 themselves: export (a LoRA trained elsewhere, e.g. on many GPUs) and training
    # code paths; no catalogue alias (671B parameters)
    "DeepseekV3ForCausalLM": ("deepseek3", "deepseek2"),
}
# Known but not yet trainable: say so instead of failing deep inside transformers.
PLANNED_ARCHITECTURES: dict[str, str] = {}


@dataclass(frozen=True)
class BaseModel:
    alias: str
    repo_id: str
    architecture: str  # short name: qwen2 | llama | qwen3 | deepseek2
    chat_format: str  # a key of ollama_ft.chat_formats.FORMATS
    params: str  # size label as Ollama shows it
    context_length: int
    supported: bool = True

    @property
    def family(self) -> str:
        return self.alias.split(":")[0]


def _r1(tag, repo, arch, params, ctx=131072):
    return BaseModel(f"deepseek-r1:{tag}", f"deepseek-ai/{repo}", arch, "deepseek-r1", params, ctx)


CATALOG: tuple[BaseModel, ...] = (
    _r1("1.5b", "DeepSeek-R1-Distill-Qwen-1.5B", "qwen2", "1.8B"),
    _r1("7b", "DeepSeek-R1-Distill-Qwen-7B", "qwen2", "7.6B"),
    _r1("14b", "DeepSeek-R1-Distill-Qwen-14B", "qwen2", "14.8B"),
    _r1("32b", "DeepSeek-R1-Distill-Qwen-32B", "qwen2", "32.8B"),
    _r1("8b", "DeepSeek-R1-Distill-Llama-8B", "llama", "8.0B"),
    _r1("70b", "DeepSeek-R1-Distill-Llama-70B", "llama", "70.6B"),
    BaseModel("deepseek-r1:8b-0528-qwen3", "deepseek-ai/DeepSeek-R1-0528-Qwen3-8B", "qwen3",
              "deepseek-r1-0528", "8.2B", 131072),
    BaseModel("deepseek-coder:1.3b", "deepseek-ai/deepseek-coder-1.3b-instruct", "llama",
              "deepseek-coder", "1.3B", 16384),
    BaseModel("deepseek-coder:6.7b", "deepseek-ai/deepseek-coder-6.7b-instruct", "llama",
              "deepseek-coder", "6.7B", 16384),
    BaseModel("deepseek-coder:33b", "deepseek-ai/deepseek-coder-33b-instruct", "llama",
              "deepseek-coder", "33B", 16384),
    BaseModel("deepseek-llm:7b", "deepseek-ai/deepseek-llm-7b-chat", "llama", "deepseek-llm",
              "7B", 4096),
    BaseModel("deepseek-v2:16b", "deepseek-ai/DeepSeek-V2-Lite-Chat", "deepseek2", "deepseek-llm",
              "15.7B", 32768),
    BaseModel("deepseek-coder-v2:16b", "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct", "deepseek2",
              "deepseek-llm", "15.7B", 163840),
)

_BY_ALIAS = {m.alias: m for m in CATALOG}
_BY_REPO = {m.repo_id.lower(): m for m in CATALOG}


def lookup_alias(name: str) -> BaseModel | None:
    """`deepseek-r1:1.5b` -> entry; a bare family name means its smallest size."""
    name = name.strip().lower()
    if name in _BY_ALIAS:
        return _BY_ALIAS[name]
    if ":" not in name or name.endswith(":latest"):
        family = name.split(":")[0]
        for m in CATALOG:
            if m.family == family:
                return m
    return None


def lookup_repo(repo_id: str) -> BaseModel | None:
    return _BY_REPO.get(repo_id.lower())


def supported_architectures() -> str:
    return ", ".join(sorted(f"{k} ({v[0]})" for k, v in ARCHITECTURES.items()))


def short_name(hf_class: str) -> str | None:
    """`LlamaForCausalLM` -> `llama`; None for an architecture we do not support."""
    entry = ARCHITECTURES.get(hf_class)
    return entry[0] if entry else None


def gguf_architecture(short: str) -> str:
    """The GGUF (llama.cpp) architecture of a short name: `qwen2` -> `qwen2`."""
    return {s: g for s, g in ARCHITECTURES.values()}[short]
