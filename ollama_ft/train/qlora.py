"""QLoRA: the frozen base in 4-bit NF4 (bitsandbytes), the LoRA weights trained on top.

bitsandbytes runs NF4 on CUDA and, from 0.50 on, on the CPU too, so --load-in-4bit is
accepted wherever it runs. The linear weights of the decoder are stored as NF4 (double
quantized: the block scales are quantized too) and dequantized block by block in each
matmul, computed in bf16 (in fp32 on a CPU without native bf16); the embeddings, norms and
output head stay unquantized, in the run's precision. The adapter that comes out is an
ordinary LoRA adapter: export merges it into the 16-bit base, as for any run.
"""

from __future__ import annotations

from ollama_ft.errors import ConfigError

MIN_CPU_VERSION = (0, 50)


def check_4bit(device: str) -> None:
    """Refuse --load-in-4bit now (before anything loads) where bitsandbytes cannot run it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("--load-in-4bit (QLoRA) needs bitsandbytes: pip install "
                          "'bitsandbytes>=0.50' (or 'ollama-ft[qlora]'), or train without "
                          "--load-in-4bit") from None
    version = tuple(int(x) for x in bitsandbytes.__version__.split(".")[:2] if x.isdigit())
    if device == "cpu" and version < MIN_CPU_VERSION:
        raise ConfigError(f"--load-in-4bit on the CPU needs bitsandbytes >= 0.50 (this is "
                          f"{bitsandbytes.__version__}): pip install -U 'bitsandbytes>=0.50'")


def quantization_config(device: str, precision: str):
    import torch
    from transformers import BitsAndBytesConfig

    if device == "cpu":
        from ollama_ft.train.precision import cpu_has_bf16

        compute = torch.bfloat16 if cpu_has_bf16() else torch.float32
    else:
        compute = torch.float16 if precision == "fp16" else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def prepare(model, gradient_checkpointing: bool):
    """Ready a 4-bit model for LoRA training. Unlike PEFT's prepare_model_for_kbit_training,
    the unquantized weights stay in the precision they were loaded in: the embeddings and
    the output head of a DeepSeek vocabulary are 2 x 152k x hidden parameters (1.1 B at 7B),
    frozen, and in fp32 they would take back much of what 4-bit saves."""
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:  # checkpointed layers need an input that carries gradients
        model.enable_input_require_grads()
    return model
