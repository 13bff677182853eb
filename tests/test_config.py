"""RunConfig from YAML and flags: flags win, bad keys and values are named."""

import pytest

from ollama_ft.config import build_config, load_yaml
from ollama_ft.errors import ConfigError

REQ = dict(name="x", base="b", data="d.jsonl")


def test_yaml_then_flags(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("name: x\nbase: b\ndata: d.jsonl\nlr: 2e-4\nlora_r: 8\nlora-alpha: 16\n"
                 "lora_targets: q_proj,v_proj\n")
    cfg = build_config(str(f), lora_r=32)
    assert (cfg.lr, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets) == (2e-4, 32, 16, ["q_proj", "v_proj"])
    assert str(cfg.run_dir) == "runs/x"


def test_unknown_key_suggests(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("name: x\nlearning_rat: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rat'"):
        load_yaml(f)
    f.write_text("name: x\nlora_rr: 1\n")
    with pytest.raises(ConfigError, match="did you mean 'lora_r'"):
        load_yaml(f)


def test_wrong_types_and_values(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("batch_size: four\n")
    with pytest.raises(ConfigError, match=r"run.yaml: 'batch_size' has the wrong type"):
        load_yaml(f)
    f.write_text("name: [x\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: invalid YAML"):
        load_yaml(f)
    with pytest.raises(ConfigError, match="'eval_split' must be a fraction"):
        build_config(None, **REQ, eval_split=1.5)
    with pytest.raises(ConfigError, match="'data' is required"):
        build_config(None, name="x", base="b")
    with pytest.raises(ConfigError, match="'scheduler' must be one of"):
        build_config(None, **REQ, scheduler="zigzag")
    with pytest.raises(ConfigError, match="name 'my model' must"):
        build_config(None, name="my model", base="b", data="d")
