"""LoRA training on the transformers Trainer + PEFT stack."""
