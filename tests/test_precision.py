"""--precision on the CPU: auto picks a bf16 base where the CPU computes bf16 natively and
fp32 elsewhere; the LoRA weights, their optimizer state and the loss stay fp32; fp32 is
still there when asked for."""

import json

import pytest
import torch

from ollama_ft.config import RunConfig
from ollama_ft.errors import ConfigError
from ollama_ft.train import precision as prec
from ollama_ft.train.trainer import pick_device_and_precision, train_stage
from tests.conftest import FACTS, qa_rows, write_jsonl

EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "flags\t\t: avx512f amx_bf16 amx_tile\n"
OLD_X86 = "flags\t\t: fpu sse2 avx2 avx512f\n"
GRAVITON3 = "Features\t: fp asimd sve bf16 i8mm\n"


def test_cpu_flags_tell_bf16():
    assert prec.cpu_has_bf16(EPYC) and prec.cpu_has_bf16(SAPPHIRE) and prec.cpu_has_bf16(GRAVITON3)
    assert not prec.cpu_has_bf16(OLD_X86) and not prec.cpu_has_bf16("")


@pytest.mark.parametrize("cpuinfo,auto", [(EPYC, "bf16"), (OLD_X86, "fp32")])
def test_auto_picks_bf16_only_where_the_cpu_has_it(monkeypatch, cpuinfo, auto):
    real = prec.cpu_flags
    monkeypatch.setattr(prec, "cpu_flags", lambda c=None: real(cpuinfo))
    cfg = lambda p: RunConfig(base="x", data="d.jsonl", device="cpu", precision=p)  # noqa: E731
    assert pick_device_and_precision(cfg("auto")) == ("cpu", auto)
    assert pick_device_and_precision(cfg("fp32")) == ("cpu", "fp32")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        pick_device_and_precision(cfg("fp16"))
    if auto == "fp32":
        with pytest.raises(ConfigError, match="bf16 on this CPU would be emulated"):
            pick_device_and_precision(cfg("bf16"))
    else:
        assert pick_device_and_precision(cfg("bf16")) == ("cpu", "bf16")


def _train(tiny_base, tmp_path, name, precision, **kw):
    base = tiny_base("r1-qwen", hidden=128)
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS))
    cfg = RunConfig(name=name, base=str(base), data=str(data), output_dir=str(tmp_path / name),
                    precision=precision, lr=3e-3, batch_size=4, warmup=0, logging_steps=1,
                    lora_dropout=0.0, seed=0, max_len=128, save_steps=1000, **kw).validate()
    seen = {}
    from transformers import TrainerCallback

    class Dtypes(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **_):
            if "base" in seen:
                return
            named = dict(model.named_parameters())
            seen["base"] = {p.dtype for n, p in named.items() if not p.requires_grad}
            seen["lora"] = {p.dtype for n, p in named.items() if p.requires_grad}
            seen["adam"] = {v.dtype for st in optimizer.state.values() for v in st.values()
                            if torch.is_tensor(v) and v.dim() > 0}

    train_stage(cfg, callbacks=[Dtypes()], log=lambda *a: None)
    report = json.loads((tmp_path / name / "report.json").read_text())["train"]
    losses = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text()
              .splitlines() if "loss" in json.loads(x)]
    return report, losses, seen


@pytest.mark.skipif(not prec.cpu_has_bf16(), reason="this CPU has no native bf16")
def test_bf16_base_trains_with_fp32_lora_adam_and_loss_like_fp32(tiny_base, tmp_path):
    bf16, bf16_losses, seen = _train(tiny_base, tmp_path, "b", "auto", max_steps=16)
    assert bf16["precision"] == "bf16"
    assert seen["base"] == {torch.bfloat16}  # the frozen weights: half the memory
    assert seen["lora"] == {torch.float32} and seen["adam"] == {torch.float32}
    fp32, fp32_losses, seen32 = _train(tiny_base, tmp_path, "f", "fp32", max_steps=16)
    assert fp32["precision"] == "fp32" and seen32["base"] == {torch.float32}
    assert bf16_losses[-1] < 0.7 * bf16_losses[0]  # it learns
    # the same run in the two precisions: the same curve, within bf16's rounding
    assert bf16_losses[0] == pytest.approx(fp32_losses[0], rel=0.02)
    assert bf16_losses[-1] == pytest.approx(fp32_losses[-1], rel=0.25, abs=0.05)
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
