"""Packing and the selective loss change the speed, not the result."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ollama_ft.chat_formats import FORMATS, Message
from ollama_ft.data.tokenize import encode
from ollama_ft.train.loss import selective_lm_loss
from ollama_ft.train.packing import PackedCollator, pack
from ollama_ft.train.trainer import Collator
from tests.conftest import FACTS


def examples(tok):
    fmt = FORMATS["deepseek-r1"]
    out = []
    for q, a in FACTS:
        e = encode(tok, fmt, [Message("user", q), Message("assistant", a)], None)
        out.append({"input_ids": e.input_ids, "labels": e.labels})
    return out


def test_pack_fills_rows_and_restarts_positions():
    ex = [{"input_ids": [1] * n, "labels": [5] * n} for n in (5, 3, 4, 2, 6)]
    rows = pack(ex, 8)
    assert sorted(len(r["input_ids"]) for r in rows) == [4, 8, 8]  # 6+2, 5+3, 4: first fit decreasing
    assert sum(len(r["input_ids"]) for r in rows) == 20
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert all(r["labels"][i] == -100 for i in starts)  # no target across examples


def test_packed_examples_see_only_themselves_and_the_loss_is_the_same(tiny_base):
    path = tiny_base("r1-qwen")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ex = examples(tok)
    with torch.no_grad():
        # reference: each example alone, the stock loss over full-vocabulary logits
        padded = Collator(tok.eos_token_id)(ex)
        stock = model(**padded).loss
        packed = PackedCollator(tok.eos_token_id)(pack(ex, 4096))
        assert packed["input_ids"].shape[0] == 1  # all four in one row
        packed.pop("num_real_tokens")
        ours = selective_lm_loss(model, packed)
        assert torch.allclose(ours, stock, atol=1e-5), (ours, stock)
        # hidden states of an example inside the row equal those of the example alone
        row = model.model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                          use_cache=False).last_hidden_state[0]  # no cache: the packed-mask path
        offset = 0
        for e in ex:
            alone = model.model(input_ids=torch.tensor([e["input_ids"]])).last_hidden_state[0]
            n = len(e["input_ids"])
            assert torch.allclose(row[offset:offset + n], alone, atol=1e-5)
            offset += n


def test_chunked_cross_entropy_matches_plain_loss_and_gradients():
    import torch.nn.functional as F

    from ollama_ft.train import loss as L

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 1000, bias=False)
    head2 = torch.nn.Linear(32, 1000, bias=False)
    head2.weight.data.copy_(head.weight.data)
    h1 = torch.randn(77, 32, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    t = torch.randint(0, 1000, (77,))
    old = L.CHUNK_ELEMENTS
    L.CHUNK_ELEMENTS = 20 * 1000  # several chunks, the last one short
    try:
        ours = L.linear_cross_entropy_sum(h1, head, t)
        with torch.no_grad():  # evaluation: the loss alone, no gradient work
            assert torch.allclose(L.linear_cross_entropy_sum(h1, head, t), ours)
    finally:
        L.CHUNK_ELEMENTS = old
    plain = F.cross_entropy(head2(h2), t, reduction="sum")
    assert torch.allclose(ours, plain, rtol=1e-5)
    (ours * 0.5).backward()  # the gradients are computed in the forward, scaled here
    (plain * 0.5).backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6)
    assert torch.allclose(head.weight.grad, head2.weight.grad, atol=1e-6)
    assert (h1.grad != 0).any() and (head.weight.grad != 0).any()


def test_chunked_cross_entropy_with_frozen_head_leaves_it_without_gradient():
    import torch.nn.functional as F

    from ollama_ft.train import loss as L

    torch.manual_seed(1)
    head = torch.nn.Linear(16, 300, bias=False).requires_grad_(False)
    h = torch.randn(10, 16, requires_grad=True)
    t = torch.randint(0, 300, (10,))
    L.linear_cross_entropy_sum(h, head, t).backward()
    (plain,) = torch.autograd.grad(F.cross_entropy(head(h), t, reduction="sum"), [h])
    assert head.weight.grad is None
    assert torch.allclose(h.grad, plain, atol=1e-6)


def test_chunked_cross_entropy_in_bf16_keeps_the_gradient_of_confident_tokens():
    """bf16 (the GPU default): softmax - onehot is formed in fp32 before the matmul, and the
    incoming gradient (1/n, a loss scale) is applied before rounding to bf16."""
    import torch.nn.functional as F

    from ollama_ft.train import loss as L

    torch.manual_seed(2)
    w = torch.randn(500, 64) * 0.5
    h = torch.randn(40, 64)
    t = (h @ w.t()).argmax(1)
    h = h * 4  # the targets get probabilities near 1: small, easily cancelled gradients
    hb = h.to(torch.bfloat16).requires_grad_(True)
    head = torch.nn.Linear(64, 500, bias=False).to(torch.bfloat16).requires_grad_(False)
    head.weight.data.copy_(w)
    (L.linear_cross_entropy_sum(hb, head, t) / 3).backward()
    # reference: fp32 math on the same bf16 values; and the usual bf16 autograd path
    hr = hb.detach().float().requires_grad_(True)
    (F.cross_entropy(hr @ head.weight.float().t(), t, reduction="sum") / 3).backward()
    hs = hb.detach().clone().requires_grad_(True)
    (F.cross_entropy((hs @ head.weight.t()).float(), t, reduction="sum") / 3).backward()

    def err(g):
        return ((g.float() - hr.grad).norm(dim=1) / hr.grad.norm(dim=1)).max()

    assert hb.grad.dtype == torch.bfloat16
    # no worse than plain bf16 autograd (rounding softmax @ W to bf16 first was 3x worse)
    assert err(hb.grad) <= 1.25 * err(hs.grad), (err(hb.grad), err(hs.grad))


def _first_fit_reference(lengths, max_len):
    """The plain first-fit-decreasing that pack_rows must reproduce row for row."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows, room = [], []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_len - lengths[i])
    return [sorted(r) for r in rows]


def test_pack_rows_is_first_fit_decreasing_row_for_row():
    import random

    from ollama_ft.train.packing import pack_rows

    rng = random.Random(0)
    for n, max_len in ((1, 8), (7, 8), (300, 64), (2000, 512)):
        lengths = [rng.randint(1, max_len) if rng.random() < 0.2 else rng.randint(1, max_len // 4)
                   for _ in range(n)]
        got = [r.tolist() for r in pack_rows(lengths, max_len)]
        assert got == _first_fit_reference(lengths, max_len)
        assert all(sum(lengths[i] for i in r) <= max_len for r in got)


def test_packed_dataset_reads_the_rows_pack_makes_from_the_store(tiny_base, tmp_path, monkeypatch):
    """Training packs from the memory-mapped store: the same rows as pack() on lists."""
    import numpy as np

    from ollama_ft.data.check import check_data
    from ollama_ft.train.dataset import PackedDataset, TokenDataset
    from tests.conftest import qa_rows, write_jsonl

    monkeypatch.setenv("OLLAMA_FT_CACHE", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(tiny_base("r1-qwen"))
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS + [(q + "?", a * 3) for q, a in FACTS]))
    _, store, _ = check_data(data, tok, FORMATS["deepseek-r1"], 48)
    assert isinstance(store._ids, np.memmap)  # the tokens stay on disk
    lists = [{"input_ids": e.input_ids, "labels": e.labels} for e in store]
    ds = PackedDataset(store, 48)
    ref = pack(lists, 48)
    assert len(ds) == len(ref) > 1
    for i, row in enumerate(ref):
        got = ds[i]
        assert {k: v.tolist() for k, v in got.items()} == row
    view = store.select([5, 0, 2])
    plain = TokenDataset(view)
    assert [plain[i]["input_ids"].tolist() for i in range(3)] == [lists[5]["input_ids"],
                                                                  lists[0]["input_ids"],
                                                                  lists[2]["input_ids"]]
    batch = PackedCollator(0)([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 2 and int(batch["num_real_tokens"]) == sum(
        len(ds[i]["input_ids"]) for i in range(2))
