"""Open WebUI integration: the trainer Pipe (pipe.py, a Function Open WebUI loads) and its
installer (install.py, `ollama-ft openwebui install`)."""
