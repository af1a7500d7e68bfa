"""Save the recovered student: a full checkpoint (``qpeft.save``: mode log JSON plus safetensors,
restorable with ``qpeft.restore`` on a freshly loaded base model), its tokenizer, and the adapter
in Hugging Face PEFT format (``qpeft.export_hf_peft``), loadable by ``peft.PeftModel`` and servers.

HF PEFT files have no layout for the adapters of grouped MoE experts (one ``[E, r, in]`` /
``[E, out, r]`` pair per projection): ``hf_adapter/`` then holds the other layers' adapters only
(and is not written when every adapter is on experts); :func:`hf_left_out` says which layers are
missing there, for the summary. The checkpoint holds every adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint.full import save
from ..checkpoint.hf_peft import export_hf_peft, grouped_experts_layers
from ..lora.convert import lora_layers

__all__ = ["save_student", "hf_left_out"]

ADAPTER = "default"


def hf_left_out(student: nn.Module) -> dict[str, Any]:
    """What ``hf_adapter/`` lacks: ``{}``, or ``{"kind": "grouped experts", "layers": [names],
    "written": whether hf_adapter/ was written at all, "held_in": "checkpoint"}``."""
    grouped = grouped_experts_layers(student, ADAPTER)
    if not grouped:
        return {}
    adapted = [n for n, layer in lora_layers(student).items() if ADAPTER in layer.adapters]
    return {
        "kind": "grouped experts",
        "layers": grouped,
        "written": len(grouped) < len(adapted),
        "held_in": "checkpoint",
    }


def save_student(student: nn.Module, tokenizer: Any, folder: Path) -> dict[str, str]:
    """Write ``checkpoint/``, ``checkpoint/tokenizer/`` and ``hf_adapter/`` under ``folder``
    (``hf_adapter/`` without grouped-experts adapters, none when all are; see
    :func:`hf_left_out`).

    Returns:
        ``{what: path relative to folder}``.
    """
    save(student, folder / "checkpoint")
    tokenizer.save_pretrained(str(folder / "checkpoint" / "tokenizer"))
    files = {"checkpoint": "checkpoint", "tokenizer": "checkpoint/tokenizer"}
    if hf_left_out(student).get("written", True):
        export_hf_peft(student, folder / "hf_adapter", adapter_name=ADAPTER, skip_grouped=True)
        files["hf_adapter"] = "hf_adapter"
    return files
