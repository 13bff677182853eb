"""A GGUF file through llama.cpp (llama-cpp-python): the held-out loss of given token ids
and greedy answers, i.e. the model as Ollama will run it."""

from __future__ import annotations

from pathlib import Path

from ollama_ft.data.tokenize import IGNORE
from ollama_ft.errors import OllamaFtError


class GGUFModel:
    def __init__(self, path: Path, n_ctx: int, threads: int | None = None,
                 lora_path: Path | None = None):
        import os

        from ollama_ft.llamacpp import open_gguf

        self.path = Path(path)
        try:
            self.llm = open_gguf(path, n_ctx=n_ctx, logits_all=True, verbose=False,
                                 n_threads=threads or os.cpu_count(), seed=0,
                                 lora_path=str(lora_path) if lora_path else None)
        except Exception as e:
            raise OllamaFtError(f"{path}: llama.cpp could not load it ({e}); re-export the run "
                                "with `ollama-ft export RUN`") from None

    def close(self):
        self.llm.close()

    def token_nll(self, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
        """(sum of -log p(label) over the labelled positions, their count), with the same
        shift as training: the logits at t predict the token at t + 1."""
        import numpy as np

        llm = self.llm
        llm.reset()
        llm.eval(input_ids)
        at = np.array([t for t in range(1, len(input_ids)) if labels[t] != IGNORE], dtype=np.int64)
        if not len(at):
            return 0.0, 0
        rows = np.asarray(llm.scores[at - 1], dtype=np.float64)  # only the labelled positions
        peak = rows.max(axis=1)
        logz = peak + np.log(np.exp(rows - peak[:, None]).sum(axis=1))
        target = rows[np.arange(len(at)), np.asarray(labels, dtype=np.int64)[at]]
        return float((logz - target).sum()), int(len(at))

    def greedy(self, prompt_ids: list[int], stops: tuple[str, ...], max_new_tokens: int) -> str:
        """The greedy continuation (argmax each step, as llama.cpp's top_k=1 sampler) as
        text, ended at the end-of-generation token or at a stop marker."""
        import llama_cpp
        import numpy as np

        llm = self.llm
        llm.reset()
        llm.eval(prompt_ids)
        out: list[int] = []
        text = ""
        for _ in range(max_new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                break
            out.append(token)
            text = llm.detokenize(out, special=True).decode("utf-8", errors="ignore")
            cut = min((text.find(s) for s in stops if s and s in text), default=-1)
            if cut >= 0:
                return text[:cut]
            llm.eval([token])
        return text
