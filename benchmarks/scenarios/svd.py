"""Scenario 4: svdquant init of the whole model: time vs exact SVD, error vs the Eckart-Young
optimum.

On an ``nvfp4_weight_only`` base, each projection's residual ``R = W - Q(W)`` is approximated by
``scale * B A`` of rank r. The Eckart-Young optimum is ``sqrt(sum_{i>r} s_i^2)`` from the exact
singular values ``s`` of ``R``; the ratio ``||R - scale * B A||_F / optimum`` is >= 1, and 1 is
perfect. Timed: qpeft's whole-model init (``update_model`` with ``svdquant``) vs the exact SVD of
every residual (``torch.linalg.svd``), interleaved.
"""

from __future__ import annotations

import copy
import itertools

import torch

import qpeft

from ..harness import interleaved
from ..models import PROJECTIONS, base_model
from ..report import Row, Section
from .common import ratio_row, timing_lines

RANK, TARGET, PRESET = 16, 1.01, "nvfp4_weight_only"


def _config(name: str) -> dict:
    return {
        "adapter_name": name,
        "adapter_cfg": {
            "*": {"enable": False},
            **{
                f"*{p}": {"enable": True, "rank": RANK, "lora_init_method": "svdquant"}
                for p in PROJECTIONS
            },
        },
    }


def _error_ratios(model) -> list[float]:
    ratios = []
    for layer in qpeft.lora_layers(model).values():
        residual = layer.quantization_residual()
        approx = layer.adapters["svd"].delta_weight()
        s = torch.linalg.svdvals(residual)
        optimum = s[RANK:].square().sum().sqrt()
        ratios.append(((residual - approx).norm() / optimum).item())
    return ratios


def run(repeats: int) -> Section:
    section = Section("svd", "4. svdquant init")
    model = base_model()
    qpeft.quantize(model, PRESET)
    checked = qpeft.update_model(copy.deepcopy(model), _config("svd"))
    ratios = _error_ratios(checked)
    counter = itertools.count()

    def svdquant_init():
        name = f"s{next(counter)}"
        qpeft.update_model(model, _config(name))
        qpeft.delete_adapter(model, name)

    residuals = [layer.quantization_residual() for layer in qpeft.lora_layers(checked).values()]

    def exact_svd():
        for residual in residuals:
            torch.linalg.svd(residual, full_matrices=False)

    t = interleaved({"qpeft-svdquant": svdquant_init, "exact-svd": exact_svd}, repeats, warmup=1)
    section.rows.append(
        Row(
            f"rank {RANK}: residual error / Eckart-Young optimum (worst layer)",
            f"{max(ratios):.4f} (mean {sum(ratios) / len(ratios):.4f})",
            f"<= {TARGET}",
            max(ratios) <= TARGET,
        )
    )
    section.rows.append(
        ratio_row(
            f"rank {RANK}: whole-model svdquant init / exact SVD of every residual",
            t,
            "qpeft-svdquant",
            "exact-svd",
        )
    )
    section.notes += timing_lines(t)
    section.notes.append(
        f"{len(ratios)} projections; qpeft's time includes computing Q(W), the "
        "residual, the truncated SVD and building the adapters (update_model), the "
        "exact-SVD time only the decompositions of precomputed residuals."
    )
    return section
