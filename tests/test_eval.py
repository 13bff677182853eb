"""`ollama-ft eval`: base vs fine-tune through llama.cpp on the exported GGUF files,
checked against the same loss computed by PyTorch."""

import json
import subprocess
import sys

import pytest

from tests.conftest import FACTS, qa_rows, write_jsonl

UNSEEN = [("What is the river of Zorbia called?", "The Quell river."),
          ("Who founded Quellport?", "Captain Idris Vane founded it.")]


def torch_loss(model_dir, adapter_dir, encoded):
    """Token-weighted cross-entropy at the labelled positions, as training computes it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in encoded:
            ids = torch.tensor([e.input_ids])
            logits = model(ids).logits[0, :-1].double()
            labels = torch.tensor(e.labels[1:])
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    data = write_jsonl(tmp_path_factory.mktemp("evaldata") / "held.jsonl", qa_rows(FACTS + UNSEEN))
    r = subprocess.run([sys.executable, "-m", "ollama_ft", "eval", str(trained_run), "--eval-data",
                        str(data), "--quant", "f16", "--max-new-tokens", "24"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return trained_run, data, r


def test_eval_reports_base_and_fine_tune(evaluated):
    run, _, r = evaluated
    report = json.loads((run / "report.json").read_text())["eval"]
    base, fine = report["base"], report["fine_tuned"]
    for m in (base, fine):
        assert {"loss", "perplexity", "exact_match", "rouge_l", "count"} <= set(m)
        assert m["count"] == len(FACTS) + len(UNSEEN)
    assert fine["loss"] < base["loss"] - 1.0
    # the four trained facts come back word for word through llama.cpp; the base says none
    assert fine["exact_match"] >= len(FACTS) / (len(FACTS) + len(UNSEEN)) and base["exact_match"] == 0
    assert fine["rouge_l"] > base["rouge_l"]
    assert report["files"] == {"base": "base-f16.gguf", "fine_tuned": "model-f16.gguf"}
    assert (run / "eval.png").stat().st_size > 10_000
    md = (run / "eval.md").read_text()
    assert "| held-out loss |" in md and FACTS[0][1] in md
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["fine_tuned"] for r in rows[:len(FACTS)]] == [a for _, a in FACTS]
    assert "fine-tuned: loss" in r.stdout
    # eval writes its base GGUF without changing what the export says it made
    export = json.loads((run / "report.json").read_text())["export"]
    assert not export["adapter_only"] and "model-f16.gguf" in export["files"].values()


def test_eval_loss_is_pytorchs_loss(evaluated):
    from transformers import AutoTokenizer

    from ollama_ft.chat_formats import FORMATS
    from ollama_ft.data.check import check_data

    run, data, _ = evaluated
    report = json.loads((run / "report.json").read_text())
    base_path = report["train"]["base_path"]
    tok = AutoTokenizer.from_pretrained(base_path)
    _, encoded, _ = check_data(data, tok, FORMATS["deepseek-r1"], 128)
    ev = report["eval"]
    for key, adapter in (("base", None), ("fine_tuned", run / "adapter")):
        ref = torch_loss(base_path, adapter, encoded)
        assert ev[key]["loss"] == pytest.approx(ref, rel=2e-3), key


def test_eval_without_held_out_data_says_what_to_do(trained_run):
    r = subprocess.run([sys.executable, "-m", "ollama_ft", "eval", str(trained_run)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "nothing to evaluate on" in r.stderr and "--eval-data" in r.stderr


def test_metrics():
    from ollama_ft.evaluation.metrics import answer_of, exact_match, rouge_l

    assert rouge_l("Quellport is the capital", "Quellport is the capital") == 1.0
    assert 0 < rouge_l("the capital is Quellport", "Quellport is the capital of Zorbia") < 1
    assert rouge_l("北京是首都", "北京是中国的首都") > 0.7  # CJK counted per character
    assert answer_of("\nthinking here\n</think>\n\n The answer. ", True) == "The answer."
    assert exact_match(" a ", "a") and not exact_match("a", "b")
