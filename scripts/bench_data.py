#!/usr/bin/env python
"""`ollama-ft data check` at scale, against what peers do first.

Makes a file of two-turn conversations (300,000 by default: about 215 MB, one JSON object a
line, in the OpenAI `messages` shape), a base around the real DeepSeek-R1-Distill-Qwen
tokenizer, and measures, each in its own process:

  first    `ollama-ft data check FILE --base BASE` with an empty token cache (builds the store)
  second   the same command again (finds the store)
  anchor   HF datasets: load_dataset("json") + map(apply_chat_template + tokenize,
           num_proc=2) into Arrow, with an empty datasets cache  (pip install datasets)
  train    what training holds before its first step: the store of the check, the eval
           split, the packed rows (train/dataset.py), as `ollama-ft train` builds them
  arrow    (optional) random reads from the store against the same data as an Arrow file

Reported: wall time, peak RSS of the largest process (what /usr/bin/time -v calls maximum
resident set size: ru_maxrss of the child and its descendants) and the peak of the sum of
the RSS of the whole process tree (sampled every 0.1 s: the worker processes together).

    python scripts/bench_data.py                       # 300k conversations
    python scripts/bench_data.py --examples 20000 --runs first,second
    python scripts/bench_data.py --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = (
    "the of and to in is that it for was on are as with his they at be this from have or by "
    "one had not but what all were when we there can an your which their said if do will each "
    "about how up out them then she many some so these would other into has more her two like "
    "him see time could no make than first been its who now people my made over did down only "
    "way find use may water long little very after words called just where most know get "
    "through back much before go good new write our used me man too any day same right look "
    "think also around another came come work three word must because does part even place well "
    "such here take why things help put years different away again off went old number great "
    "tell men say small every found still between name should home big give air line set own "
    "under read last never us left end along while might next sound below saw something thought "
    "both few those always looked show large often together asked house world going want school "
    "important until form food keep children feet land side without boy once animals life "
    "enough took sometimes four head above kind began almost live page got earth need far hand "
    "high year mother light parts country father let night following picture being study second "
    "eyes soon times story boys since white days ever paper hard near sentence better best "
    "across during today others however sure means knew try told young miles sun ways thing "
    "whole hear example heard several change answer room sea against top turned learn point city "
    "play toward five using himself usually").split()
TOKENIZER = "deepseek-r1-distill-qwen-7b"


def make_data(path: Path, n: int, seed: int = 0) -> None:
    """n two-turn conversations (user, assistant, user, assistant), all different."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            turns = [words(rng.randint(6, 18)).capitalize() + "?",
                     words(rng.randint(20, 70)).capitalize() + ".",
                     words(rng.randint(4, 14)).capitalize() + "?",
                     words(rng.randint(15, 60)).capitalize() + f" ({i})."]
            f.write(json.dumps({"messages": [{"role": r, "content": c} for r, c in
                                             zip(("user", "assistant") * 2, turns)]}) + "\n")
    tmp.rename(path)


def measure(cmd: list[str], env: dict) -> dict:
    """Run cmd; wall time, ru_maxrss of it and its descendants, peak RSS sum of the tree."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_tree, done = [0], threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak_tree[0] = max(peak_tree[0], total)
            except psutil.Error:
                pass
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = [], []
    readers = [threading.Thread(target=lambda: out.append(proc.stdout.read())),
               threading.Thread(target=lambda: err.append(proc.stderr.read()))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[0][-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "peak_tree_rss_mb": round(peak_tree[0] / 2**20), "stdout": out[0]}


def anchor(data: str, base: str) -> None:
    """What peers do first: datasets.map with the chat template and the tokenizer."""
    import pyarrow.compute as pc
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)

    def tokenize(example):
        text = tok.apply_chat_template(example["messages"], tokenize=False)
        return {"input_ids": tok(text, add_special_tokens=False)["input_ids"]}

    ds = load_dataset("json", data_files=data, split="train")
    ds = ds.map(tokenize, num_proc=2, remove_columns=ds.column_names)
    tokens = pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py()
    print(json.dumps({"rows": len(ds), "tokens": tokens}))


def train_start(data: str, base: str) -> None:
    """The data side of `ollama-ft train` up to its first step, on the store of the check."""
    import resource

    import psutil

    from ollama_ft.config import RunConfig
    from ollama_ft.hub import resolve_base
    from ollama_ft.train.dataset import PackedDataset
    from ollama_ft.train.trainer import load_tokenizer, prepare_data

    cfg = RunConfig(name="bench", base=base, data=data, eval_split=0.01, max_len=2048).validate()
    resolved = resolve_base(base, log=lambda *a: None)
    tok = load_tokenizer(resolved, cfg)
    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    train, held, _, _ = prepare_data(cfg, resolved, tok, log=lambda *a: None)
    rows = PackedDataset(train, cfg.max_len)
    eval_rows = PackedDataset(held, cfg.max_len)
    first = rows[0]  # a batch's row, read from the store
    print(json.dumps({"examples": len(train), "rows": len(rows), "eval_rows": len(eval_rows),
                      "prepare_and_pack_s": round(time.perf_counter() - t0, 1),
                      "rss_added_mb": round((psutil.Process().memory_info().rss - before) / 2**20),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "row_tokens": len(first["input_ids"])}))


def store_vs_arrow(cache: str) -> None:
    """Random reads of examples from the token store (numpy memmap) and from the same data
    as a memory-mapped Arrow IPC file (list<uint32> ids, list<uint8> targets)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from ollama_ft.data.store import TokenStore

    store = TokenStore(next(p.parent for p in Path(cache).glob("tokens/*/meta.json")))
    offsets = np.append(np.asarray(store._index[:, 0]), store.meta["tokens"]).astype(np.int64)
    table = pa.table({"input_ids": pa.LargeListArray.from_arrays(offsets, np.asarray(store._ids)),
                      "trained": pa.LargeListArray.from_arrays(offsets, np.asarray(store._trained))})
    path = Path(cache) / "store.arrow"
    with ipc.new_file(path, table.schema) as w:
        w.write_table(table)
    mapped = ipc.open_file(pa.memory_map(str(path))).read_all()
    picks = np.random.default_rng(0).integers(0, len(store), 20000).tolist()
    t0 = time.perf_counter()
    for i in picks:
        store.arrays(i)
    t1 = time.perf_counter()
    ids_col, trained_col = mapped.column("input_ids"), mapped.column("trained")
    for i in picks:
        ids = np.asarray(ids_col[i].values, dtype=np.int64)
        np.where(np.asarray(trained_col[i].values) != 0, ids, -100)
    t2 = time.perf_counter()
    size = sum(f.stat().st_size for f in store.dir.iterdir())
    print(json.dumps({"memmap_us": round(1e6 * (t1 - t0) / len(picks), 1),
                      "arrow_us": round(1e6 * (t2 - t1) / len(picks), 1),
                      "store_mb": round(size / 1e6), "arrow_mb": round(path.stat().st_size / 1e6)}))
    path.unlink()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=300_000)
    ap.add_argument("--work", help="keep the data, base and caches here (default: a temp dir)")
    ap.add_argument("--runs", default="first,second,anchor,train")
    ap.add_argument("--markdown", help="append the table to this file")
    ap.add_argument("--anchor", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--train-start", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--store-vs-arrow", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.anchor:
        return anchor(*args.anchor)
    if args.train_start:
        return train_start(*args.train_start)
    if args.store_vs_arrow:
        return store_vs_arrow(args.store_vs_arrow)

    # this process stays small: a child's peak RSS counts its parent's at the fork (Linux
    # carries the high-water mark of the forked memory over the exec), so nothing heavy is
    # imported here
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"conversations-{args.examples}.jsonl"
    if not data.is_file():
        print(f"writing {data} ...", flush=True)
        make_data(data, args.examples)
    base = work / "base"
    if not (base / "config.json").is_file():
        subprocess.run([sys.executable, "-c", "import sys; from ollama_ft.tinymodel import "
                        "build_tiny_model; build_tiny_model(sys.argv[1], sys.argv[2])", str(base),
                        TOKENIZER], check=True, capture_output=True)
    size_mb = data.stat().st_size / 1e6
    cache = work / "cache"  # emptied before `first`; kept for the runs after it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OLLAMA_FT_CACHE": str(cache),
           "HF_DATASETS_CACHE": str(work / "datasets-cache"), "HF_HOME": str(work / "hf-home")}
    check = [str(Path(sys.executable).parent / "ollama-ft"), "data", "check", str(data),
             "--base", str(base), "--json"]
    me = [sys.executable, __file__]
    results = {}
    load = os.getloadavg()[0]
    for run in args.runs.split(","):
        if run in ("first", "second"):
            if run == "first":
                shutil.rmtree(cache, ignore_errors=True)
            r = measure(check, env)
            report = json.loads(r.pop("stdout"))
            r["note"] = (f"{report['kept']} kept, {report['trained_tokens']:,} trained tokens, "
                         f"p50 {report['token_lengths']['p50']} tokens")
        elif run == "anchor":
            shutil.rmtree(work / "datasets-cache", ignore_errors=True)
            r = measure(me + ["--anchor", str(data), str(base)], env)
            out = json.loads(r.pop("stdout").strip().splitlines()[-1])
            r["note"] = f"{out['rows']} rows, {out['tokens']:,} tokens"
        elif run == "train":
            r = measure(me + ["--train-start", str(data), str(base)], env)
            out = json.loads(r.pop("stdout").strip().splitlines()[-1])
            r["note"] = (f"{out['examples']} examples in {out['rows']} rows of 2048 "
                         f"(+{out['eval_rows']} eval rows): prepare + pack "
                         f"{out['prepare_and_pack_s']} s, +{out['rss_added_mb']} MB RSS")
        elif run == "arrow":
            r = measure(me + ["--store-vs-arrow", str(cache)], env)
            out = json.loads(r.pop("stdout").strip().splitlines()[-1])
            r["note"] = (f"random example reads: {out['memmap_us']} µs from the store's memmap, "
                         f"{out['arrow_us']} µs from an Arrow IPC file of the same data; "
                         f"{out['store_mb']} MB against {out['arrow_mb']} MB on disk")
        else:
            raise SystemExit(f"unknown run {run!r}")
        results[run] = r
        print(f"{run}: {r}", flush=True)
    lines = [f"### data check: {args.examples:,} two-turn conversations ({size_mb:.0f} MB), "
             f"{os.cpu_count()} CPUs, load average {load:.1f} at the start", "",
             "| run | wall (s) | peak RSS, largest process (MB) | peak RSS, all processes (MB) | |",
             "|---|---:|---:|---:|---|"]
    names = {"first": "`ollama-ft data check` (builds the token store)",
             "second": "`ollama-ft data check` again (reuses it)",
             "anchor": "HF datasets `load_dataset` + `map(apply_chat_template, tokenize, num_proc=2)`",
             "train": "train start on the store: eval split + packing (no model)",
             "arrow": "the store's format against Arrow (after `first`)"}
    for run, r in results.items():
        lines.append(f"| {names[run]} | {r['wall_s']} | {r['peak_rss_mb']} | "
                     f"{r['peak_tree_rss_mb']} | {r['note']} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
