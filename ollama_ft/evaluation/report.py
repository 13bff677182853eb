"""What `ollama-ft eval` writes: eval.md (figures and answers side by side) and eval.png."""

from __future__ import annotations

from pathlib import Path

SHOWN_ANSWERS = 20
METRICS = (("loss", "held-out loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
           ("exact_match", "exact match", "{:.1%}"), ("rouge_l", "ROUGE-L", "{:.3f}"),
           ("bleu_4", "BLEU-4", "{:.3f}"))


def write_markdown(path: Path, result: dict, answers: list[dict]) -> Path:
    b, f = result["base"], result["fine_tuned"]
    lines = [f"# Evaluation of {result['run']}", "",
             f"{result['count']} examples ({result['source']}), through llama.cpp on "
             f"`{result['files']['base']}` and `{result['files']['fine_tuned']}`; answers are "
             "greedy.", "", "| | base | fine-tuned |", "|---|---:|---:|"]
    for key, label, fmt in METRICS:
        if key in b and key in f:
            lines.append(f"| {label} | {fmt.format(b[key])} | {fmt.format(f[key])} |")
    lines += ["", f"## Answers (first {min(SHOWN_ANSWERS, len(answers))} of {len(answers)})", "",
              "| question | expected | base | fine-tuned |", "|---|---|---|---|"]
    for a in answers[:SHOWN_ANSWERS]:
        cells = [a["question"], a["expected"], a["base"], a["fine_tuned"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def plot(path: Path, result: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, f = result["base"], result["fine_tuned"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.6), dpi=110,
                                   gridspec_kw={"width_ratios": [1, 2]})
    colors = ("#999999", "#1f77b4")
    bars = ax1.bar(["base", "fine-tuned"], [b["loss"], f["loss"]], color=colors)
    ax1.bar_label(bars, fmt="%.3f")
    ax1.set_title("loss at the answers (lower is better)")
    keys = [k for k in ("exact_match", "rouge_l", "bleu_4") if k in b and k in f]
    x = range(len(keys))
    w = 0.38
    for i, (name, r) in enumerate((("base", b), ("fine-tuned", f))):
        vals = [r[k] for k in keys]
        bars = ax2.bar([k + (i - 0.5) * w for k in x], vals, w, label=name, color=colors[i])
        ax2.bar_label(bars, fmt="%.2f")
    ax2.set_xticks(list(x), [{"exact_match": "exact match", "rouge_l": "ROUGE-L",
                              "bleu_4": "BLEU-4"}[k] for k in keys])
    ax2.set_ylim(0, 1.1)
    ax2.set_title(f"greedy answers, {result['count']} examples")
    ax2.legend(loc="upper left")
    fig.suptitle(f"{result['run']}: base vs fine-tuned ({result['quant']}, llama.cpp)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
