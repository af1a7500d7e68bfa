"""Adapter management on merged adapters: disabled means the base model; deleting is refused."""

import pytest
import torch
from torch import nn

import qpeft
from qpeft import update_model
from tests.tolerances import FP32_ATOL, FP32_RTOL

X = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))


def _merged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    with torch.no_grad():
        for p in model[0].adapters["default"].parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    adapted = model(X)
    qpeft.merge_adapters(model)
    reference = nn.Sequential(nn.Linear(8, 8))
    reference.load_state_dict(base)
    return model, reference(X), adapted


def test_disabled_adapters_context_on_a_merged_adapter_gives_the_base_model():
    model, base_y, adapted = _merged()
    assert not torch.allclose(base_y, adapted)
    log = qpeft.state(model)
    merged_weight = model[0].base_weight.detach().clone()
    with qpeft.disabled_adapters(model):
        torch.testing.assert_close(model(X), base_y, atol=FP32_ATOL, rtol=FP32_RTOL)
    adapter = model[0].adapters["default"]
    assert adapter.merged and adapter.enable  # merged back on exit
    torch.testing.assert_close(model[0].base_weight, merged_weight, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(model(X), adapted, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert qpeft.state(model) == log  # nothing recorded


def test_disable_adapters_on_a_merged_adapter_unmerges_it_and_replays(tmp_path):
    model, base_y, _ = _merged()
    qpeft.disable_adapters(model)
    adapter = model[0].adapters["default"]
    assert not adapter.merged and not adapter.enable
    torch.testing.assert_close(model(X), base_y, atol=FP32_ATOL, rtol=FP32_RTOL)
    modes = [e["mode"] for e in qpeft.state(model)]
    assert modes[-2:] == ["unmerge_adapters", "disable_adapters"]
    qpeft.save(model, tmp_path / "ckpt")
    restored = qpeft.restore(nn.Sequential(nn.Linear(8, 8)), tmp_path / "ckpt")
    again = restored[0].adapters["default"]
    assert not again.merged and not again.enable
    assert torch.equal(restored(X), model(X))
    assert qpeft.state(restored) == qpeft.state(model)


def test_delete_adapter_refuses_a_merged_adapter_and_leaves_the_model_untouched():
    model, _, adapted = _merged()
    log = qpeft.state(model)
    with pytest.raises(ValueError, match="'default'.*merged"):
        qpeft.delete_adapter(model, "default")
    assert "default" in model[0].adapters and qpeft.state(model) == log
    torch.testing.assert_close(model(X), adapted, atol=FP32_ATOL, rtol=FP32_RTOL)
