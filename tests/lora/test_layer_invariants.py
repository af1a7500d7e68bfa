"""The invariants every LoRA layer kind keeps, checked on one table (:mod:`tests.lora.layer_kinds`).

Each kind is run plain and over a quantized base (``int8_weight_only``), with random nonzero
adapters (``B`` drawn after creation):

(a) ``B = 0`` is bit-identical to the base; (b) merged output equals unmerged output; (c)
unmerge(merge(W)) = W; (d) disabled adapters (``disable_adapters`` and ``disabled_adapters``) give
the base output; (e) ``save`` / ``restore`` is bit-exact; (f) the adapters-only
``full_state_dict`` holds every factor; (g) ``export(m)(x) == m(x)``. On a quantized base merging
changes the rounded weight (``Q(W + dW)``), so (b) and (g) compare outputs only for plain bases.
"""

from __future__ import annotations

import pytest
import torch

import qpeft
from tests.lora.layer_kinds import KINDS, single_process_group
from tests.tolerances import FP32_ATOL, FP32_RTOL, MERGE_ROUNDTRIP_ATOL

CASES = [
    pytest.param((k, q), id=f"{k.name}-{'int8' if q else 'plain'}") for k in KINDS for q in (0, 1)
]
LORA = {"adapter_cfg": {"*": {"rank": 2, "scale": 0.5}}}


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    with single_process_group():  # the Megatron kinds' communication helpers need one
        yield


def _close(got, want):
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)


def _same_as_base(kind, got, base):
    if kind.exact_base:
        assert torch.equal(got, base)
    else:
        _close(got, base)


def _build(kind, quantized):
    model = kind.build()
    if quantized:
        qpeft.quantize(model, "int8_weight_only")
    return model


def _adapter_factors(model):
    """Every adapter factor by state-dict key, found from the adapter modules themselves."""
    found = {}
    for layer_name, layer in qpeft.lora_layers(model).items():
        prefix = f"{layer_name}." if layer_name else ""
        for name, adapter in layer.adapters.items():
            for key, param in adapter.named_parameters():
                found[f"{prefix}adapters.{name}.{key}"] = param
    return found


@pytest.fixture(params=CASES)
def case(request):
    """``(kind, quantized, model with random adapters, inputs, base output)``."""
    kind, quantized = request.param
    model, inputs = _build(kind, quantized), kind.inputs()
    base = kind.base_output(model, inputs)
    qpeft.update_model(model, LORA)
    assert qpeft.lora_layers(model)
    with torch.no_grad():
        _same_as_base(kind, kind.run(model, inputs), base)  # (a) B = 0
        gen = torch.Generator().manual_seed(2)
        for key, factor in _adapter_factors(model).items():
            if key.endswith("lora_b"):
                factor.copy_(torch.randn(factor.shape, generator=gen))
    out = kind.run(model, inputs)
    assert not torch.allclose(out, base, atol=1e-3)
    return kind, quantized, model, inputs, base


def test_merged_equals_unmerged_and_unmerge_restores_the_weights(case):
    kind, quantized, model, inputs, _ = case
    out = kind.run(model, inputs)
    weights = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and ".adapters." not in k
    }
    qpeft.merge_adapters(model)
    assert all(
        a.merged for layer in qpeft.lora_layers(model).values() for a in layer.adapters.values()
    )
    if not quantized:
        _close(kind.run(model, inputs), out)  # (b): the update counted once
    qpeft.unmerge_adapters(model)
    for key, value in model.state_dict().items():  # (c)
        if key in weights and weights[key].is_floating_point():
            torch.testing.assert_close(value, weights[key], atol=MERGE_ROUNDTRIP_ATOL, rtol=0)
    if not quantized:
        _close(kind.run(model, inputs), out)


def test_disabled_adapters_give_the_base_output(case):
    kind, _, model, inputs, base = case
    with qpeft.disabled_adapters(model):
        _same_as_base(kind, kind.run(model, inputs), base)  # (d)
    qpeft.disable_adapters(model)
    _same_as_base(kind, kind.run(model, inputs), base)
    qpeft.enable_adapters(model)
    assert not torch.allclose(kind.run(model, inputs), base, atol=1e-3)


def test_save_restore_is_bit_exact(case, tmp_path):
    kind, _, model, inputs, _ = case
    qpeft.save(model, tmp_path / "ckpt")
    restored = qpeft.restore(kind.build(), tmp_path / "ckpt")  # (e)
    assert torch.equal(kind.run(restored, inputs), kind.run(model, inputs))
    want = model.state_dict()
    got = restored.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key


def test_adapters_only_state_dict_holds_every_factor(case):
    _, _, model, _, _ = case
    factors = _adapter_factors(model)
    state = qpeft.full_state_dict(model, adapters_only=True)  # (f)
    assert set(state) == set(factors)
    for key, factor in factors.items():
        assert torch.equal(state[key], factor.detach()), key


def test_export_keeps_the_output(case):
    kind, quantized, model, inputs, _ = case
    if quantized:
        pytest.skip("export folds dW into the quantized weight: Q(W + dW) x differs by design")
    out = kind.run(model, inputs)
    exported = qpeft.export(model)  # (g)
    assert not qpeft.is_peft_model(exported)
    _close(kind.base_output(exported, inputs), out)
