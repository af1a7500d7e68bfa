"""merge_adapters / unmerge_adapters / export: folding through delta_weight, round trips,
refusals."""

import copy
import re

import pytest
import torch
from torch import nn

import qpeft
from qpeft import update_model
from qpeft.quant.layer import QuantModule
from tests.models import TinyBlock, tiny_gpt2, tiny_llama
from tests.tolerances import FP32_ATOL, FP32_RTOL, MERGE_ROUNDTRIP_ATOL

X = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))


def _randomize_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qpeft.lora_layers(model).values():
            for adapter in layer.adapters.values():
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _two_adapters():
    torch.manual_seed(0)
    model = TinyBlock()
    update_model(model, {"adapter_cfg": {"*": {"rank": 4, "scale": 0.5}}})
    update_model(model, {"adapter_name": "b", "adapter_cfg": {"*mlp*": {"rank": 2, "scale": 2.0}}})
    _randomize_adapters(model)
    qpeft.disable_adapters(model, layers_to_disable="*down*", adapters_to_disable="b")
    return model


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}


def test_merge_of_a_hand_computed_case_is_exact():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    model = nn.Sequential(layer)
    update_model(model, {"adapter_cfg": {"*": {"rank": 1, "scale": 2.0}}})
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.lora_a.copy_(torch.tensor([[1.0, -1.0]]))  # A: [1, 2]
        adapter.lora_b.copy_(torch.tensor([[0.5], [1.0]]))  # B: [2, 1]
    qpeft.merge_adapters(model)
    # W + 2 * B @ A = [[1, 2], [3, 4]] + 2 * [[0.5, -0.5], [1, -1]]
    assert torch.equal(layer.weight, torch.tensor([[2.0, 1.0], [5.0, 2.0]]))
    assert torch.equal(model(torch.tensor([[1.0, 1.0]])), torch.tensor([[3.0, 7.0]]))


@pytest.mark.parametrize("build", [_two_adapters, tiny_gpt2, tiny_llama])
def test_merge_keeps_outputs_and_unmerge_restores_weights(build):
    model = build()
    if not qpeft.is_peft_model(model):
        update_model(
            model, {"adapter_cfg": {"*": {"rank": 4, "scale": 0.5}, "*lm_head*": {"enable": False}}}
        )
        _randomize_adapters(model)
    x = X if isinstance(model, TinyBlock) else torch.randint(0, 64, (2, 6))
    run = (lambda m: m(x)) if isinstance(model, TinyBlock) else (lambda m: m(x).logits)
    with torch.no_grad():
        y0, w0 = run(model), _weights(model)
        qpeft.merge_adapters(model)
        assert all(
            a.merged == a.enable
            for layer in qpeft.lora_layers(model).values()
            for a in layer.adapters.values()
        )
        torch.testing.assert_close(
            run(model), y0, atol=FP32_ATOL, rtol=FP32_RTOL
        )  # not counted twice
        qpeft.unmerge_adapters(model)
        for key, w in _weights(model).items():
            torch.testing.assert_close(w, w0[key], atol=MERGE_ROUNDTRIP_ATOL, rtol=0)
        torch.testing.assert_close(run(model), y0, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_double_merge_is_refused_and_changes_nothing():
    model = _two_adapters()
    qpeft.merge_adapters(model, "default")
    before, log = _weights(model), qpeft.state(model)
    with pytest.raises(ValueError, match=r"adapter 'default' on layer '[\w.]+' is already merged"):
        qpeft.merge_adapters(model)
    assert (
        all(torch.equal(v, before[k]) for k, v in _weights(model).items())
        and qpeft.state(model) == log
    )
    qpeft.merge_adapters(model, ["b"])  # the other one still merges
    qpeft.unmerge_adapters(model)
    with pytest.raises(ValueError, match="no merged adapter"):
        qpeft.unmerge_adapters(model)
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        qpeft.merge_adapters(model, "zz")


def test_scale_of_a_merged_adapter_cannot_change():
    model = _two_adapters()
    qpeft.merge_adapters(model, "default")
    with pytest.raises(ValueError, match="is merged; unmerge it before changing its scale"):
        update_model(model, {"adapter_cfg": {"*": {"scale": 3.0}}})
    qpeft.unmerge_adapters(model)
    update_model(model, {"adapter_cfg": {"*": {"scale": 3.0}}})


@pytest.mark.parametrize("build", [_two_adapters, tiny_gpt2, tiny_llama])
def test_export_unwraps_to_the_original_objects_with_the_same_outputs(build):
    model = build()
    if not qpeft.is_peft_model(model):
        originals = {
            n: m for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")
        }
        update_model(
            model, {"adapter_cfg": {"*": {"rank": 4, "scale": 0.5}, "*lm_head*": {"enable": False}}}
        )
        _randomize_adapters(model)
    else:
        originals = {n: layer.base for n, layer in qpeft.lora_layers(model).items()}
    x = X if isinstance(model, TinyBlock) else torch.randint(0, 64, (2, 6))
    run = (lambda m: m(x)) if isinstance(model, TinyBlock) else (lambda m: m(x).logits)
    with torch.no_grad():
        y0 = run(model)
        assert qpeft.export(model) is model
        torch.testing.assert_close(run(model), y0, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert not qpeft.is_peft_model(model)
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert qpeft.state(model)[-1]["mode"] == "export"


def test_export_drops_disabled_adapters_and_keeps_merged_ones():
    model = _two_adapters()
    qpeft.merge_adapters(model, "b")
    qpeft.disable_adapters(model, adapters_to_disable="default")
    with torch.no_grad():
        y0 = model(X)
        qpeft.export(model, qpeft.ExportPEFTConfig())
        torch.testing.assert_close(model(X), y0, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_export_config_is_validated():
    model = _two_adapters()
    with pytest.raises(ValueError, match="extra"):
        qpeft.export(model, {"bogus": 1})
    assert qpeft.is_peft_model(model)
    with pytest.raises(ValueError, match="no LoRA layers"):
        qpeft.export(TinyBlock())


def _quantized(pattern="*"):
    torch.manual_seed(0)
    model = qpeft.quantize(TinyBlock(), "int8_weight_only")
    update_model(model, {"adapter_cfg": {pattern: {"rank": 2}, "*lm_head*": {"enable": False}}})
    _randomize_adapters(model)
    return model


def test_export_on_a_quantized_base_folds_into_the_master_weight_and_warns():
    model = _quantized()
    q = model.attn["q_proj"]
    expected = q.base_weight.detach().float() + q.adapters["default"].delta_weight()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))  # the probe export uses
    names = ("q_proj", "v_proj")
    with torch.no_grad():
        before = {n: model.attn[n](x) for n in names}
    with pytest.warns(UserWarning, match="quantized layer") as caught:
        qpeft.export(model)
    assert isinstance(model.attn["q_proj"], QuantModule)  # the quantizer stays
    assert torch.equal(model.attn["q_proj"].weight, expected)
    with torch.no_grad():
        change = max((model.attn[n](x) - before[n]).abs().max().item() for n in names)
    reported = float(re.search(r"is ([0-9.e+-]+)", str(caught[0].message)).group(1))
    assert change > 0 and reported >= change * (1 - 1e-3)  # the maximum over every layer


def test_merge_on_a_quantized_frozen_base_is_seen_by_the_quantizer():
    model = _quantized()
    with torch.no_grad():
        model(X)  # caches the frozen weights' fake-quantized values
        qpeft.merge_adapters(model)
        assert torch.equal(model(X), copy.deepcopy(model)(X))  # a deep copy starts with no cache
        qpeft.unmerge_adapters(model)
        assert torch.equal(model(X), copy.deepcopy(model)(X))


def test_merge_and_export_are_replayed_by_restore(tmp_path):
    model = _two_adapters()
    qpeft.merge_adapters(model, "b")
    qpeft.save(model, tmp_path / "merged")
    restored = qpeft.restore(TinyBlock(), tmp_path / "merged")
    qpeft.unmerge_adapters(restored)
    qpeft.unmerge_adapters(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in restored.state_dict().items())
    qpeft.export(model)
    qpeft.save(model, tmp_path / "exported")
    again = qpeft.restore(TinyBlock(), tmp_path / "exported")
    assert not qpeft.is_peft_model(again) and torch.equal(again(X), model(X))


def test_plain_replay_recomputes_the_merge():
    model = _two_adapters()
    base = copy.deepcopy(model)
    qpeft.merge_adapters(model)
    from qpeft.core.modes import replay

    replay(base, qpeft.state(model)[-1:])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.state_dict().items())
