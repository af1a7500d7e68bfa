"""Scenario 4: svdquant init of the whole model: time vs exact SVD, error vs the Eckart-Young optimum.

Needs ``qpeft.quantize`` (another branch); until it is on this branch the scenario reports itself
as pending instead of inventing numbers.
"""

from __future__ import annotations

import qpeft

from ..report import Row, Section


def run(repeats: int) -> Section:
    section = Section("svd", "4. svdquant init")
    if not hasattr(qpeft, "quantize"):
        section.rows.append(Row("residual error / Eckart-Young optimum", "pending", "<= 1.01"))
        section.notes.append("pending: `qpeft.quantize` is not available on this branch yet; "
                             "nothing was measured.")
    return section
