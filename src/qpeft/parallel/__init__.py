"""qpeft on ``torch.distributed``: tensor-parallel plans for LoRA layers and gathered state dicts.

DDP and FSDP2 ``fully_shard`` need nothing from qpeft (see the README's "Distributed training");
tensor parallelism needs the adapters sharded like their base layer, which :func:`lora_tp_plan` /
:func:`parallelize_lora` arrange.
"""

from .state_dict import full_state_dict, is_adapter_key, load_full_state_dict
from .tensor_parallel import (
    LoRAColwiseParallel,
    LoRARowwiseParallel,
    lora_tp_plan,
    parallelize_lora,
)

__all__ = [
    "LoRAColwiseParallel",
    "LoRARowwiseParallel",
    "full_state_dict",
    "is_adapter_key",
    "load_full_state_dict",
    "lora_tp_plan",
    "parallelize_lora",
]
