"""Save the recovered student: a full checkpoint (``qpeft.save``: mode log JSON plus safetensors,
restorable with ``qpeft.restore`` on a freshly loaded base model), its tokenizer, the adapter in
Hugging Face PEFT format (``qpeft.export_hf_peft``), loadable by ``peft.PeftModel`` and servers,
and ``deploy/``: the quantized model as a compressed-tensors Hugging Face directory with the
adapter beside it (``qpeft.export_hf_checkpoint``), for serving engines.

A student that compressed-tensors cannot hold (grouped MoE experts, ``Conv1D`` layers, int4
blocks that do not divide a layer, ...) gets no ``deploy/``; the run still succeeds and its
deploy record says why.

HF PEFT files have no layout for the adapters of grouped MoE experts (one ``[E, r, in]`` /
``[E, out, r]`` pair per projection): ``hf_adapter/`` then holds the other layers' adapters only
(and is not written when every adapter is on experts); :func:`hf_left_out` says which layers are
missing there, for the summary. The checkpoint holds every adapter.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint.deploy import ADAPTERS_DIR, WEIGHTS_FILE, export_hf_checkpoint
from ..checkpoint.full import save
from ..checkpoint.hf_peft import export_hf_peft, grouped_experts_layers
from ..lora.convert import lora_layers

__all__ = ["save_student", "hf_left_out", "write_deploy"]

ADAPTER = "default"
DEPLOY = "deploy"
_OWN_WARNING = "export_hf_checkpoint"  # how the export's own warnings start


def _mib(files: list[Path]) -> float:
    return sum(f.stat().st_size for f in files) / 2**20


def write_deploy(
    student: nn.Module, tokenizer: Any, folder: Path, dense_mb: float
) -> dict[str, Any]:
    """Write ``folder/deploy/`` with :func:`qpeft.export_hf_checkpoint` (compressed-tensors, the
    tokenizer, adapters under ``deploy/adapters/<name>/``) and measure it.

    Args:
        student: the quantized student (compressed or not) with its adapters.
        tokenizer: saved into ``deploy/`` too.
        folder: the run's output folder.
        dense_mb: the dense model's weight size (MiB), for the ratio.

    Returns:
        ``{"written": True, "path", "format", "model_mb", "adapters_mb", "dense_mb", "ratio",
        "warnings"}``
        (``model_mb``: ``deploy/model.safetensors``; ``adapters_mb``: the adapter safetensors
        under ``deploy/adapters/``; ``ratio``: ``model_mb / dense_mb``; ``warnings``: what the
        export warned, e.g. fused groups whose scales it tied, with the measured change), or
        ``{"written": False, "reason": one line}`` when the export refused the student (a
        ``ValueError``: a layer the format cannot hold) or lacks a package (int4 packs with
        compressed-tensors); nothing is written then.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            path = export_hf_checkpoint(student, folder / DEPLOY, tokenizer=tokenizer)
        own = [str(w.message) for w in caught if str(w.message).startswith(_OWN_WARNING)]
        for w in caught:  # other libraries' warnings are not the record's: pass them on
            if not str(w.message).startswith(_OWN_WARNING):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except ValueError as err:
        return {"written": False, "reason": str(err).splitlines()[0]}
    except ImportError as err:  # int4's int32 packing is compressed-tensors' own
        return {
            "written": False,
            "reason": f"export_hf_checkpoint needs the package "
            f"{(err.name or '?').split('.')[0]} for this format (pip install 'qpeft[deploy]')",
        }
    model_mb = _mib([path / WEIGHTS_FILE])
    return {
        "written": True,
        "path": DEPLOY,
        "format": "compressed-tensors",
        "model_mb": model_mb,
        "adapters_mb": _mib(sorted((path / ADAPTERS_DIR).rglob("*.safetensors"))),
        "dense_mb": dense_mb,
        "ratio": model_mb / max(dense_mb, 1e-12),
        "warnings": own,
    }


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
    :func:`hf_left_out`). ``deploy/`` is :func:`write_deploy`'s.

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
