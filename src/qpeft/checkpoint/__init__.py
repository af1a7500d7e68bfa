"""Checkpoints: full save/restore, adapter files, HF PEFT files, validation, atomic files, sharded
writes."""

from .adapter_files import load_adapters, save_adapters
from .deploy import export_hf_checkpoint
from .full import ADAPTER_FILE, FORMAT_VERSION, MODEL_FILE, restore, save
from .hf_import import import_hf_peft
from .hf_peft import export_hf_peft, grouped_experts_layers

__all__ = [
    "ADAPTER_FILE",
    "FORMAT_VERSION",
    "MODEL_FILE",
    "export_hf_checkpoint",
    "export_hf_peft",
    "grouped_experts_layers",
    "import_hf_peft",
    "load_adapters",
    "restore",
    "save",
    "save_adapters",
]
