"""export_hf_checkpoint of fused groups (q/k/v, gate/up) whose per-tensor scales differ: written
with the shared scales the engines use, with a warning that gives the measured change."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import qpeft
from qpeft.quant.targets import quantized_layers
from tests.checkpoint.helpers import decode_modelopt, deploy_llama

transformers = pytest.importorskip("transformers")

GROUPS = [
    [f"model.layers.0.self_attn.{p}_proj" for p in ("k", "q", "v")],
    [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up")],
]


def _expected_line(untied, tied, group):
    """The figures recomputed from a model quantized with tied scales (the documented probe)."""
    a_layers, b_layers = quantized_layers(untied), quantized_layers(tied)
    changed = total = 0
    delta = 0.0
    with torch.no_grad():
        for name in group:
            a, b = a_layers[name], b_layers[name]
            wa, wb = a.quantized_weight(), b.quantized_weight()
            changed += int((wa != wb).sum())
            total += wa.numel()
            x = torch.randn(16, wa.shape[-1], generator=torch.Generator().manual_seed(0))
            qa = a.input_quantizer(x) if a.input_quantizer.is_enabled else x
            qb = b.input_quantizer(x) if b.input_quantizer.is_enabled else x
            delta = max(delta, float((F.linear(qa, wa) - F.linear(qb, wb)).abs().max()))
    assert changed > 0  # the untied model really differs
    return (
        f"[{', '.join(group)}]: {changed} of {total} weight elements change "
        f"({changed / total:.2%}), largest output change {delta:.3e} on the probe input"
    )


def _quantized(model):
    return {n: q for n, q in quantized_layers(model).items() if q.weight_quantizer.is_enabled}


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("preset", ["fp8", "nvfp4", "nvfp4_weight_only"])
def test_untied_groups_are_tied_with_a_warning_that_measures_the_change(tmp_path, preset):
    untied, tied = deploy_llama(preset, tie=False), deploy_llama(preset, tie=True)
    before = _snapshot(untied)
    with pytest.warns(UserWarning, match="do not share their scales") as record:
        qpeft.export_hf_checkpoint(untied, tmp_path / "hf", format="modelopt")
    (message,) = [str(w.message) for w in record if "share their scales" in str(w.message)]
    for group in GROUPS:
        assert _expected_line(untied, tied, group) in message
    after = untied.state_dict()  # the caller's model is untouched
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name, layer in _quantized(tied).items():  # what the engine runs: tied Q(W)
        assert torch.equal(decode_modelopt(tensors, name, torch.float32), layer.quantized_weight())
        key = f"{name}.input_scale"
        if key in tensors and name.endswith(("q_proj", "k_proj", "v_proj")):
            assert torch.equal(tensors[key], tensors["model.layers.0.self_attn.q_proj.input_scale"])


def test_compressed_tensors_export_ties_too(tmp_path):
    from transformers.utils.quantization_config import CompressedTensorsConfig

    untied, tied = deploy_llama("fp8", tie=False), deploy_llama("fp8", tie=True)
    with pytest.warns(UserWarning, match="do not share their scales"):
        qpeft.export_hf_checkpoint(untied, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "hf", quantization_config=CompressedTensorsConfig(dequantize=True)
        )
    state = loaded.state_dict()
    for name, layer in _quantized(tied).items():
        assert torch.equal(state[f"{name}.weight"], layer.quantized_weight()), name


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_tied_scales_export_silently(tmp_path, fmt):
    model = deploy_llama("nvfp4", tie=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qpeft.export_hf_checkpoint(model, tmp_path / "hf", format=fmt)


def test_compressed_untied_model_is_tied_to_the_largest_global_scale(tmp_path):
    model = deploy_llama("nvfp4_weight_only", torch.bfloat16, tie=False)
    g = {n: layer.weight_quantizer.amax.float() / 2688.0 for n, layer in _quantized(model).items()}
    model.requires_grad_(False)
    model = qpeft.compress(model)  # the layers keep codes and scales, no amax
    with pytest.warns(UserWarning, match=re.escape(f"[{', '.join(GROUPS[0])}]")):
        qpeft.export_hf_checkpoint(model, tmp_path / "hf", format="modelopt")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for group in GROUPS:
        top = torch.stack([g[n].reshape(()) for n in group]).max()
        assert len({float(g[n]) for n in group}) > 1  # untied before
        for n in group:
            assert torch.equal(tensors[f"{n}.weight_scale_2"], top), n
