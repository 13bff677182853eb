"""The chat format of a base taken from an Ollama daemon (its TEMPLATE, with the BOS/EOS the
daemon's llama.cpp uses); hub.resolve_base makes the ResolvedBase of `--base ollama:NAME`.

A run trained on such a base records the base (`report.json` train.ollama_base); `of_run`
gives it back, with the chat format, to the stages that follow (export, Modelfile, register,
eval)."""

from __future__ import annotations

from pathlib import Path

from ollama_ft.ollama.daemon import OllamaBase
from ollama_ft.ollama_base.chat import TemplateFormat, template_format
from ollama_ft.run import Run


def special_texts(gguf_path: str | Path) -> tuple[str, str, str]:
    """(BOS text if llama.cpp adds BOS to a prompt of this GGUF else "", EOS text, BOS text),
    as the daemon's llama.cpp decides them."""
    import llama_cpp

    from ollama_ft.llamacpp import open_gguf

    llm = open_gguf(gguf_path, vocab_only=True, verbose=False)
    try:
        vocab = llm._model.vocab

        def text(tok: int) -> str:
            if tok < 0:
                return ""
            return llama_cpp.llama_vocab_get_text(vocab, tok).decode("utf-8", errors="replace")

        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        bos = text(llama_cpp.llama_vocab_bos(vocab))
        return (bos if add_bos else ""), text(llama_cpp.llama_vocab_eos(vocab)), bos
    finally:
        llm.close()


def chat_format_of(ob: OllamaBase) -> TemplateFormat:
    bos, eos, bos_token = special_texts(ob.blob)
    return template_format(ob.name, ob.template, ob.stops(), ob.system, bos, eos, bos_token)


def of_run(run) -> tuple[OllamaBase, TemplateFormat] | None:
    """The Ollama base of a run (a Run or its folder: what train recorded, Run.ollama_base) and
    its chat format; None when the run's base is not an Ollama model."""
    raw = Run.open(run).ollama_base
    if not raw:
        return None
    ob = OllamaBase.from_json(raw)
    fmt = template_format(ob.name, ob.template, ob.stops(), ob.system, raw.get("bos_text", ""),
                          raw.get("eos_text", ""), raw.get("bos_token", ""))
    return ob, fmt


def report_entry(base) -> dict | None:
    """What train writes into report.json for an Ollama base (None for other bases)."""
    ob = getattr(base, "ollama", None)
    if ob is None:
        return None
    fmt = base.chat_format
    return {**ob.to_json(), "bos_text": fmt.bos, "eos_text": fmt.eos, "bos_token": fmt.bos_token}
