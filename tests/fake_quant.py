"""A stand-in for ``qpeft.quantize`` (not on main yet) built on the real ``TensorQuantizer``.

It has the shape the persistence code relies on: a composition wrapper whose ``weight_quantizer``
holds an ``_amax`` buffer (state-dict key ``<layer>.weight_quantizer._amax``, created lazily by
calibration or by loading a state dict), a recorded mode with a registered replay, and calibration
that is skipped inside ``qpeft.modes.restoring``. Weights are int8 per output row (``axis=0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qpeft.modes import is_restoring, record, register_mode
from qpeft.patterns import matches_pattern
from qpeft.quant import TensorQuantizer
from qpeft.wrapping import ModuleWrapper

MODE = "test_fake_quantize"


class CountingQuantizer(TensorQuantizer):
    """A TensorQuantizer that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__("int", 8, axis=0)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


class FakeQuantLinear(ModuleWrapper):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base)
        self.weight_quantizer = CountingQuantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.base.weight), self.base.bias)


def fake_quantize(model: nn.Module, pattern: str | list[str] = "*") -> nn.Module:
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and matches_pattern(n, pattern)]
    for name in names:
        layer = FakeQuantLinear(model.get_submodule(name))
        if not is_restoring():  # the saved amax is loaded instead
            with torch.no_grad(), layer.weight_quantizer.calibrating():
                layer.weight_quantizer(layer.base.weight)
            layer.weight_quantizer.calls = 0
        model.set_submodule(name, layer)
    record(model, MODE, {"layers": names})
    return model


@register_mode(MODE)
def _replay(model: nn.Module, config: dict) -> None:
    fake_quantize(model, config["layers"])


def quantizer_calls(model: nn.Module) -> int:
    return sum(m.calls for m in model.modules() if isinstance(m, CountingQuantizer))
