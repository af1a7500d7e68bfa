"""Scenario 3: a LoRA training step on an ``nvfp4_weight_only`` base vs the plain base.

Needs ``qpeft.quantize`` (another branch); until it is on this branch the scenario reports itself
as pending instead of inventing numbers.
"""

from __future__ import annotations

import qpeft

from ..report import Row, Section


def run(repeats: int) -> Section:
    section = Section("quant", "3. quantized base")
    if not hasattr(qpeft, "quantize"):
        section.rows.append(Row("nvfp4_weight_only LoRA step / plain LoRA step", "pending", "<= 1.10x"))
        section.notes.append("pending: `qpeft.quantize` is not available on this branch yet; "
                             "nothing was measured.")
    return section
