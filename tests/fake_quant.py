"""A stand-in weight quantizer for tests, until ``qpeft.quantize`` lands on main.

It has the shape the persistence code relies on: a composition wrapper whose ``weight_quantizer``
holds an ``_amax`` buffer (state-dict key ``<layer>.weight_quantizer._amax``), a recorded mode
with a registered replay, and calibration that is skipped inside ``qpeft.modes.restoring``.
Numerics: symmetric int8, ``Q(w) = round(w / s).clamp(-127, 127) * s`` with ``s = amax / 127``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qpeft.modes import is_restoring, record, register_mode
from qpeft.patterns import matches_pattern
from qpeft.wrapping import ModuleWrapper

MODE = "test_fake_quantize"


class FakeQuantizer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_amax", torch.tensor(1.0))
        self.calls = 0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = self._amax / 127
        return (w / s).round().clamp(-127, 127) * s


class FakeQuantLinear(ModuleWrapper):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base)
        self.weight_quantizer = FakeQuantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.base.weight), self.base.bias)


def fake_quantize(model: nn.Module, pattern: str = "*") -> nn.Module:
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and matches_pattern(n, pattern)]
    for name in names:
        layer = FakeQuantLinear(model.get_submodule(name))
        if not is_restoring():
            layer.weight_quantizer._amax.fill_(layer.base.weight.detach().abs().max())
        model.set_submodule(name, layer)
    record(model, MODE, {"layers": names})
    return model


@register_mode(MODE)
def _replay(model: nn.Module, config: dict) -> None:
    fake_quantize(model, config["layers"])


def quantizer_calls(model: nn.Module) -> int:
    return sum(m.calls for m in model.modules() if isinstance(m, FakeQuantizer))
