"""`ollama-ft serve`: the bridge service speaking the Ollama API."""
