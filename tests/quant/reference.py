"""Loader for ``tests/data/quant_reference.safetensors`` (ModelOpt 0.47.0 outputs)."""

from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file

PATH = Path(__file__).resolve().parents[1] / "data" / "quant_reference.safetensors"
DTYPES = ("fp32", "bf16", "fp16")


@cache
def _all() -> dict[str, torch.Tensor]:
    return load_file(str(PATH))


def ref(case: str, dtype: str, key: str) -> torch.Tensor:
    """One stored tensor, e.g. ``ref("int8_row", "bf16", "y")``."""
    return _all()[f"{case}.{dtype}.{key}"].clone()
