"""Register a run's model with an Ollama daemon (or the bridge) over the REST API, through
the official `ollama` client: upload blobs (skipped when present), create, verify.

If the daemon cannot be reached, nothing in the run directory is touched beyond the
Modelfile, and the exact `ollama create` command is given instead.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ollama_ft.errors import OllamaError
from ollama_ft.ollama.names import parse_name


class OllamaUnreachable(OllamaError):
    exit_code = 3


class AdapterRefused(OllamaError):
    """The daemon will not create (or run) a model with an ADAPTER: Ollama 0.34.1 and later
    create none, and before 0.30 its own engine could not apply one."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def is_model_name(ref: str) -> bool:
    """A Modelfile FROM naming a model of the daemon, not a file of the run."""
    return not (ref.startswith((".", "/", "~")) or ref.lower().endswith(".gguf"))


def ollama_url(host: str | None = None) -> str:
    """OLLAMA_HOST rules: no scheme means http; default 127.0.0.1:11434; an explicit http://
    without a port means 80 (https: 443); 0.0.0.0 and :: mean this machine."""
    raw = (host or os.environ.get("OLLAMA_HOST") or "").strip() or "127.0.0.1:11434"
    explicit = "://" in raw
    parts = urlsplit(raw if explicit else "http://" + raw)
    scheme = parts.scheme or "http"
    hostname = parts.hostname or "127.0.0.1"
    if hostname in ("0.0.0.0", "::"):
        hostname = "127.0.0.1"
    port = parts.port or ((443 if scheme == "https" else 80) if explicit else 11434)
    if ":" in hostname:
        hostname = f"[{hostname}]"
    path = parts.path.rstrip("/")
    return f"{scheme}://{hostname}:{port}{path}"


# a job worker's token (bridge URL, token): jobworker.py sets it from its stdin
_BRIDGE_TOKEN: tuple[str, str] | None = None


def use_bridge_token(url: str, token: str) -> None:
    """A job worker's token, good only at the bridge that started it."""
    global _BRIDGE_TOKEN
    _BRIDGE_TOKEN = (ollama_url(url), token)


def auth_headers(url: str) -> dict:
    """The Authorization header for `url`, only if it is the bridge a key is for: a job
    worker's token goes only to its bridge; OLLAMA_FT_API_KEY only to OLLAMA_FT_API_KEY_HOST
    (default OLLAMA_HOST, else the bridge's default 127.0.0.1:11435). A plain Ollama daemon
    needs no key; any other host gets none."""
    url = ollama_url(url)
    if _BRIDGE_TOKEN is not None:
        return {"Authorization": f"Bearer {_BRIDGE_TOKEN[1]}"} if url == _BRIDGE_TOKEN[0] else {}
    key = os.environ.get("OLLAMA_FT_API_KEY")
    bridge = (os.environ.get("OLLAMA_FT_API_KEY_HOST") or os.environ.get("OLLAMA_HOST")
              or "127.0.0.1:11435")
    return {"Authorization": f"Bearer {key}"} if key and url == ollama_url(bridge) else {}


@dataclass
class RegisterResult:
    name: str
    host: str
    version: str
    modelfile: Path
    uploaded: list[str]
    skipped: list[str]
    reply: str
    seconds: float
    verification: object = None  # verify.Verification when verified


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _upload(client, path: Path, digest: str) -> bool:
    """HEAD first; POST with a progress bar only when the daemon lacks the blob."""
    import ollama

    try:
        client._request_raw("HEAD", f"/api/blobs/{digest}")
        return False
    except ollama.ResponseError as e:
        if e.status_code != 404:
            raise
    from tqdm.auto import tqdm

    size = path.stat().st_size
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"uploading {path.name}",
               disable=size < 64 * 2**20)

    def chunks():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                bar.update(len(chunk))
                yield chunk

    try:
        client._request_raw("POST", f"/api/blobs/{digest}", content=chunks())
    finally:
        bar.close()
    return True


def create_command(name: str, run_dir: Path) -> str:
    return f"ollama create {name} -f {run_dir / 'Modelfile'}"


def register(run_dir: str | Path, modelfile, name: str, host: str | None = None,
             log=print, verify: bool = True, expected=None) -> RegisterResult:
    """Upload the Modelfile's FROM/ADAPTER files and create `name`; then check what the
    daemon will feed the model (`verify.verify_prompt`, against `expected`, a
    verify.Expected) and that it answers."""
    import httpx
    import ollama

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    target = parse_name(name)
    url = ollama_url(host)
    mf_path = run_dir / "Modelfile"
    files, from_model = {}, None
    for field_name, ref in (("files", modelfile.from_), ("adapters", modelfile.adapter)):
        if not ref:
            continue
        if field_name == "files" and is_model_name(ref):
            from_model = ref  # FROM a model the daemon has: nothing to upload
            continue
        path = (run_dir / ref).resolve()
        if not path.is_file():
            how = "export --adapter-only" if modelfile.adapter else "export"
            raise OllamaError(f"{path}: missing; run `ollama-ft {how} {run_dir}` first")
        files[field_name] = path
    # the ollama-ft bridge can require a key: sent only to the bridge it is for
    headers = auth_headers(url)
    client = ollama.Client(host=url, timeout=httpx.Timeout(600.0, connect=5.0), headers=headers)
    try:
        version = httpx.get(f"{url}/api/version", timeout=5.0, headers=headers).json().get("version", "?")
    except (httpx.HTTPError, ValueError) as e:
        raise OllamaUnreachable(
            f"no Ollama answered at {url} ({type(e).__name__}); start it (`ollama serve`, or "
            f"`ollama-ft serve` for the bridge) or set OLLAMA_HOST / --host. "
            + _kept(run_dir, target.short)) from None
    log(f"Ollama {version} at {url}")
    with _connection_kept(url, run_dir, target.short):
        uploaded, skipped, digests = [], [], {}
        for field_name, path in files.items():
            digest = sha256_file(path)
            (uploaded if _upload(client, path, digest) else skipped).append(path.name)
            digests[field_name] = {path.name: digest}
        request = modelfile.to_create_request()
        if from_model:
            request["from_"] = from_model
        try:
            for status in client.create(model=target.short, stream=True, **digests, **request):
                if status.status and status.status != "success":
                    log(f"  {status.status}")
        except ollama.ResponseError as e:
            message = (f"Ollama refused the model: {e.error} (HTTP {e.status_code}); the "
                       f"Modelfile is {mf_path}")
            if "adapters" in digests and "adapter" in str(e.error).lower():
                raise AdapterRefused(message, str(e.error)) from None
            raise OllamaError(message) from None
        reply, verification = "", None
        if verify:
            from ollama_ft.ollama.verify import Expected
            from ollama_ft.ollamafmt.ggufinfo import chat_template

            gguf_template = chat_template(files.get("files") or _shown_blob(url, headers, from_model))
            reply, verification = _verify(client, url, headers, target.short, request,
                                          expected or Expected(None), gguf_template)
            log(f"  Ollama uses the {verification.template}; {verification.prompt}"
                + (f" ({verification.tokens} tokens)" if verification.tokens else ""))
    log(f"registered {target.short}")
    return RegisterResult(target.short, url, version, mf_path, uploaded, skipped, reply,
                          round(time.perf_counter() - t0, 2), verification)


@contextmanager
def _connection_kept(url: str, run_dir: Path, name: str):
    """A connection to the daemon that breaks half-way (it crashed, or was stopped) is an
    error that says so, with what is kept and how to go on; never a traceback."""
    import httpx

    try:
        yield
    except (httpx.HTTPError, ConnectionError) as e:
        raise OllamaUnreachable(
            f"the connection to Ollama at {url} broke while registering {name} "
            f"({type(e).__name__}: {e}); the daemon may have stopped or crashed (see its log). "
            + _kept(run_dir, name, again=True)) from None


def _kept(run_dir: Path, name: str, again: bool = False) -> str:
    """What a registration that could not reach the daemon leaves, and how to go on."""
    how = (f"run `ollama-ft register {run_dir} --name {name}` again once it is up, or"
           if again else "to register by hand run")
    return (f"The GGUF and Modelfile are kept in {run_dir}; {how}:\n  "
            f"{create_command(name, run_dir)}")


def _shown_blob(url: str, headers: dict, name: str | None) -> Path | None:
    """The GGUF of the model FROM names, where it lies on this machine (for its chat template)."""
    if not name:
        return None
    try:
        from ollama_ft.ollama.daemon import _modelfile, locate_blob, show

        reply = show(name, url)[2]
        return locate_blob(_modelfile(reply.get("modelfile") or "", name).from_ or "", name, url)
    except OllamaError:
        return None
    except Exception:  # noqa: BLE001 - only a better message is lost
        return None


def _verify(client, url: str, headers: dict, name: str, request: dict, expected,
            gguf_template: str | None):
    import httpx
    import ollama

    from ollama_ft.ollama.verify import verify_prompt

    with httpx.Client(headers=headers) as http:
        r = http.post(f"{url}/api/show", json={"model": name}, timeout=60.0)
        if r.status_code != 200:
            raise OllamaError(f"{name}: the daemon does not show the model it just created "
                              f"(HTTP {r.status_code}: {r.text.strip()[:200]})")
        show = r.json()
        for stop in (request.get("parameters") or {}).get("stop", []):
            if stop not in (show.get("parameters") or ""):
                raise OllamaError(f"{name}: stop {stop!r} is missing from the registered "
                                  "parameters")
        verification = verify_prompt(http, url, name, show, request.get("template"),
                                     gguf_template, expected)
    try:
        r = client.chat(model=name, messages=[{"role": "user", "content": "Hello"}],
                        options={"num_predict": 24, "temperature": 0})
    except ollama.ResponseError as e:
        raise OllamaError(f"{name} was created but does not answer: {e.error}") from None
    text = (r.message.content or "") + (r.message.thinking or "")
    if not text.strip() and r.eval_count == 0:
        raise OllamaError(f"{name} was created but returned no text to a short chat")
    return text, verification
