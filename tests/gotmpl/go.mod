module ollama-ft/tests/gotmpl

go 1.19
