"""Run the bridge: parse --listen, refuse an open bind without an API key, start uvicorn."""

from __future__ import annotations

import ipaddress
import os

from ollama_ft.errors import ConfigError

DEFAULT_LISTEN = "127.0.0.1:11435"


def parse_listen(value: str | None) -> tuple[str, int]:
    value = value or os.environ.get("OLLAMA_FT_LISTEN") or DEFAULT_LISTEN
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, "11435"
    host = host.strip("[]") or "127.0.0.1"
    try:
        port_n = int(port)
        if not 0 <= port_n < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:11435") from None
    return host, port_n


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pick_upstream(upstream: str | None, embedded: bool, own_url: str, log=print) -> str | None:
    """--upstream wins; else a daemon answering at OLLAMA_HOST makes it proxy mode."""
    from ollama_ft.ollama.client import ollama_url

    if embedded:
        return None
    if upstream:
        url = ollama_url(upstream)
    else:
        import httpx

        url = ollama_url(None)
        try:
            httpx.get(f"{url}/api/version", timeout=1.5).raise_for_status()
        except httpx.HTTPError:
            return None
        log(f"an Ollama daemon answers at {url}: proxy mode (use --embedded to serve models here)")
    if url.rstrip("/") == own_url.rstrip("/"):
        raise ConfigError(f"--upstream {url} is this bridge itself; point it at the Ollama daemon")
    return url


def serve(listen: str | None = None, api_key: str | None = None, home: str | None = None,
          upstream: str | None = None, embedded: bool = False, log=print, data_dirs=(),
          allow_remote_code: bool = False) -> None:
    import logging

    import uvicorn

    from ollama_ft.serve.app import Bridge
    from ollama_ft.train.allocator import SERVE_THRESHOLD, limit_heap_caching

    limit_heap_caching(SERVE_THRESHOLD)  # big request buffers go back to the system when freed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = parse_listen(listen)
    api_key = api_key or os.environ.get("OLLAMA_FT_API_KEY")
    if not is_loopback(host) and not api_key:
        raise ConfigError(f"binding {host} exposes the bridge beyond this machine: set --api-key "
                          "(or OLLAMA_FT_API_KEY); clients then send Authorization: Bearer KEY")
    # the key stays in this process: job workers get a token of their own (jobs.py)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    own = f"http://{shown}:{port}"
    upstream = pick_upstream(upstream, embedded, own, log)
    bridge = Bridge(home=home, api_key=api_key, self_url=own, upstream=upstream,
                    data_dirs=data_dirs, allow_remote_code=allow_remote_code)
    where = f"proxying to {upstream}" if upstream else f"models in {bridge.store.root}"
    log(f"ollama-ft bridge listening on http://{host}:{port} ({where})")
    log(f"point clients at it: OLLAMA_HOST=http://{host}:{port}  "
        f"Open WebUI: OLLAMA_BASE_URL=http://{host}:{port}")
    uvicorn.run(bridge.app(), host=host, port=port, log_level="warning", timeout_keep_alive=30)
