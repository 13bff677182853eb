"""What the launcher asked for (DDP, FSDP, DeepSpeed ZeRO) and what this machine can run.

`accelerate launch --config_file X` tells the training processes through the environment
(ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED); the Trainer's Accelerator reads it. On a
CPU-only run accelerate (1.x) ignores both: it shards only on GPU-class devices and
otherwise trains with DDP, each process holding the whole model, which is not what a person
who asked for sharding wants (torch's FSDP1 refuses the CPU outright; FSDP2 runs there, but
accelerate does not use it). So a sharded launch of a CPU run is refused here, before
anything loads.
"""

from __future__ import annotations

import os

from ollama_ft.errors import ConfigError

_TRUE = ("1", "true", "yes")


def requested_sharding() -> str | None:
    """'FSDP' or 'DeepSpeed' when the launcher asked for it, else None (DDP or one process)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE:
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE:
        return "DeepSpeed"
    return None


def check_sharding(device: str) -> None:
    """Refuse FSDP / DeepSpeed where they cannot run: on the CPU, or without deepspeed."""
    asked = requested_sharding()
    if asked is None:
        return
    how = ("distributed_type: FSDP" if asked == "FSDP" else "distributed_type: DEEPSPEED")
    if device == "cpu":
        raise ConfigError(
            f"{asked} was asked for (accelerate launch with {how}), but this run trains on the "
            f"CPU: accelerate shards models ({asked}) only on GPUs and would train here with "
            "plain DDP, a whole model copy per process. On CPUs use DDP: torchrun "
            "--nproc_per_node N -m ollama_ft train ... (or accelerate launch --num_processes N "
            f"without the {asked} config); {asked} needs CUDA GPUs")
    if asked == "DeepSpeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("DeepSpeed was asked for (accelerate launch with distributed_type: "
                              "DEEPSPEED) but it is not installed: pip install deepspeed, or "
                              "use an FSDP config") from None


def _is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def adapter_state_dict(model, accelerator=None) -> dict | None:
    """The trainable (adapter) weights, whole, of a model that may be sharded; every rank must
    call it (gathering is collective), rank 0 gets the tensors. None when the model is not
    sharded (DDP, one process): its parameters are whole already."""
    if accelerator is not None and accelerator.distributed_type == "DEEPSPEED":
        return accelerator.get_state_dict(model)  # ZeRO-3: DeepSpeed's own gather (untested here)
    if not _is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
