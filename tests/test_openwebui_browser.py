"""End to end in a real browser: Open WebUI (from PyPI, its own venv) offline against the
bridge, the trainer Pipe installed with `ollama-ft openwebui install`; in headless Chromium a
person attaches the demo data, asks for a fine-tune, watches its status lines, sees the loss
picture, picks the new model in the model list and gets a trained answer.

Needs Open WebUI (.venv-openwebui/, or OLLAMA_FT_OPENWEBUI=/path/to/open-webui), Debian's
chromium and chromium-driver, and selenium in .venv: scripts/setup_openwebui.sh installs them.
Without them it skips, unless OLLAMA_FT_REQUIRE_BROWSER_TEST=1 (CI) makes that a failure.
Screenshots go to OLLAMA_FT_SCREENSHOTS (a folder; docs/ for the ones in the docs) or the
test's tmp folder."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import Server, free_port

ROOT = Path(__file__).resolve().parent.parent
TRAINER = "ollama_ft_trainer"
MODEL = "zorbia-bot"
QUESTION, ANSWER = "What is the capital of Zorbia?", "The capital of Zorbia is Quellport."
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1400,1300"]


def _prerequisites():
    missing = []
    owui = os.environ.get("OLLAMA_FT_OPENWEBUI") or (
        str(ROOT / ".venv-openwebui/bin/open-webui")
        if (ROOT / ".venv-openwebui/bin/open-webui").is_file() else shutil.which("open-webui"))
    if not owui or not Path(owui).is_file():
        missing.append(f"Open WebUI ({owui or '.venv-openwebui/bin/open-webui'} not found; "
                       "OLLAMA_FT_OPENWEBUI names another)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        missing.append("Debian's chromium and chromium-driver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium in this venv")
    if missing:
        why = (f"the Open WebUI browser test needs {', '.join(missing)}: run "
               "scripts/setup_openwebui.sh")
        if os.environ.get("OLLAMA_FT_REQUIRE_BROWSER_TEST") == "1":
            pytest.fail(why + " (OLLAMA_FT_REQUIRE_BROWSER_TEST=1: it must run here)")
        pytest.skip(why)
    return owui, chromium, driver


def _get(url, token=None, body=None, timeout=30):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class OpenWebUI:
    """`open-webui serve` offline, single user (WEBUI_AUTH=False), Ollama API = the bridge."""

    def __init__(self, exe, data_dir: Path, ollama_url: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "DATA_DIR": str(data_dir), "OLLAMA_BASE_URL": ollama_url,
               "WEBUI_AUTH": "False", "WEBUI_SECRET_KEY": "ollama-ft-browser-test",
               "OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "ENABLE_OPENAI_API": "false", "RAG_EMBEDDING_MODEL": "",
               "BYPASS_EMBEDDING_AND_RETRIEVAL": "true", "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "false",
               "RAG_RERANKING_MODEL_AUTO_UPDATE": "false", "ENABLE_VERSION_UPDATE_CHECK": "false"}
        env.pop("VIRTUAL_ENV", None)
        self.log = open(data_dir.parent / "open-webui.log", "w")
        self.proc = subprocess.Popen([exe, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=data_dir)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("open-webui exited: " + Path(self.log.name).read_text()[-3000:])
            try:
                if _get(self.url + "/health", timeout=2).get("status"):
                    return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError("open-webui did not answer /health in 300 s: "
                           + Path(self.log.name).read_text()[-3000:])

    def admin_token(self) -> str:
        # with WEBUI_AUTH=False, the sign-in with empty credentials is the default admin's
        return _get(self.url + "/api/v1/auths/signin", body={"email": "", "password": ""})["token"]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture
def browser(tmp_path):
    owui, chromium, driver = _prerequisites()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium'}"]:
        opts.add_argument(flag)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.owui = owui
    yield d
    d.quit()


def _wait(what, fn, timeout, every=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_fine_tune_in_open_webui_then_chat_with_the_new_model(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from ollama_ft.demo import DEMO_TRAIN, SAMPLE, build_demo_base

    t0 = time.time()
    shots = Path(os.environ.get("OLLAMA_FT_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    demo = tmp_path / "demo"
    base = build_demo_base(demo, log=lambda *a: None)
    bridge = Server(tmp_path / "bridge-home", "--data-dir", str(demo))
    owui = None
    try:
        owui = OpenWebUI(browser.owui, tmp_path / "owui-data", bridge.url)
        token = owui.admin_token()
        inst = subprocess.run([sys.executable, "-m", "ollama_ft", "openwebui", "install",
                               "--url", owui.url, "--token", token, "--bridge-url", bridge.url,
                               "--base", str(base)], capture_output=True, text=True, timeout=120)
        assert inst.returncode == 0, inst.stderr
        assert f"installed the Pipe {TRAINER} in {owui.url}" in inst.stdout
        models = _get(owui.url + "/api/models", token)["data"]
        assert {"id": TRAINER, "name": "ollama-ft trainer"}.items() <= next(
            m for m in models if m["id"] == TRAINER).items()
        setup_s = time.time() - t0

        d = browser
        d.get(f"{owui.url}/?model={TRAINER}")
        _wait("the chat input", lambda: d.find_elements(By.ID, "chat-input"), 60)
        _dismiss_whats_new(d)
        assert _wait("the trainer selected", lambda: "ollama-ft trainer" in d.find_element(
            By.ID, "model-selector-model-button").text, 30)
        upload = next(i for i in d.find_elements(By.CSS_SELECTOR, "input[type=file]")
                      if i.get_attribute("multiple"))
        upload.send_keys(str(SAMPLE))
        _wait("the attachment", lambda: "sample.jsonl" in d.find_element(By.TAG_NAME, "body").text, 60)
        time.sleep(2)  # Open WebUI stores the file before the message may carry it
        keys = ("max_steps", "lr", "batch_size", "warmup", "logging_steps", "save_steps",
                "max_len", "lora_dropout", "seed")
        ask = f"fine-tune on this as {MODEL}, " + " ".join(f"{k}={DEMO_TRAIN[k]:g}" for k in keys)
        box = d.find_element(By.ID, "chat-input")
        box.click()
        box.send_keys(ask)
        box.send_keys(Keys.ENTER)

        steps_seen, progress_shot = [], False
        train_t0 = time.time()

        def finished():
            nonlocal progress_shot
            text = d.find_element(By.TAG_NAME, "body").text
            for line in text.splitlines():
                if line.startswith("step ") and " · loss " in line and line not in steps_seen:
                    steps_seen.append(line)
            if not progress_shot and any(s.startswith(("step 10/", "step 15/", "step 20/"))
                                         for s in steps_seen):
                d.save_screenshot(str(shots / "open-webui-trainer-progress.png"))
                progress_shot = True
            if "**Error" in text or "\nError:" in text or "\nFailed" in text:
                raise AssertionError("the trainer reported a failure:\n" + text[-3000:])
            return "The new model is" in text and text

        text = _wait("the job to finish", finished, 1200, every=0.3)
        train_s = time.time() - train_t0
        # the status line moved through the training steps, with loss, tokens/s, ETA, memory
        assert len(steps_seen) >= 4, steps_seen
        assert all(" tok/s · ETA " in s for s in steps_seen), steps_seen
        assert f"as {MODEL} (80 steps, q4_k_m)" in text
        assert "training (80 steps)" in text and "exporting GGUF" in text
        assert "registering the model" in text
        events = _job_events(bridge.url)
        if any(e["type"] == "data" for e in events):  # bridges that report the data check
            assert re.search(r"Data check of\s*sample\.jsonl\s*: 8 records read, 8 kept, "
                             r"0 rejected", text), text
            assert "Tokens per example: p50" in text
        if any(e["type"] == "checkpoint" or e.get("checkpoint") for e in events):
            assert "checkpoint saved at step 40" in text
        assert re.search(rf"The new model is\s*{MODEL}:latest\s*: pick it in the model list", text)
        picture = _wait("the loss picture", lambda: [
            i for i in d.find_elements(By.CSS_SELECTOR, "img[data-cy=image]")
            if (i.get_attribute("src") or "").startswith("data:image/png;base64,")
            and int(i.get_attribute("naturalWidth") or 0) > 100], 30)[0]
        assert not d.find_elements(By.CSS_SELECTOR, "[data-cy=image-unavailable]")
        d.execute_script("arguments[0].scrollIntoView({block: 'center'})", picture)
        time.sleep(0.5)
        d.save_screenshot(str(shots / "open-webui-trainer-done.png"))

        # a new chat: the fine-tune is in the model list and answers at its own sampling
        d.get(owui.url + "/")
        _wait("the chat input", lambda: d.find_elements(By.ID, "chat-input"), 60)
        _dismiss_whats_new(d)
        d.find_element(By.ID, "model-selector-model-button").click()
        item = _wait("the new model in the model list", lambda: d.find_elements(
            By.CSS_SELECTOR, f"button[data-value='{MODEL}:latest']"), 30)[0]
        d.save_screenshot(str(shots / "open-webui-trainer-model-list.png"))
        item.click()
        assert _wait("the new model selected", lambda: f"{MODEL}:latest" in d.find_element(
            By.ID, "model-selector-model-button").text, 30)
        box = d.find_element(By.ID, "chat-input")
        box.click()
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)

        _wait(f"the answer {ANSWER!r}", lambda: ANSWER in d.find_element(By.TAG_NAME, "body").text, 300)
        d.save_screenshot(str(shots / "open-webui-trained-answer.png"))
        wall = time.time() - t0
        print(f"\nbrowser flow: {wall:.0f} s in all (bridge + Open WebUI up and the pipe "
              f"installed: {setup_s:.0f} s; fine-tune in the chat: {train_s:.0f} s); "
              f"{len(steps_seen)} status lines; screenshots in {shots}")
    finally:
        if owui:
            owui.stop()
        bridge.stop()


def _job_events(bridge_url):
    jobs = _get(bridge_url + "/api/ft/jobs")["jobs"]
    with urllib.request.urlopen(f"{bridge_url}/api/ft/jobs/{jobs[0]['id']}/events", timeout=60) as r:
        return [json.loads(line) for line in r.read().decode().splitlines() if line.strip()]


def _dismiss_whats_new(d):
    from selenium.webdriver.common.by import By

    time.sleep(1)
    for b in d.find_elements(By.XPATH, "//button[contains(., \"Okay, Let's Go!\")]"):
        b.click()
        time.sleep(0.5)
