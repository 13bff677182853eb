"""Answer metrics: exact match, ROUGE-L (Google's rouge-score package) and corpus BLEU-4
(sacrebleu), the answer taken from a generation the way Ollama shows it (reasoning split off
at </think>)."""

from __future__ import annotations

import re

# words, and CJK characters one by one: rouge-score's default tokenizer keeps only [a-z0-9]
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+", re.UNICODE)


class _Tokenizer:
    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


_scorer = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of prediction against reference (0..1)."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())
    return _scorer.score(reference, prediction)["rougeL"].fmeasure


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def answer_of(generated: str, thinking: bool) -> str:
    """The content of a generation: after the closing </think> when the format thinks."""
    if thinking and "</think>" in generated:
        generated = generated.rsplit("</think>", 1)[1]
    return generated.strip()


def bleu_4(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 (sacrebleu's standard 13a tokenisation, exponential smoothing), 0..1."""
    import sacrebleu

    if not predictions:
        return 0.0
    return sacrebleu.corpus_bleu(predictions, [references]).score / 100.0
