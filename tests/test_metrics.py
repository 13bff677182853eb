"""GET /metrics: Prometheus text the official parser reads, moving with requests,
generations and a training job."""

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FACTS, Server, qa_rows, write_jsonl


def scrape(url) -> dict:
    """{(sample name, labels as sorted tuple): value}"""
    r = httpx.get(url + "/metrics", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples, metric, **labels):
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
    import ollama

    from ollama_ft.ollama.templates import template_for

    server = Server(tmp_path_factory.mktemp("metrics") / "home")
    client = ollama.Client(host=server.url)
    template, params = template_for("deepseek-r1")
    digest = client.create_blob(trained_run / "model-q4_k_m.gguf")
    list(client.create(model="m", files={"model.gguf": digest}, template=template,
                       parameters={**params, "temperature": 0}, stream=True))
    yield server, client
    server.stop()


def test_metrics_count_requests_tokens_and_loaded_models(served):
    server, client = served
    before = scrape(server.url)
    r = client.chat(model="m", messages=[{"role": "user", "content": FACTS[0][0]}])
    assert r.message.content == FACTS[0][1]
    httpx.get(server.url + "/api/ft/jobs/nope")  # a 404 is counted too
    after = scrape(server.url)
    chat = dict(route="/api/chat", method="POST", status="200")
    assert value(after, "ollama_ft_requests_total", **chat) == value(before, "ollama_ft_requests_total", **chat) + 1
    assert value(after, "ollama_ft_requests_total", route="/api/ft/jobs/{job_id}", method="GET", status="404") >= 1
    assert value(after, "ollama_ft_generated_tokens_total", model="m:latest") - value(
        before, "ollama_ft_generated_tokens_total", model="m:latest") == r.eval_count
    assert value(after, "ollama_ft_request_duration_seconds_count", route="/api/chat", method="POST") >= 1
    assert value(after, "ollama_ft_tokens_per_second", model="m:latest") > 0
    assert value(after, "ollama_ft_loaded_models") == 1
    assert value(after, "ollama_ft_model_memory_bytes", model="m:latest", where="total") > 0
    assert value(after, "ollama_ft_model_memory_bytes", model="m:latest", where="gpu") == 0
    assert ("ollama_ft_queue_depth", ()) in after


@pytest.mark.slow
def test_metrics_follow_a_training_job(tiny_base, tmp_path):
    base = tiny_base("r1-qwen", hidden=128)
    server = Server(tmp_path / "home", "--data-dir", str(base.parent))
    try:
        data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS))
        up = httpx.post(server.url + "/api/ft/uploads", params={"filename": "d.jsonl"},
                        content=data.read_bytes()).json()
        job = httpx.post(server.url + "/api/ft/jobs", timeout=60, json={
            "name": "mjob", "base": str(base), "data": up["data"], "max_steps": 100000,
            "save_steps": 10, "logging_steps": 1, "batch_size": 2, "max_len": 64}).json()
        seen, deadline = [], time.time() + 300
        while time.time() < deadline and len(set(seen)) < 3:
            s = scrape(server.url)
            step = value(s, "ollama_ft_job_step", job=job["id"], name="mjob")
            if value(s, "ollama_ft_job_state", job=job["id"], name="mjob", state="running") == 1 and step:
                seen.append(step)
                assert value(s, "ollama_ft_job_loss", job=job["id"], name="mjob") > 0
                assert value(s, "ollama_ft_job_tokens_per_second", job=job["id"], name="mjob") > 0
                assert value(s, "ollama_ft_job_memory_bytes", job=job["id"], name="mjob") > 2**20
                assert value(s, "ollama_ft_job_max_steps", job=job["id"], name="mjob") == 100000
            time.sleep(0.5)
        assert len(set(seen)) >= 3 and seen == sorted(seen), seen  # the step moves
        events = httpx.get(f"{server.url}/api/ft/jobs/{job['id']}").json()
        assert events["progress"]["rss_mb"] > 0
        httpx.delete(f"{server.url}/api/ft/jobs/{job['id']}", timeout=120)
        s = scrape(server.url)
        assert value(s, "ollama_ft_job_state", job=job["id"], name="mjob", state="cancelled") == 1
        lines = (tmp_path / "home" / "jobs" / job["id"] / "events.ndjson").read_text().splitlines()
        kinds = [json.loads(x)["type"] for x in lines]
        assert "data" in kinds and "checkpoint" in kinds
        data_ev = next(json.loads(x) for x in lines if json.loads(x)["type"] == "data")
        assert data_ev["report"]["records_read"] == len(FACTS)
        r = httpx.get(f"{server.url}/api/ft/jobs/{job['id']}/files/loss.png")
        assert r.status_code in (200, 404)
        assert httpx.get(f"{server.url}/api/ft/jobs/{job['id']}/files/adapter_model.safetensors").status_code == 404
    finally:
        server.stop()
