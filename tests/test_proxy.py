"""Proxy mode: a bridge in front of an Ollama API forwards everything (streams included),
adds the jobs API, and keeps its own API key to itself."""

import hashlib
import json
import urllib.request

import ollama
import pytest

from tests.conftest import FACTS, Server


@pytest.fixture(scope="module")
def daemon_and_proxy(tmp_path_factory):
    # the "daemon" is an embedded bridge: the proxy cannot tell it from Ollama
    home = tmp_path_factory.mktemp("proxy")
    daemon = Server(home / "daemon")
    proxy = Server(home / "proxy", "--upstream", daemon.url, "--api-key", "k3y")
    yield daemon, proxy
    proxy.stop()
    daemon.stop()


def test_everything_goes_through(daemon_and_proxy, trained_run):
    from ollama_ft.ollama.templates import template_for

    daemon, proxy = daemon_and_proxy
    client = ollama.Client(host=proxy.url, headers={"Authorization": "Bearer k3y"})
    path = trained_run / "model-q4_k_m.gguf"
    digest = client.create_blob(path)
    assert digest == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    template, params = template_for("deepseek-r1")
    statuses = [s.status for s in client.create(model="via-proxy", files={"m.gguf": digest},
                                               template=template, parameters=params, stream=True)]
    assert statuses[-1] == "success"
    # the model lives on the daemon, and the proxy lists it
    assert "via-proxy:latest" in {m.model for m in ollama.Client(host=daemon.url).list().models}
    assert "via-proxy:latest" in {m.model for m in client.list().models}
    q, a = FACTS[3]
    text = "".join(c.message.content for c in client.chat(
        model="via-proxy", messages=[{"role": "user", "content": q}], stream=True,
        options={"temperature": 0}))
    assert text == a
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="absent", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404 and "not found" in e.value.error
    req = urllib.request.Request(proxy.url + "/api/ft/jobs", headers={"Authorization": "Bearer k3y"})
    with urllib.request.urlopen(req) as r:
        assert json.load(r) == {"jobs": []}
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(proxy.url + "/api/tags")
    assert e.value.code == 401
