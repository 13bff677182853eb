"""The llama.cpp engine behind the bridge: load GGUF models on first use, keep them for
keep_alive, unload least-recently-used ones under a memory budget, serialise requests to
one model while different models run side by side, and generate with Ollama's options.

Requests waiting for a busy model wait on an asyncio future (no thread each), at most
OLLAMA_MAX_QUEUE of them (Ollama's default 512); beyond that they get Ollama's 503. A load
that would pass the memory budget (OLLAMA_FT_MEMORY_BUDGET, default 80% of the memory
available at start) first unloads idle models, least recently used first; when the rest are
busy it waits (counted in the same queue) until one is given back. `num_ctx` is clamped to
the model's trained context and to what the budget holds beside the weights, as Ollama
clamps it to the trained context; a model whose weights alone pass the budget is refused."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ollama_ft.errors import OllamaError
from ollama_ft.ollama.modelfile import (
    BOOL_PARAMETERS,
    DEPRECATED_PARAMETERS,
    FLOAT_PARAMETERS,
    INT_PARAMETERS,
    LIST_PARAMETERS,
    PARAMETERS,
)

# Ollama's defaults, overridden by the model's PARAMETERs, then by the request's options
DEFAULT_OPTIONS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0,
                   "typical_p": 1.0, "repeat_penalty": 1.0, "repeat_last_n": 64,
                   "presence_penalty": 0.0, "frequency_penalty": 0.0, "num_predict": -1,
                   "num_ctx": int(os.environ.get("OLLAMA_CONTEXT_LENGTH", "4096")), "seed": -1,
                   "num_batch": 512, "num_thread": 0, "stop": []}
# the option names and types are the Modelfile PARAMETER table's (one table for both)
INT_OPTIONS, FLOAT_OPTIONS = INT_PARAMETERS, FLOAT_PARAMETERS
BOOL_OPTIONS, LIST_OPTIONS = BOOL_PARAMETERS, LIST_PARAMETERS
VALID_OPTIONS = PARAMETERS | DEPRECATED_PARAMETERS  # deprecated: accepted, ignored


class BadOption(OllamaError):
    pass


KV_BYTES_PER_TOKEN = 64 * 1024  # the rough KV-cache allowance per token of context
MIN_CTX = 64


class ModelTooLarge(OllamaError):
    """Ollama's "model requires more system memory" (a 500)."""


class ServerBusy(OllamaError):
    """Ollama's ErrMaxQueue text; the API answers it with 503."""

    def __init__(self):
        super().__init__("server busy, please try again.  maximum pending requests exceeded")


class Slot:
    """One holder at a time, first come first served. Waiters are asyncio futures, so a
    queued request holds no thread; release() may be called from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held = False
        self._waiters: deque = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._held:
                self._held = True
                return
            fut = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            await fut
        except asyncio.CancelledError:
            with self._lock:
                try:
                    self._waiters.remove((loop, fut))
                    owned = False
                except ValueError:  # already handed to us: pass it on
                    owned = not fut.cancelled()
            if owned:
                self.release()
            raise

    def release(self) -> None:
        with self._lock:
            if not self._waiters:
                self._held = False
                return
            loop, fut = self._waiters.popleft()  # ownership moves to it, _held stays True
        loop.call_soon_threadsafe(self._hand_over, fut)

    def _hand_over(self, fut) -> None:
        if fut.cancelled():  # it gave up before it could take the slot
            self.release()
        else:
            fut.set_result(None)


def check_options(options: dict | None, where: str = "options") -> dict:
    """Type-check request options / Modelfile parameters the way Ollama does."""
    out = {}
    for k, v in (options or {}).items():
        if k not in VALID_OPTIONS:
            raise BadOption(f"invalid option provided: {k}" if where == "options"
                            else f"unknown parameter '{k}'")
        if k in DEPRECATED_PARAMETERS:  # as Ollama: accepted with a warning, then ignored
            continue
        try:
            if k in INT_OPTIONS:
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise TypeError
                out[k] = int(v)
            elif k in FLOAT_OPTIONS:
                if isinstance(v, bool):
                    raise TypeError
                out[k] = float(v)
            elif k in BOOL_OPTIONS:
                if not isinstance(v, bool):
                    raise TypeError
                out[k] = v
            else:
                out[k] = [v] if isinstance(v, str) else [str(x) for x in v]
        except (TypeError, ValueError):
            raise BadOption(f"option \"{k}\" must be of type "
                            f"{'integer' if k in INT_OPTIONS else 'number' if k in FLOAT_OPTIONS else 'boolean' if k in BOOL_OPTIONS else 'array'}") from None
    return out


def parse_keep_alive(value, default: float = 300.0) -> float:
    """Seconds: numbers are seconds, strings are Go durations ("5m", "1h30m", "-1")."""
    if value is None or value == "":
        env = os.environ.get("OLLAMA_KEEP_ALIVE")
        return parse_keep_alive(env) if env else default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float("inf") if value < 0 else float(value)
    import re

    s = str(value).strip()
    if re.fullmatch(r"-?\d+(\.\d+)?", s):
        v = float(s)
        return float("inf") if v < 0 else v
    total, pos = 0.0, 0
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    neg = s.startswith("-")
    s = s.lstrip("+-")
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)", s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise BadOption(f"invalid duration \"{value}\" for keep_alive")
    return float("inf") if neg else total


@dataclass
class Loaded:
    key: tuple
    name: str
    digest: str
    model_path: Path
    adapter_path: Path | None
    n_ctx: int
    llm: object
    size: int
    n_gpu_layers: int = 0
    slot: Slot = field(default_factory=Slot)
    expires_at: float = 0.0
    last_used: float = 0.0
    busy: int = 0
    load_duration: float = 0.0
    size_vram: int = 0  # the part of `size` offloaded to the GPU (0 on a CPU-only build)


def gpu_offload() -> bool:
    """Whether this llama-cpp-python was built with a GPU backend (CUDA, Metal, ...)."""
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # pragma: no cover - an old or broken build
        return False


def offloaded_bytes(size: int, n_layers: int, n_gpu_layers: int) -> int:
    """What llama.cpp puts on the GPU for -ngl N: N of the n_layers blocks plus the output
    layer (llama.cpp counts n_layers + 1); -1 is all of them, as Ollama's num_gpu default."""
    total = n_layers + 1
    on_gpu = total if n_gpu_layers < 0 else min(n_gpu_layers, total)
    return size * on_gpu // total if total > 0 else 0


class Engine:
    def __init__(self, memory_budget: int | None = None, threads: int | None = None,
                 max_queue: int | None = None):
        import psutil

        from ollama_ft.serve.limits import parse_size

        env_budget = os.environ.get("OLLAMA_FT_MEMORY_BUDGET", "").strip()
        self.budget = memory_budget or (parse_size(env_budget, "OLLAMA_FT_MEMORY_BUDGET")
                                        if env_budget else
                                        int(psutil.virtual_memory().available * 0.8))
        self.max_queue = max_queue if max_queue is not None else int(
            os.environ.get("OLLAMA_MAX_QUEUE") or 512)
        self.threads = threads or os.cpu_count() or 1
        self.models: dict[tuple, Loaded] = {}
        self._room_waiters: list = []  # (loop, future) of loads waiting for memory
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, daemon=True, name="ollama-ft-reaper")
        self._reaper.start()

    # --- lifecycle -------------------------------------------------------------------------
    def close(self):
        self._stop.set()
        with self._lock:
            for k in list(self.models):
                self._unload(k)

    def _reap(self):
        while not self._stop.wait(1.0):
            now = time.time()
            with self._lock:
                for k, m in list(self.models.items()):
                    if m.busy == 0 and m.expires_at <= now:
                        self._unload(k)

    def _unload(self, key):
        m = self.models.pop(key, None)
        if m is not None:
            try:
                if m.llm is not None:
                    m.llm.close()
            except Exception:  # pragma: no cover - best effort
                pass
            if self._room_waiters:
                self._wake_room_waiters()

    def unload_name(self, name: str):
        with self._lock:
            for k, m in list(self.models.items()):
                if m.name == name and m.busy == 0:
                    self._unload(k)

    @staticmethod
    def weights(model_path: Path, adapter_path: Path | None) -> int:
        return model_path.stat().st_size + (adapter_path.stat().st_size if adapter_path else 0)

    @classmethod
    def estimate(cls, model_path: Path, adapter_path: Path | None, n_ctx: int) -> int:
        return cls.weights(model_path, adapter_path) + n_ctx * KV_BYTES_PER_TOKEN

    def fit_ctx(self, model_path: Path, adapter_path: Path | None, n_ctx: int,
                trained: int | None = None) -> int:
        """num_ctx clamped to the model's trained context and to what the memory budget
        holds beside the weights (at least MIN_CTX); ModelTooLarge when even that is more."""
        n = max(int(n_ctx), MIN_CTX)
        if trained and trained > 0:
            n = min(n, max(int(trained), MIN_CTX))
        room = (self.budget - self.weights(model_path, adapter_path)) // KV_BYTES_PER_TOKEN
        if room < MIN_CTX:
            need = self.estimate(model_path, adapter_path, MIN_CTX)
            raise ModelTooLarge(f"model requires more system memory ({_gib(need)}) than the "
                                f"bridge's budget ({_gib(self.budget)}); raise "
                                "OLLAMA_FT_MEMORY_BUDGET or use a smaller quantization")
        return min(n, room)

    def queued(self) -> int:
        """Requests waiting: for a busy model, or for memory to load one, over all models."""
        with self._lock:
            return sum(m.slot.waiting for m in self.models.values()) + len(self._room_waiters)

    async def acquire(self, name: str, digest: str, model_path: Path, adapter_path: Path | None,
                      n_ctx: int, keep_alive: float, num_gpu: int = -1) -> "Lease":
        """Wait (without a thread) until the model is free for this request, and, to load
        it, until the memory budget holds it; ServerBusy when max_queue requests are already
        waiting. The lease is entered in the worker thread that loads the model and
        generates. `n_ctx` is taken as given (fit_ctx clamps it)."""
        n_gpu = num_gpu if gpu_offload() else 0  # num_gpu means nothing without a GPU backend
        key = (digest, str(adapter_path), n_ctx, n_gpu)
        loop = asyncio.get_running_loop()
        while True:
            room = None
            with self._lock:
                m = self.models.get(key)
                if m is None:
                    need = self.estimate(model_path, adapter_path, n_ctx)
                    if self._make_room(need, (digest, str(adapter_path))):
                        m = Loaded(key, name, digest, model_path, adapter_path, n_ctx, None, need,
                                   n_gpu)
                        self.models[key] = m
                    elif self.queued() >= self.max_queue:
                        raise ServerBusy()
                    else:  # every loaded model is busy: wait for one to be given back
                        room = loop.create_future()
                        self._room_waiters.append((loop, room))
                elif m.busy and self.queued() >= self.max_queue:  # (the lock is reentrant)
                    raise ServerBusy()
                if m is not None:
                    m.busy += 1
                    m.expires_at = float("inf")
            if m is not None:
                break
            try:
                await room
            finally:
                with self._lock:
                    if (loop, room) in self._room_waiters:
                        self._room_waiters.remove((loop, room))
        lease = Lease(self, m, keep_alive)
        try:
            await m.slot.acquire()
        except BaseException:
            lease._release_busy()
            raise
        lease.holding = True
        return lease

    def _make_room(self, need: int, model: tuple | None = None) -> bool:
        """Unload idle models until `need` fits the budget: first other instances of the same
        model (another num_ctx: Ollama reloads rather than keep both), then the least recently
        used. True when it fits (or nothing at all is loaded)."""
        def order(kv):
            return (kv[0][:2] != model, kv[1].last_used)
        used = sum(m.size for m in self.models.values())
        for k, m in sorted(self.models.items(), key=order):
            if m.busy:
                continue
            if used + need <= self.budget and k[:2] != model:
                break
            used -= m.size
            self._unload(k)
        return used + need <= self.budget or not self.models

    def _wake_room_waiters(self):
        """A model was given back or unloaded: every load waiting for memory looks again."""
        with self._lock:
            waiters, self._room_waiters = self._room_waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_resolve, fut)

    def _ensure_loaded(self, m: Loaded):
        if m.llm is not None:
            return
        from ollama_ft.llamacpp import open_gguf

        t0 = time.perf_counter()
        try:
            m.llm = open_gguf(m.model_path, n_ctx=m.n_ctx, n_threads=self.threads,
                              n_threads_batch=self.threads, n_gpu_layers=m.n_gpu_layers,
                              lora_path=str(m.adapter_path) if m.adapter_path else None,
                              verbose=False, seed=0)
        except Exception as e:
            from ollama_ft.serve.incidents import incident

            raise OllamaError(incident("the model failed to load", e)) from None
        if m.n_gpu_layers:
            arch = m.llm.metadata.get("general.architecture", "")
            n_layers = int(m.llm.metadata.get(f"{arch}.block_count", 0) or 0)
            m.size_vram = offloaded_bytes(m.size, n_layers, m.n_gpu_layers)
        m.load_duration = time.perf_counter() - t0

    def ps(self) -> list[Loaded]:
        with self._lock:
            return [m for m in self.models.values() if m.llm is not None]


class Lease:
    """Holds one model for one request (requests to a model are serialised): `with lease:`
    loads the model if needed and gives the model back at the end. A lease dropped without
    being entered (the client left first) gives it back too."""

    def __init__(self, engine: Engine, m: Loaded, keep_alive: float):
        self.engine, self.m, self.keep_alive = engine, m, keep_alive
        self.load_duration = 0.0
        self.holding = False
        self._once = threading.Lock()

    def __enter__(self) -> "Lease":
        try:
            fresh = self.m.llm is None
            self.engine._ensure_loaded(self.m)
            self.load_duration = self.m.load_duration if fresh else 0.0
        except BaseException:
            self.release()
            raise
        return self

    def _release_busy(self):
        with self.engine._lock:
            self.m.busy -= 1
            self.m.last_used = time.time()
            self.m.expires_at = time.time() + self.keep_alive
            if self.keep_alive <= 0 and self.m.busy == 0:
                self.engine._unload(self.m.key)
            elif self.m.busy == 0 and self.engine._room_waiters:
                self.engine._wake_room_waiters()

    def release(self):
        with self._once:
            if not self.holding:
                return
            self.holding = False
        self._release_busy()
        self.m.slot.release()

    def __exit__(self, *exc):
        self.release()
        return False

    def __del__(self):
        if getattr(self, "holding", False):
            self.release()

    @property
    def llm(self):
        return self.m.llm

    def tokenize(self, text: str) -> list[int]:
        # as Ollama's runner: add_special follows the GGUF (add_bos_token), specials parsed
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def generate(self, prompt_tokens: list[int], options: dict, fmt=None) -> Iterator[dict]:
        """Yield {"text": delta} events, then {"done": reason, counts, durations}."""
        llm = self.llm
        opts = {**DEFAULT_OPTIONS, **options}
        n_ctx = self.m.n_ctx
        if len(prompt_tokens) >= n_ctx:
            prompt_tokens = prompt_tokens[-(n_ctx - 1):]
        max_new = opts["num_predict"]
        room = n_ctx - len(prompt_tokens)
        max_tokens = room if max_new is None or max_new < 0 else min(max_new, room)
        kwargs = dict(max_tokens=max_tokens, temperature=opts["temperature"], top_p=opts["top_p"],
                      top_k=opts["top_k"], min_p=opts["min_p"], typical_p=opts["typical_p"],
                      repeat_penalty=opts["repeat_penalty"], presence_penalty=opts["presence_penalty"],
                      frequency_penalty=opts["frequency_penalty"], stop=opts["stop"] or None,
                      seed=None if opts["seed"] < 0 else opts["seed"], stream=True)
        if fmt is not None:
            kwargs["grammar"] = _grammar(fmt)
        t0 = time.perf_counter()
        first = None
        reason = "stop"
        count = 0
        for chunk in llm.create_completion(prompt_tokens, **kwargs):
            choice = chunk["choices"][0]
            if first is None:
                first = time.perf_counter()
            text = choice.get("text") or ""
            count += 1
            if text:
                yield {"text": text}
            if choice.get("finish_reason"):
                reason = "length" if choice["finish_reason"] == "length" else "stop"
        end = time.perf_counter()
        first = first or end
        # llama.cpp evaluates every sampled token but the last one before it stops
        eval_count = max(llm.n_tokens - len(prompt_tokens) + 1, 0) if count else 0
        yield {"done": reason, "prompt_eval_count": len(prompt_tokens),
               "prompt_eval_duration": int((first - t0) * 1e9), "eval_count": eval_count,
               "eval_duration": int((end - first) * 1e9), "load_duration": int(self.load_duration * 1e9),
               "tokens": [int(t) for t in llm._input_ids[:llm.n_tokens]]
               if hasattr(llm, "_input_ids") else [int(t) for t in prompt_tokens]}


def _resolve(fut) -> None:
    if not fut.done():
        fut.set_result(None)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _grammar(fmt):
    from llama_cpp import LlamaGrammar

    if fmt == "json":
        from llama_cpp.llama_grammar import JSON_GBNF

        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    if isinstance(fmt, dict):
        return LlamaGrammar.from_json_schema(json.dumps(fmt), verbose=False)
    raise BadOption(f"invalid format: {fmt!r}; use \"json\" or a JSON schema")
