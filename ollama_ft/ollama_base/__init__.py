"""Bases that are models of an Ollama daemon (`--base ollama:NAME`)."""
