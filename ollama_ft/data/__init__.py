"""Training data: read files, detect shapes, normalise to conversations, tokenize."""
