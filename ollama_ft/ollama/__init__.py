"""Everything Ollama: Modelfiles (modelfile.py), the Go TEMPLATE of each DeepSeek chat format
(templates.py, data in modelfiles/), model names and the REST client.

Kept free of imports so `import ollama_ft.ollama.<module>` stays light.
"""
