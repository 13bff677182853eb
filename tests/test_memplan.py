"""The memory plan (ollama_ft/memplan.py): its formula against the peaks measured at real size,
`train --dry-run`, and a run that cannot fit stopping before anything loads."""

import json

import pytest
from click.testing import CliRunner

from conftest import FACTS, qa_rows, write_jsonl

# DeepSeek-R1-Distill-Qwen-1.5B's and -7B's config.json (the parts the plan reads), with the
# parameters and bytes of the bf16 checkpoints scripts/bench_scale.py builds from them
R1_15B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "intermediate_size": 8960,
          "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
          "vocab_size": 151936, "tie_word_embeddings": False}
R1_7B = {**R1_15B, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
         "num_key_value_heads": 4, "vocab_size": 152064}
SHAPES = {  # config, parameters, checkpoint bytes
    "1.5b": (R1_15B, 1_777_088_000, 3_554_214_624),
    "7b-4layers": ({**R1_7B, "num_hidden_layers": 4}, 2_022_229_504, 4_044_464_808),
    "7b": (R1_7B, 7_615_616_512, 15_231_271_832),
}
R1_15B_PARAMS = SHAPES["1.5b"][1]
MIB = 2**20

# Measured on this project's CPU (2 cores, AVX512-BF16, 24 GiB), each by
#   python scripts/bench_scale.py --size SIZE --work W --steps train --train BxL[,nockpt]
#          --max-steps 2 [--precision fp32]
# which runs `ollama-ft train --base W/SIZE/base ... --batch-size B --max-len L` (docs:
# benchmarks.md, "Real sizes"). peak: ru_maxrss of that process; anon: the largest anonymous
# resident set sampled in it. fit: the runs the constants were fitted on; the others are checks
# the constants never saw.
RECORDED = [
    dict(size="1.5b", precision="fp32", batch=1, max_len=256, ckpt=True, peak=10703.5, anon=9882.7, fit=True),
    dict(size="1.5b", precision="fp32", batch=1, max_len=256, ckpt=True, peak=10661.2, anon=9498.0, fit=True),
    dict(size="1.5b", precision="bf16", batch=2, max_len=512, ckpt=False, peak=9320.2, anon=6162.9, fit=True),
    dict(size="1.5b", precision="bf16", batch=2, max_len=1024, ckpt=True, peak=6763.2, anon=3590.4, fit=True),
    dict(size="1.5b", precision="bf16", batch=1, max_len=2048, ckpt=True, peak=5721.1, anon=2597.2, fit=False),
    dict(size="1.5b", precision="fp32", batch=1, max_len=512, ckpt=False, peak=12244.0, anon=12099.2, fit=False),
    dict(size="7b-4layers", precision="bf16", batch=1, max_len=256, ckpt=True, peak=3984.5, anon=950.9, fit=False),
    # at the 7B's width glibc keeps far less (0.6 GiB, not ~2): the plan's anonymous part is
    # 1.9x too high there (on the safe side of a fit check); the peak is within 11%
    dict(size="7b", precision="bf16", batch=1, max_len=256, ckpt=True, peak=15462.0, anon=1827.0, fit=False,
         anon_checked=False),
]


def _plan(batch, max_len, ckpt, device="cpu", precision="fp32", four_bit=False, size="1.5b"):
    from ollama_ft.memplan import Settings, plan, shape_from_config

    config, params, nbytes = SHAPES[size]
    shape = shape_from_config(config)
    shape.parameters, shape.checkpoint_bytes = params, nbytes
    return plan(shape, Settings(device, precision, batch, max_len, ckpt, four_bit, 16))


@pytest.mark.parametrize("rec", RECORDED, ids=lambda r: f"{r['size']}-{r['precision']}-{r['batch']}x"
                         f"{r['max_len']}" + ("" if r["ckpt"] else "-nockpt"))
def test_plan_within_15_percent_of_measured_peaks(rec):
    p = _plan(rec["batch"], rec["max_len"], rec["ckpt"], precision=rec["precision"], size=rec["size"])
    assert abs(p.peak / MIB - rec["peak"]) <= 0.15 * rec["peak"], (p.peak / MIB, rec)
    # the anonymous part alone: glibc's retained heaps vary by up to a GiB between runs of the
    # same shape (1.5B bf16, 2048 tokens: 3.6 and 2.6 GiB), hence the looser bound
    if rec.get("anon_checked", True):
        assert abs(p.anon / MIB - rec["anon"]) <= 0.25 * rec["anon"], (p.anon / MIB, rec)
    else:
        assert p.anon / MIB >= rec["anon"]  # never below what was measured


def test_parameter_count_from_config_is_exact(tiny_base):
    """Without the weights (a Hub id: config.json only) the count comes from the config."""
    from ollama_ft.export.merge import Checkpoint
    from ollama_ft.memplan import shape_from_config

    for family in ("r1-qwen", "r1-llama", "r1-qwen3"):
        base = tiny_base(family)
        config = json.loads((base / "config.json").read_text())
        counted = Checkpoint(base).parameter_count()
        assert shape_from_config(config).parameters == counted, family
        with_headers = shape_from_config(config, base)
        assert with_headers.parameters == counted and with_headers.exact
        assert with_headers.checkpoint_bytes > 2 * counted  # bf16 files, headers included


def test_r1_15b_shape_and_lora_size():
    from ollama_ft.memplan import shape_from_config

    for size, (config, params, _) in SHAPES.items():  # the real checkpoints' counts
        assert shape_from_config(config).parameters == params, size
    shape = shape_from_config(R1_15B)
    assert shape.lora_parameters(16, None) == 18_464_768  # PEFT's count for r=16, all linears


def test_terms_move_the_right_way():
    base = _plan(4, 1024, True)
    assert _plan(4, 1024, False).terms["activations"] > 5 * base.terms["activations"]
    assert _plan(8, 1024, True).terms["activations"] == pytest.approx(
        2 * base.terms["activations"], rel=0.01)
    bf16 = _plan(4, 1024, True, precision="bf16")
    assert bf16.terms["weights"] == base.terms["weights"] // 2
    four = _plan(4, 1024, True, device="cuda", precision="bf16", four_bit=True)
    # NF4 decoder linears; the embeddings and the head stay bf16 (train/qlora.py)
    assert 0.2 * bf16.terms["weights"] < four.terms["weights"] < 0.6 * bf16.terms["weights"]
    # fp32 from the bf16 checkpoint: a copy, made while the checkpoint's pages are mapped
    assert base.loading_peak > base.training_peak
    assert base.required == base.anon < base.loading_peak  # those pages need not fit
    # bf16 on the bf16 checkpoint: the weights are its mapped pages, not anonymous memory
    assert bf16.anon < bf16.required - 0.8 * bf16.terms["weights"]
    assert bf16.loading_peak < bf16.training_peak


def test_alternatives_fit_and_say_what_changed():
    from ollama_ft.memplan import alternatives, describe_change

    p = _plan(8, 4096, False)
    available = 12 * 2**30
    assert not p.required <= available
    alts = alternatives(p.shape, p.settings, available, four_bit_ok=False)
    assert alts and all(a.required <= available for a in alts)
    text = describe_change(p.settings, alts[0].settings, grad_accum=1)
    assert "--batch-size" in text or "--max-len" in text
    if alts[0].settings.gradient_checkpointing:
        assert "--gradient-checkpointing" in text
    if alts[0].settings.batch_size < 8:  # the same examples per optimizer step
        assert f"--grad-accum {8 // alts[0].settings.batch_size}" in text


def test_dry_run_prints_the_plan_and_trains_nothing(tiny_base, tmp_path, monkeypatch):
    from ollama_ft.cli import main
    from ollama_ft.train import trainer

    monkeypatch.setattr(trainer, "train_stage", lambda *a, **k: pytest.fail("trained"))
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS))
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--base", str(tiny_base("r1-qwen")), "--data", str(data),
                                  "--name", "plan", "--output-dir", str(out), "--batch-size", "2",
                                  "--max-len", "128", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "memory plan" in r.output and "weights" in r.output and "fits" in r.output
    assert "batch 2 x 128 tokens" in r.output
    assert not out.exists()


def test_a_run_that_cannot_fit_stops_before_loading(tiny_base, tmp_path, monkeypatch):
    from ollama_ft import memplan
    from ollama_ft.cli import main
    from ollama_ft.train import trainer

    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(memplan, "available_memory", lambda device: 2**30)
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS))
    r = CliRunner().invoke(main, ["train", "--base", str(tiny_base("r1-qwen")), "--data", str(data),
                                  "--name", "plan", "--output-dir", str(tmp_path / "run"),
                                  "--batch-size", "64", "--max-len", "4096",
                                  "--no-gradient-checkpointing"])
    assert r.exit_code != 0
    assert "memory plan" in r.output and "available" in r.output
    assert "--batch-size" in r.output  # what to change
    assert not (tmp_path / "run").exists()
