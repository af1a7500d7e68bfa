"""Save the recovered student: a full checkpoint (``qpeft.save``: mode log JSON plus safetensors,
restorable with ``qpeft.restore`` on a freshly loaded base model), its tokenizer, and the adapter
in Hugging Face PEFT format (``qpeft.export_hf_peft``), loadable by ``peft.PeftModel`` and servers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint.full import save
from ..checkpoint.hf_peft import export_hf_peft

__all__ = ["save_student"]

ADAPTER = "default"


def save_student(student: nn.Module, tokenizer: Any, folder: Path) -> dict[str, str]:
    """Write ``checkpoint/``, ``checkpoint/tokenizer/`` and ``hf_adapter/`` under ``folder``.

    Returns:
        ``{what: path relative to folder}``.
    """
    save(student, folder / "checkpoint")
    tokenizer.save_pretrained(str(folder / "checkpoint" / "tokenizer"))
    export_hf_peft(student, folder / "hf_adapter", adapter_name=ADAPTER)
    return {
        "checkpoint": "checkpoint",
        "tokenizer": "checkpoint/tokenizer",
        "hf_adapter": "hf_adapter",
    }
