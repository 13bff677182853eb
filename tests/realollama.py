"""A real Ollama daemon for the opt-in tests: OLLAMA_FT_TEST_OLLAMA names its binary.

`ollama serve` runs on a free loopback port with its own HOME and OLLAMA_MODELS (and none
of the caller's OLLAMA_* settings), so a daemon of yours is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

OLLAMA = os.environ.get("OLLAMA_FT_TEST_OLLAMA", "")
requires_ollama = pytest.mark.skipif(
    not OLLAMA, reason="set OLLAMA_FT_TEST_OLLAMA to an `ollama` binary to run the tests "
    "against a real Ollama")


class RealOllama:
    """`ollama serve` on a free loopback port, with its own HOME and OLLAMA_MODELS."""

    def __init__(self, binary: str, root: Path):
        self.binary = binary
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        home = root / "home"
        home.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
        self.env = {**env, "HOME": str(home), "OLLAMA_HOST": self.host,
                    "OLLAMA_MODELS": str(root / "models"), "OLLAMA_NOPRUNE": "1",
                    "OLLAMA_KEEP_ALIVE": "10m", "OLLAMA_MAX_LOADED_MODELS": "2",
                    "OLLAMA_NO_CLOUD": "1"}  # no calls to ollama.com
        self.log_path = root / "ollama-serve.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([binary, "serve"], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        import httpx

        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                self.version = httpx.get(self.url + "/api/version", timeout=1).json()["version"]
                return
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ollama serve exited: {self.log_path.read_text()[-2000:]}")
                time.sleep(0.3)
        raise RuntimeError("ollama serve did not answer within 60 s")

    def cli(self, *args, timeout=300, cwd=None) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=cwd)

    def post(self, path: str, body: dict, timeout=300):
        import httpx

        return httpx.post(self.url + path, json=body, timeout=timeout)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def ollama(tmp_path_factory):
    binary = shutil.which(OLLAMA) or OLLAMA
    if not Path(binary).is_file():
        pytest.fail(f"OLLAMA_FT_TEST_OLLAMA={OLLAMA!r} is not an executable")
    server = RealOllama(binary, tmp_path_factory.mktemp("real-ollama"))
    yield server
    server.stop()


def ollama_ft(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    """The ollama-ft CLI, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "ollama_ft", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
