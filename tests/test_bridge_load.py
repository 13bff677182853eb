"""The bridge under load: requests queue for a busy model without holding a thread each,
the queue is bounded (Ollama's 503 beyond OLLAMA_MAX_QUEUE), and 64 concurrent chats over
two models beside a training job and a registration all answer right or get a clean 503."""

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from ollama_ft.serve.engine import Engine, ServerBusy, Slot
from tests.conftest import Server

ROOT = Path(__file__).resolve().parent.parent
BUSY = "server busy, please try again.  maximum pending requests exceeded"


def test_slot_is_fifo_survives_cancelled_waiters_and_releases_from_threads():
    async def main():
        slot = Slot()
        order = []
        await slot.acquire()

        async def waiter(i):
            await slot.acquire()
            order.append(i)
            # released from another thread, as a finished generation does
            await asyncio.to_thread(slot.release)

        tasks = [asyncio.create_task(waiter(i)) for i in range(6)]
        await asyncio.sleep(0.05)
        assert slot.waiting == 6
        tasks[2].cancel()  # gives up while queued: must not take (or lose) the slot
        await asyncio.sleep(0.05)
        assert slot.waiting == 5
        threading.Thread(target=slot.release).start()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert order == [0, 1, 3, 4, 5]
        await asyncio.wait_for(slot.acquire(), 1)  # free again: nobody kept it
    asyncio.run(main())


def test_a_waiter_cancelled_after_the_hand_over_passes_the_slot_on():
    async def main():
        slot = Slot()
        await slot.acquire()
        first = asyncio.create_task(slot.acquire())
        second = asyncio.create_task(slot.acquire())
        await asyncio.sleep(0.01)
        slot.release()  # handed to `first` ...
        first.cancel()  # ... which gives up before it runs again
        await asyncio.wait_for(second, 1)
        assert first.cancelled()
    asyncio.run(main())


def test_the_queue_is_bounded_and_a_dropped_lease_gives_the_model_back(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 100)
    engine = Engine(memory_budget=2**30, max_queue=2)

    async def main():
        args = ("m", "sha256:" + "0" * 64, gguf, None, 512, 300.0)
        holder = await engine.acquire(*args)
        waiters = [asyncio.create_task(engine.acquire(*args)) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert engine.queued() == 2
        with pytest.raises(ServerBusy, match="maximum pending requests exceeded"):
            await engine.acquire(*args)
        holder.release()
        a = await waiters.pop(0)
        del a  # never entered (the client left before the stream began): released anyway
        b = await asyncio.wait_for(waiters.pop(0), 1)
        b.release()
        assert engine.queued() == 0 and all(m.busy == 0 for m in engine.models.values())
    try:
        asyncio.run(main())
    finally:
        engine.close()


def serve_models(trained_run, home, env, names=(("q4_k_m", "a"), ("f16", "b"))) -> Server:
    import ollama

    from ollama_ft.ollama.templates import template_for

    server = Server(home, env=env)
    client = ollama.Client(host=server.url)
    template, params = template_for("deepseek-r1")
    for quant, name in names:
        digest = client.create_blob(trained_run / f"model-{quant}.gguf")
        list(client.create(model=name, files={"model.gguf": digest}, template=template,
                           parameters={**params, "temperature": 0}, stream=True))
    return server


def sampled(model, n, seed=1):
    """A generation of n tokens that does not stop early (sampled at a high temperature)."""
    return {"model": model, "stream": False, "prompt": "Once", "raw": True,
            "options": {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "num_predict": n, "seed": seed}}


def post_all(url, path, body, n) -> tuple[list, list]:
    """n concurrent POSTs; returns (threads, results) with the threads started."""
    results = []

    def one():
        r = httpx.post(url + path, json=body, timeout=600)
        results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results


def test_queued_requests_hold_no_thread_and_do_not_starve_other_models(trained_run, tmp_path):
    """60 generations queue on model a; model b still answers at once, and the bridge holds
    few threads meanwhile. (Before, each waiter blocked one of the 40 worker threads, so b
    waited for a thread behind the 20 requests that did not get one: 21 of a's finished first.)"""
    import os
    import time

    server = serve_models(trained_run, tmp_path / "home", {})
    try:
        url, pid = server.url, server.proc.pid
        threads, results = post_all(url, "/api/generate", sampled("a", 40), 60)
        deadline = time.time() + 60
        while time.time() < deadline and not results:  # a is loaded and generating
            time.sleep(0.05)
        time.sleep(0.3)
        bridge_threads = len(os.listdir(f"/proc/{pid}/task"))
        r = httpx.post(f"{url}/api/chat", timeout=600, json={
            "model": "b", "stream": False,
            "messages": [{"role": "user", "content": "Who painted the Blue Lantern?"}]})
        finished_before_b = len(results)
        for t in threads:
            t.join()
        assert r.status_code == 200 and r.json()["message"]["content"] == "Mira Okafor painted it."
        assert [s for s, _ in results] == [200] * 60
        assert finished_before_b < 12, f"b answered only after {finished_before_b} of a's requests"
        assert bridge_threads < 30, bridge_threads
    finally:
        server.stop()


def test_beyond_the_queue_bound_ollamas_503(trained_run, tmp_path):
    server = serve_models(trained_run, tmp_path / "home", {"OLLAMA_MAX_QUEUE": "4"},
                          names=(("q4_k_m", "a"),))
    try:
        threads, results = post_all(server.url, "/api/generate", sampled("a", 60, seed=2), 20)
        for t in threads:
            t.join()
    finally:
        server.stop()
    busy = [b for s, b in results if s == 503]
    ok = [b for s, b in results if s == 200]
    assert len(busy) + len(ok) == 20
    assert busy and all(b == {"error": BUSY} for b in busy)
    assert len(ok) >= 5 and all(b["done"] and b["eval_count"] > 0 for b in ok)


@pytest.mark.slow
def test_64_chats_beside_a_job_and_a_registration(trained_run, tmp_path):
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_serve_load.py"), "--chats", "64",
                        "--run", str(trained_run), "--workdir", str(tmp_path / "w"),
                        "--json", str(out)], capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["answered"] + res["busy_503"] == 64 and res["answered"] > 0
    assert res["mixed_up"] == 0 and res["errors"] == []
    assert res["missing_blobs"] == [] and res["models_answer_after"]
    assert res["registrations"] > 0 and res["registrations_failed"] == 0
    assert res["job_state_during"] == "running"


def test_num_gpu_offload_share_is_what_llama_cpp_puts_on_the_gpu():
    from ollama_ft.serve.engine import gpu_offload, offloaded_bytes

    assert offloaded_bytes(1000, 9, -1) == 1000  # num_gpu -1 (Ollama's default): all of it
    assert offloaded_bytes(1000, 9, 5) == 500  # 5 of the 9 blocks + output layer
    assert offloaded_bytes(1000, 9, 99) == 1000 and offloaded_bytes(1000, 9, 0) == 0
    if not gpu_offload():  # this llama-cpp-python is a CPU build: nothing is offloaded
        engine = Engine(memory_budget=2**30)
        try:
            lease = asyncio.run(engine.acquire("m", "sha256:" + "1" * 64, Path(__file__), None,
                                               512, 0.0, num_gpu=20))
            assert lease.m.n_gpu_layers == 0 and lease.m.size_vram == 0
            lease.release()
        finally:
            engine.close()


# --- issue #21: bounds of the engine, and streams that give their model back -----------------
KV_BYTES_PER_TOKEN = 64 * 1024  # the engine's estimate of a token of context


def tiny_registry(tmp_path, ctx=256):
    """A store with model `m`: a tiny GGUF with a trained context of `ctx` (parsed, never
    loaded: these tests acquire leases without entering them)."""
    from ollama_ft.serve.models import Registry
    from ollama_ft.serve.store import Store
    from tests.test_bridge_faults import tiny_gguf

    store = Store(tmp_path / "home")
    digest, _ = store.write_blob([tiny_gguf(tmp_path / "m.gguf", ctx=ctx).read_bytes()])
    list(Registry(store).create({"model": "m", "files": {"model.gguf": digest}}))
    return Registry(store)


def test_num_ctx_is_clamped_to_the_model_and_the_memory_budget(tmp_path):
    """num_ctx was part of the engine's model key unclamped: each value loaded another
    llama.cpp instance, however large."""
    from ollama_ft.serve import generation as g
    from ollama_ft.serve.http import HTTPError

    registry = tiny_registry(tmp_path, ctx=256)
    weights = registry.get("m").model_path.stat().st_size
    engine = Engine(memory_budget=weights + 200 * KV_BYTES_PER_TOKEN, max_queue=8)

    async def acquire(num_ctx):
        req = g.prepare(registry, {"model": "m", "options": {"num_ctx": num_ctx}})
        events = await g.start(engine, req, [{"role": "user", "content": "hi"}])
        events.close()  # never started: the dropped lease gives the model back
        del events
        return {k[2] for k in engine.models}

    try:
        for num_ctx in (1_000_000, 4096, 300, 257, 201):
            assert asyncio.run(acquire(num_ctx)) == {200}  # the budget holds 200 tokens
        assert asyncio.run(acquire(150)) == {150}  # within both: as asked, the idle 200 gone
        small = Engine(memory_budget=weights + 10 * KV_BYTES_PER_TOKEN)
        try:
            req = g.prepare(registry, {"model": "m"})
            with pytest.raises(HTTPError) as e:
                asyncio.run(g.start(small, req, []))
            assert e.value.status == 500 and "requires more system memory" in e.value.message
        finally:
            small.close()
    finally:
        engine.close()


def test_a_load_past_the_memory_budget_waits_for_a_model_to_be_given_back(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"a" * 1000)
    b.write_bytes(b"b" * 1000)
    one = 1000 + 512 * KV_BYTES_PER_TOKEN
    engine = Engine(memory_budget=one + 100, max_queue=2)

    async def main():
        held = await engine.acquire("a", "sha256:" + "a" * 64, a, None, 512, 300.0)
        waiting = asyncio.create_task(engine.acquire("b", "sha256:" + "b" * 64, b, None, 512, 300.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # it waits instead of loading past the budget
        assert sum(m.size for m in engine.models.values()) <= engine.budget
        assert engine.queued() == 1
        also = asyncio.create_task(engine.acquire("b", "sha256:" + "c" * 64, b, None, 512, 300.0))
        await asyncio.sleep(0.05)
        with pytest.raises(ServerBusy):  # the waiting loads count in OLLAMA_MAX_QUEUE
            await engine.acquire("b", "sha256:" + "d" * 64, b, None, 512, 300.0)
        also.cancel()
        await asyncio.gather(also, return_exceptions=True)
        held.release()
        lease = await asyncio.wait_for(waiting, 2)
        assert [m.name for m in engine.models.values()] == ["b"]  # a, idle, made room
        lease.release()
        assert engine.queued() == 0

    try:
        asyncio.run(main())
    finally:
        engine.close()


def test_a_stream_whose_client_left_gives_its_model_back_at_once():
    """Before, a disconnected stream kept its lease until Python collected the generator."""
    import gc
    import time

    from ollama_ft.serve import generation as g

    released = threading.Event()

    def events():
        try:
            yield {"content": "a"}
            for _ in range(2000):
                time.sleep(0.001)
                yield {"content": "b"}
        finally:
            released.set()

    resp = g.ndjson(events(), lambda ev: ev)

    async def main():
        body_sent = asyncio.Event()

        async def send(message):
            if message["type"] == "http.response.body":
                body_sent.set()

        async def receive():
            await body_sent.wait()
            return {"type": "http.disconnect"}

        await resp({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
        return released.is_set()

    gc.disable()
    try:
        assert asyncio.run(main()), "the generation (and its model) was still held"
    finally:
        gc.enable()
