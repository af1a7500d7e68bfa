"""The benchmark scenarios' own helpers still work against the library (no timing here)."""

import torch

import qpeft
from benchmarks.scenarios.quant import _requantize_every_forward
from tests.models import TinyBlock


def test_requantize_reference_really_requantizes_every_forward():
    model = qpeft.quantize(TinyBlock(), "nvfp4_weight_only")
    model.requires_grad_(False)
    x = torch.randn(3, 16)
    cached = model(x)
    layer = model.attn["q_proj"]
    with torch.no_grad():
        layer.weight.mul_(0.5)  # in place: the cache may or may not notice; the reference must
    _requantize_every_forward(model)
    fresh = qpeft.quantize(copy_of := TinyBlock(), "nvfp4_weight_only")
    copy_of.load_state_dict(model.state_dict())
    assert torch.equal(model(x), fresh(x)) and not torch.equal(model(x), cached)
