"""Save the recovered student: a full checkpoint and the adapters in Hugging Face PEFT format.

Both go through the library (``qpeft.save`` and ``qpeft.export_hf_peft``) when it has them. Until
the persistence functions land, the checkpoint is written by a stand-in with the same content
(``model.safetensors``: every tensor, no pickle; ``qpeft.json``: format tag and mode log) and the HF
PEFT files are skipped, which the run's outputs say.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from ..modes import state

__all__ = ["save_student"]

STANDIN_FORMAT = "qpeft-recover-standin-1"


def save_student(student: nn.Module, tokenizer: Any, folder: Path) -> dict[str, str]:
    """Write ``checkpoint/`` (and ``hf_adapter/`` when possible) under ``folder``.

    Returns:
        ``{what: relative path or a note saying why it was not written}``.
    """
    import qpeft

    written: dict[str, str] = {}
    ckpt = folder / "checkpoint"
    if hasattr(qpeft, "save"):
        qpeft.save(student, ckpt)
    else:
        ckpt.mkdir()
        tensors, seen = {}, set()
        for key, value in student.state_dict().items():  # tied weights: safetensors wants copies
            tensors[key] = value.detach().clone() if value.data_ptr() in seen else value.detach().contiguous()
            seen.add(value.data_ptr())
        save_file(tensors, str(ckpt / "model.safetensors"))
        (ckpt / "qpeft.json").write_text(json.dumps({"format": STANDIN_FORMAT, "modes": state(student)}))
    tokenizer.save_pretrained(str(ckpt / "tokenizer"))
    written["checkpoint"] = "checkpoint"
    if hasattr(qpeft, "export_hf_peft"):
        qpeft.export_hf_peft(student, folder / "hf_adapter", adapter_name="default")
        written["hf_adapter"] = "hf_adapter"
    else:
        written["hf_adapter"] = "not written: qpeft.export_hf_peft is not in this build"
    return written
