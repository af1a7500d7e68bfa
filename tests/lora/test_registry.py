"""Registry look-ups by type (along the MRO) and by predicate (matchers)."""

import pytest
import torch
from torch import nn

import qpeft
from qpeft.lora import registry


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.special = True
        self.proj = nn.Parameter(torch.randn(4, 4))


class _OddLoRA(qpeft.LoRALinear):
    @staticmethod
    def features(base):
        return 4, 4

    @property
    def base_weight(self):
        return self.base.proj


def test_matcher_registers_a_family_without_a_common_type(monkeypatch):
    monkeypatch.setattr(registry.REGISTRY, "matchers", list(registry.REGISTRY.matchers))
    assert registry.lora_class_for(_Odd()) is None
    qpeft.register_lora_matcher(lambda m: getattr(m, "special", False), _OddLoRA)
    assert registry.lora_class_for(_Odd()) is _OddLoRA
    assert registry.lora_class_for(nn.Linear(2, 2)) is qpeft.LoRALinear  # types win


def test_matcher_rejects_bad_arguments():
    with pytest.raises(TypeError, match="LoRAModule"):
        qpeft.register_lora_matcher(lambda m: True, nn.Linear)
    with pytest.raises(TypeError, match="not callable"):
        qpeft.register_lora_matcher("special", _OddLoRA)
