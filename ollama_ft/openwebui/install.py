"""`ollama-ft openwebui install`: put the trainer Pipe (pipe.py beside this file) into a running
Open WebUI through its REST API: create the function (or update it), set its valves, switch
it on. Open WebUI 0.5 and later: /api/v1/functions/{create, id/ID/update, id/ID/valves/update,
id/ID/toggle}, all with an admin's token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ollama_ft.errors import OllamaFtError

PIPE_FILE = Path(__file__).with_name("pipe.py")
FUNCTION_ID = "ollama_ft_trainer"
FUNCTION_NAME = "ollama-ft trainer"
DESCRIPTION = ("Fine-tune a DeepSeek base on a file attached in the chat, through the ollama-ft "
               "bridge; the new model appears in the model list.")
TOKEN_HELP = ("pass an admin's token with --token (or OPEN_WEBUI_TOKEN): an API key from "
              "Settings > Account > API keys, or a session token; an Open WebUI started with "
              "WEBUI_AUTH=False gives its admin's token to POST /api/v1/auths/signin with an "
              "empty email and password")


class OpenWebUIError(OllamaFtError):
    """Open WebUI could not be reached or refused the installation."""


def pipe_source() -> str:
    return PIPE_FILE.read_text(encoding="utf-8")


@dataclass
class Installed:
    url: str
    function_id: str
    name: str
    created: bool  # False: an existing function was updated
    valves: dict


def _detail(r) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text.strip()[:300]
    return str(body.get("detail") or body) if isinstance(body, dict) else str(body)


def install_pipe(url: str, token: str, valves: dict | None = None, function_id: str = FUNCTION_ID,
                 name: str = FUNCTION_NAME, timeout: float = 60.0) -> Installed:
    """Create or update the function, merge `valves` into its stored valves, activate it."""
    import httpx

    if not token:
        raise OpenWebUIError(f"no Open WebUI token: {TOKEN_HELP}")
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise OpenWebUIError(f"--url {url!r} must be an http(s) URL, e.g. http://127.0.0.1:8080")
    api = f"{base}/api/v1/functions"
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=timeout) as c:
            listed = c.get(f"{api}/")
            if listed.status_code in (401, 403):
                raise OpenWebUIError(f"Open WebUI at {base} refused the token ({listed.status_code}: "
                                     f"{_detail(listed)}); installing a function needs an admin: "
                                     f"{TOKEN_HELP}")
            if listed.status_code == 404:
                raise OpenWebUIError(f"{base} has no /api/v1/functions: is it Open WebUI (0.5 or "
                                     "later)? Check --url")
            _ok(listed, base, "listing functions")
            existing = next((f for f in listed.json() if f.get("id") == function_id), None)
            form = {"id": function_id, "name": name, "content": pipe_source(),
                    "meta": {"description": DESCRIPTION, "manifest": {}}}
            if existing is None:
                _ok(c.post(f"{api}/create", json=form), base, "creating the function")
            else:
                _ok(c.post(f"{api}/id/{function_id}/update", json=form), base,
                    "updating the function")
            stored = _ok(c.get(f"{api}/id/{function_id}/valves"), base, "reading its valves") or {}
            merged = {**stored, **{k: v for k, v in (valves or {}).items() if v is not None}}
            if merged:
                _ok(c.post(f"{api}/id/{function_id}/valves/update", json=merged), base,
                    "setting its valves")
            function = _ok(c.get(f"{api}/id/{function_id}"), base, "reading the function")
            if not function.get("is_active"):
                _ok(c.post(f"{api}/id/{function_id}/toggle"), base, "switching it on")
    except httpx.TransportError as e:
        raise OpenWebUIError(f"no Open WebUI answered at {base} ({type(e).__name__}: {e}); start "
                             "it (open-webui serve) or pass --url") from None
    return Installed(base, function_id, name, existing is None, merged)


def _ok(r, base: str, what: str):
    if r.status_code >= 400:
        raise OpenWebUIError(f"Open WebUI at {base} failed {what}: {r.status_code} {_detail(r)}")
    return r.json()
