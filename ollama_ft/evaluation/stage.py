"""`ollama-ft eval RUN`: held-out loss and perplexity of the base and of the fine-tune,
computed by llama.cpp on the exported GGUF files (base-<q>.gguf, model-<q>.gguf: the
models as Ollama runs them), and their greedy answers to the same prompts, scored by exact
match and ROUGE-L. Written to report.json ("eval"), eval.md, eval.jsonl and eval.png.

The held-out examples are `--eval-data`, else the run's eval_data, else its eval_split of
the training data (the same examples training held out: data/split.py)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ollama_ft.errors import ConfigError, OllamaFtError
from ollama_ft.run import Run

DEFAULT_MAX_NEW_TOKENS = 128


def held_out(run: Run, eval_data, tokenizer, fmt, limit: int | None):
    """(examples, encoded, where they come from) of the held-out set."""
    from ollama_ft.data.check import check_data
    from ollama_ft.data.split import eval_indices

    cfg = run.settings
    max_len = int(cfg.get("max_len") or 2048)
    shape = cfg.get("format")
    source_file = eval_data or cfg.get("eval_data")
    if source_file:
        examples, encoded, _ = check_data(source_file, tokenizer, fmt, max_len, shape)
        source = f"{Path(source_file).name}"
    elif cfg.get("eval_split"):
        if not cfg.get("data"):
            raise ConfigError(f"{run.path('config')}: no data file to take the "
                              "eval split from; pass --eval-data FILE")
        examples, encoded, _ = check_data(cfg["data"], tokenizer, fmt, max_len, shape)
        keep = eval_indices(len(encoded), float(cfg["eval_split"]), int(cfg.get("seed") or 0))
        examples = [e for i, e in enumerate(examples) if i in keep]
        encoded = [e for i, e in enumerate(encoded) if i in keep]
        source = f"eval_split {cfg['eval_split']} of {Path(cfg['data']).name}"
    else:
        raise ConfigError(f"{run.dir}: nothing to evaluate on: the run has no eval split and "
                          "no eval data. Pass --eval-data FILE (held-out examples in the "
                          "training data's format), or train with --eval-split 0.1")
    if limit:
        examples, encoded = examples[:limit], encoded[:limit]
    return examples, encoded, source


def _pick_quant(run: Run, quant: str | None) -> str:
    """--quant, else the quant the run is served as (what register sends to Ollama)."""
    from ollama_ft.quants import parse_quants, quant_names

    quant = parse_quants(quant or quant_names(run.served_quant())[0])[0].name
    if not run.gguf(quant).is_file():
        raise OllamaFtError(f"{run.gguf(quant)}: not exported; run `ollama-ft export "
                            f"{run.dir} --quant {quant}` first (eval measures the GGUF files)")
    return quant


def eval_stage(run, eval_data: str | None = None, quant: str | None = None,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, limit: int | None = None,
               log=print, progress: bool = True, threads: int | None = None) -> dict:
    from transformers import AutoTokenizer

    from ollama_ft.chat_formats import FORMATS
    from ollama_ft.data.tokenize import encode_prompt
    from ollama_ft.evaluation.gguf_model import GGUFModel
    from ollama_ft.evaluation.report import plot, write_markdown
    from ollama_ft.export.stage import read_run

    t0 = time.perf_counter()
    info = read_run(run)
    run = info.run
    run_dir = run.dir
    from ollama_ft.ollama_base.resolve import of_run

    ollama = of_run(run)
    fmt = ollama[1] if ollama else FORMATS[info.chat_format]
    tokenizer = AutoTokenizer.from_pretrained(info.base_path)
    examples, encoded, source = held_out(run, eval_data, tokenizer, fmt, limit)
    lora = None
    if ollama:  # the daemon's blob, and the fine-tune as the daemon runs it: blob + adapter
        q, base_path, fine_path, lora = _ollama_files(run, ollama[0], log)
    else:
        q = _pick_quant(run, quant)
        fine_path, base_path = run.gguf(q), run.gguf(q, base=True)
    if not base_path.is_file():
        from ollama_ft.export import export_base_gguf

        log(f"writing {base_path.name} (the base, for comparison) ...")
        export_base_gguf(run, q, log=log)
    log(f"eval: {len(examples)} examples ({source}), {q}, through llama.cpp")

    prompts, refs = [], []
    for ex in examples:
        last = max(i for i, m in enumerate(ex.messages) if m.role == "assistant")
        msgs = ex.messages[:last] + [m for m in ex.messages[last:] if m.role == "system"]
        prompts.append(encode_prompt(tokenizer, fmt, msgs))
        refs.append((msgs[-1].content if msgs and msgs[-1].role == "user" else "",
                     ex.messages[last].content))
    n_ctx = max(max(len(e.input_ids) for e in encoded), max(len(p) for p in prompts) + max_new_tokens) + 8
    results, answers = {}, {}
    for key, path in (("base", base_path), ("fine_tuned", fine_path)):
        model = GGUFModel(path, n_ctx, threads, lora_path=lora if key == "fine_tuned" else None)
        results[key], answers[key] = _score(model, encoded, prompts, refs, fmt, max_new_tokens,
                                            _bar(len(examples), f"eval {key.replace('_', '-')}",
                                                 progress))
        r = results[key]
        log(f"  {key.replace('_', '-'):>10}: loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}"
            f"  exact match {r['exact_match']:.1%}  ROUGE-L {r['rouge_l']:.3f}  "
            f"BLEU-4 {r['bleu_4']:.3f}")
    rows = [{"question": question, "expected": expected, "base": b, "fine_tuned": f}
            for (question, expected), b, f in zip(refs, answers["base"], answers["fine_tuned"])]
    result = {**results, "run": info.name, "quant": q, "source": source, "count": len(examples),
              "files": {"base": base_path.name,
                        "fine_tuned": fine_path.name + (f" + {lora.name}" if lora else "")},
              "max_new_tokens": max_new_tokens, "runtime_s": round(time.perf_counter() - t0, 2)}
    with open(run_dir / "eval.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    write_markdown(run_dir / "eval.md", result, rows)
    plot(run_dir / "eval.png", result)
    run.record("eval", result)
    log(f"eval: {run_dir / 'eval.md'}  picture: {run_dir / 'eval.png'}")
    return result


def _score(model, encoded, prompts, refs, fmt, max_new_tokens: int, bar) -> tuple[dict, list]:
    """One model's held-out loss (teacher-forced, on the trained tokens) and its greedy answers
    scored against the references; closes the model and the progress bar."""
    from ollama_ft.evaluation.metrics import answer_of, bleu_4, exact_match, rouge_l

    nll = count = em = rl = 0.0
    outs = []
    try:
        for enc, prompt, (_, expected) in zip(encoded, prompts, refs):
            s, c = model.token_nll(enc.input_ids, enc.labels)
            nll, count = nll + s, count + c
            got = answer_of(model.greedy(prompt, fmt.stops, max_new_tokens), fmt.thinking)
            outs.append(got)
            em += exact_match(got, expected)
            rl += rouge_l(got, expected)
            bar.update(1)
    finally:
        bar.close()
        model.close()
    loss, n = nll / max(count, 1), len(encoded)
    return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 700)), 4),
            "exact_match": round(em / n, 4), "rouge_l": round(rl / n, 4),
            "bleu_4": round(bleu_4(outs, [r[1] for r in refs]), 4),
            "count": n, "tokens": int(count)}, outs


def _ollama_files(run: Run, ob, log) -> tuple[str, Path, Path, Path | None]:
    """(quant, base GGUF, fine-tune GGUF, its adapter or None) of a run on an Ollama base:
    the merged model-<quant>.gguf when the run registered one, else the blob + adapter.gguf."""
    blob = Path(ob.blob)
    if not blob.is_file():
        raise OllamaFtError(f"{blob}: the base {ob.name}'s GGUF is no longer in the daemon's store")
    merged = run.gguf(ob.quant)
    if run.register.get("adapter") is None and merged.is_file():
        return ob.quant.lower(), blob, merged, None
    adapter = run.adapter_gguf
    if not adapter.is_file():
        raise OllamaFtError(f"{adapter}: not exported; run `ollama-ft export {run.dir}` first")
    return ob.quant.lower(), blob, blob, adapter


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="example", disable=not enabled or total < 2,
                leave=False)
