"""Ollama's formats, read and rendered the way Ollama does: a leaf library, no ollama-ft stage.

    gotemplate.py    a Go text/template interpreter for the subset Ollama's TEMPLATEs use
    prompt.py        prompts from a TEMPLATE (or a GGUF's Jinja chat template) as Ollama builds them;
                     thinking split from answers
    capabilities.py  which template renders a model and what /api/show reports, by Ollama's rules
    ggufinfo.py      what a GGUF says of itself: architecture, type, sizes, metadata, chat template

Everything above uses these (ollama/ for Modelfiles, ollama_base/ for a daemon's models, serve/
for the bridge); these import nothing of ollama-ft but errors.py, so no cycle can run through
them. Nothing heavy is imported here.
"""
