"""The LoRA dropout with a cheaper mask (train/dropout.py)."""

import torch


def test_drop_rate_scale_and_gradient():
    from ollama_ft.train.dropout import FastDropout

    torch.manual_seed(0)
    drop = FastDropout(0.05).train()
    x = torch.randn(512, 1000, requires_grad=True)
    y = drop(x)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - 0.05) < 0.003  # 512k draws
    scale = 65536 / (65536 - round(0.05 * 65536))
    assert torch.allclose(y[~dropped], x[~dropped] * scale)
    y.sum().backward()
    assert torch.equal(x.grad == 0, dropped)
    assert torch.allclose(x.grad[~dropped], torch.full_like(x.grad[~dropped], scale))
    # a fresh mask each call, and none at all in eval mode
    assert not torch.equal(drop(x) == 0, dropped)
    assert drop.eval()(x) is x


def _peft_tiny(tiny_base, dropout):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base(), dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                            target_modules=["q_proj", "v_proj", "down_proj"]))


def test_swap_keeps_the_adapter_and_replays_under_gradient_checkpointing(tiny_base):
    from ollama_ft.train.dropout import use_fast_lora_dropout
    from ollama_ft.train.loss import selective_lm_loss

    model = _peft_tiny(tiny_base, 0.3)
    keys = set(model.state_dict())
    layers = model.config.num_hidden_layers
    assert use_fast_lora_dropout(model) == 3 * layers
    assert set(model.state_dict()) == keys  # nothing new is saved with the adapter
    for name, p in model.named_parameters():  # B starts at zero: make the LoRA path matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, 1000, (2, 24))
    batch = {"input_ids": ids, "labels": ids.clone()}
    model.train()

    def grads():
        torch.manual_seed(7)
        model.zero_grad(set_to_none=True)
        selective_lm_loss(model, batch).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()  # the recomputed forward draws the same masks
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], atol=1e-6), n
    model.gradient_checkpointing_disable()
    torch.manual_seed(8)
    model.zero_grad(set_to_none=True)
    selective_lm_loss(model, batch).backward()
    other = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.allclose(plain[n], other[n]) for n in plain)  # dropout is live


def test_no_swap_without_dropout(tiny_base):
    from ollama_ft.train.dropout import use_fast_lora_dropout

    assert use_fast_lora_dropout(_peft_tiny(tiny_base, 0.0)) == 0


def test_drop_probability_next_to_one_drops_everything():
    from ollama_ft.train.dropout import FastDropout

    x = torch.randn(8, 8, requires_grad=True)
    y = FastDropout(0.999999).train()(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
