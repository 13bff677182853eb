"""Resolve `--base`: a local checkpoint folder, a Hugging Face repo id, or a catalogue alias.

Hub downloads go through huggingface_hub into its normal cache and fetch only what
training and export need (safetensors, config, tokenizer). HF_TOKEN and HF_HUB_OFFLINE
are honoured by huggingface_hub itself.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ollama_ft import catalog
from ollama_ft.chat_formats import FORMATS, ChatFormat, checkpoint_chat_format
from ollama_ft.errors import BaseModelError

WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json"]
META_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                 "tokenizer_config.json", "special_tokens_map.json", "LICENSE*", "README.md"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
HUB_TIMEOUT = float(os.environ.get("OLLAMA_FT_HUB_TIMEOUT", "30"))  # seconds, per Hub API call
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ResolvedBase:
    spec: str  # what the user typed
    path: Path
    source: str  # local | hub
    repo_id: str | None
    hf_architecture: str
    architecture: str  # qwen2 | llama | qwen3
    gguf_architecture: str
    chat_format: ChatFormat
    chat_format_reason: str
    entry: catalog.BaseModel | None = None
    config: dict | None = None
    ollama: object = None  # ollama.daemon.OllamaBase for `--base ollama:NAME`

    def describe(self) -> str:
        where = self.repo_id or str(self.path)
        return (f"{where} ({self.hf_architecture}, chat format {self.chat_format.name}: "
                f"{self.chat_format_reason})")


def resolve_base(spec: str, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                 chat_format: str | None = None, revision: str | None = None,
                 cache_dir: str | None = None, token: str | None = None,
                 host: str | None = None, log=print) -> ResolvedBase:
    from ollama_ft.ollama.daemon import is_ollama_spec

    if is_ollama_spec(spec):  # a model of an Ollama daemon (OLLAMA_HOST, or host)
        if chat_format:
            raise BaseModelError(f"--base {spec}: an Ollama base trains on the TEMPLATE the "
                                 "daemon serves it with; --chat-format does not apply")
        return _ollama_base(spec, host, log=log)
    path = Path(spec).expanduser()
    entry = None
    if path.exists():
        if not path.is_dir():
            raise BaseModelError(f"--base {spec}: is a file; pass the checkpoint folder "
                                 "(the one with config.json)")
        source, repo_id = "local", None
    else:
        entry = catalog.lookup_alias(spec)
        if entry is not None:
            repo_id = entry.repo_id
        elif REPO_ID.match(spec):
            repo_id = spec
            entry = catalog.lookup_repo(spec)
        elif _daemon_has(spec, host):  # a name from your Ollama's list, without the prefix
            log(f"--base {spec}: not a folder, alias or Hugging Face repo, but a model of your "
                f"Ollama: using ollama:{spec}")
            return _ollama_base("ollama:" + spec, host, log=log)
        else:
            raise BaseModelError(f"--base {spec!r}: not a folder, a known alias, a Hugging Face "
                                 "repo id (org/name) or a model of your Ollama (ollama:NAME); "
                                 "`ollama-ft models` lists them")
        if entry is not None and not entry.supported:
            raise _unsupported(entry.repo_id, entry.architecture)
        path = download(repo_id, allow_pickle=allow_pickle, revision=revision,
                        cache_dir=cache_dir, token=token)
        source = "hub"
    return inspect_checkpoint(spec, path, source, repo_id, entry, allow_pickle=allow_pickle,
                              trust_remote_code=trust_remote_code, chat_format=chat_format)


def _ollama_base(spec: str, host: str | None = None, log=print) -> ResolvedBase:
    """`--base ollama:NAME`: the daemon's model, its GGUF dequantized into a cached checkpoint
    (by blob digest), and its own TEMPLATE as the chat format."""
    from ollama_ft.ollama.daemon import read_base
    from ollama_ft.ollama_base.checkpoint import cached_checkpoint
    from ollama_ft.ollama_base.resolve import chat_format_of

    ob = read_base(spec, host)
    log(f"base: {ob.name} from Ollama {ob.version} at {ob.host} ({ob.architecture}, {ob.quant}, "
        f"{ob.digest[:19]})")
    path = Path(cached_checkpoint(ob.blob, ob.digest, log=log))
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    hf_arch = (config.get("architectures") or ["?"])[0]
    if hf_arch not in catalog.ARCHITECTURES:
        raise BaseModelError(f"--base {spec}: architecture {hf_arch} is not supported")
    short, gguf_arch = catalog.ARCHITECTURES[hf_arch]
    return ResolvedBase(spec, path, "ollama", None, hf_arch, short, gguf_arch, chat_format_of(ob),
                        f"the TEMPLATE Ollama serves {ob.name} with", None, config, ob)


def _daemon_has(spec: str, host: str | None) -> bool:
    """Whether the Ollama daemon (OLLAMA_HOST / host) answers and has a model named spec."""
    from ollama_ft.ollama.daemon import model_name, show

    try:
        show(model_name(spec), host)
        return True
    except BaseModelError:
        return False


def _unsupported(where: str, arch: str) -> BaseModelError:
    return BaseModelError(f"{where}: architecture {arch} is not supported yet; supported: "
                          f"{catalog.supported_architectures()}")


def download(repo_id: str, *, allow_pickle: bool = False, revision: str | None = None,
             cache_dir: str | None = None, token: str | None = None) -> Path:
    """Fetch config, tokenizer and safetensors of a Hub repo into the HF cache."""
    import huggingface_hub
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hf_errors

    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    patterns = META_PATTERNS + WEIGHT_PATTERNS
    try:
        if not offline:
            info = HfApi(token=token).model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT)
            files = [s.rfilename for s in (info.siblings or [])]
            has_st = any(f.endswith(".safetensors") for f in files)
            has_bin = any(f.endswith(".bin") and "training_args" not in f for f in files)
            if not has_st and has_bin and not allow_pickle:
                raise _pickle_only(repo_id)
            if not has_st and not has_bin:
                raise BaseModelError(f"{repo_id}: the repo has no model weights (no .safetensors "
                                     "or .bin files)")
            if not any(f in files for f in TOKENIZER_FILES):
                raise BaseModelError(f"{repo_id}: the repo has no tokenizer (tokenizer.json or "
                                     "tokenizer.model); use a repo that ships one")
            if not has_st:
                patterns = META_PATTERNS + PICKLE_PATTERNS
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                  cache_dir=cache_dir, token=token)
    except hf_errors.GatedRepoError:
        raise BaseModelError(f"{repo_id}: gated repo; accept its licence on huggingface.co and "
                             "set HF_TOKEN (or run `hf auth login`)") from None
    except hf_errors.RepositoryNotFoundError:
        raise BaseModelError(f"{repo_id}: no such repo on the Hugging Face Hub (or it is private: "
                             "set HF_TOKEN); check the spelling or `ollama-ft models`") from None
    except hf_errors.RevisionNotFoundError:
        raise BaseModelError(f"{repo_id}: revision {revision!r} not found") from None
    except hf_errors.LocalEntryNotFoundError:
        raise BaseModelError(f"{repo_id}: not in the local Hugging Face cache and the Hub cannot "
                             "be reached (HF_HUB_OFFLINE set or no network); download it once "
                             "online or pass a local folder") from None
    except hf_errors.HfHubHTTPError as e:
        raise BaseModelError(f"{repo_id}: the Hub answered an error: {e}") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise BaseModelError(f"{repo_id}: the disk filled up while downloading into the "
                                 "Hugging Face cache; free space (or set HF_HOME to a bigger "
                                 "disk) and run again: what was downloaded is kept") from None
        raise _unreachable(repo_id, e) from None
    except Exception as e:
        if type(e).__module__.split(".")[0] in TRANSPORT_MODULES:
            raise _unreachable(repo_id, e) from None
        raise
    return Path(local)


# the HTTP stacks huggingface_hub may use; their errors mean the Hub could not be reached
TRANSPORT_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3", "h11", "ssl")


def _unreachable(repo_id: str, e: Exception) -> BaseModelError:
    import huggingface_hub

    return BaseModelError(
        f"{repo_id}: the Hugging Face Hub could not be reached at "
        f"{huggingface_hub.constants.ENDPOINT} ({type(e).__name__}: {str(e)[:120]}); check the "
        "network or proxy, or set HF_HUB_OFFLINE=1 to use the local cache, or pass a local "
        "checkpoint folder")


def _pickle_only(where) -> BaseModelError:
    return BaseModelError(f"{where}: only pickle (.bin) weights, no safetensors; pickle files can "
                          "run code when loaded. Pass --allow-pickle if you trust this checkpoint")


def inspect_checkpoint(spec: str, path: Path, source: str, repo_id: str | None,
                       entry: catalog.BaseModel | None, *, allow_pickle: bool = False,
                       trust_remote_code: bool = False, chat_format: str | None = None
                       ) -> ResolvedBase:
    where = repo_id or str(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise BaseModelError(f"{where}: no config.json; a base must be a Hugging Face checkpoint "
                             "folder (config.json, tokenizer, *.safetensors)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BaseModelError(f"{cfg_path}:{e.lineno}: invalid JSON ({e.msg})") from None
    archs = config.get("architectures") or []
    hf_arch = archs[0] if archs else config.get("model_type", "?")
    if hf_arch not in catalog.ARCHITECTURES:
        if hf_arch in catalog.PLANNED_ARCHITECTURES:
            raise _unsupported(where, hf_arch)
        hint = "" if trust_remote_code else " (custom code needs --trust-remote-code, and still an architecture we support)"
        raise _unsupported(where, f"{hf_arch}{hint}")
    short, gguf_arch = catalog.ARCHITECTURES[hf_arch]
    has_st = any(path.glob("*.safetensors"))
    if not has_st:
        if any(path.glob("*.bin")):
            if not allow_pickle:
                raise _pickle_only(where)
        else:
            raise BaseModelError(f"{where}: no model weights (*.safetensors) in {path}")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise BaseModelError(f"{where}: no tokenizer (tokenizer.json or tokenizer.model) in {path}")
    entry = entry or (catalog.lookup_repo(repo_id) if repo_id else None)
    fmt, reason = _chat_format(path, entry, chat_format, where)
    return ResolvedBase(spec, path, source, repo_id, hf_arch, short, gguf_arch, fmt, reason,
                        entry, config)


def _chat_format(path: Path, entry, forced: str | None, where: str) -> tuple[ChatFormat, str]:
    if forced:
        if forced not in FORMATS:
            raise BaseModelError(f"--chat-format {forced!r} is unknown; known: {', '.join(FORMATS)}")
        return FORMATS[forced], "chosen with --chat-format"
    return checkpoint_chat_format(path, entry, where)


