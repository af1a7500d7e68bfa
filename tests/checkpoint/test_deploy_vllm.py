"""vLLM, the engine, reads what export_hf_checkpoint writes as it would serve it.

vLLM 0.33.0's own model loader runs on the CPU in a separate process
(``tests/checkpoint/vllm_reader.py``, installed beside the venv by ``make vllm-reader``): it detects
the format, builds ``LlamaForCausalLM`` with fused q/k/v and gate/up layers, loads every tensor
through its weight loaders and post-processes them for its kernels. What its kernels multiply by
is exactly qpeft's Q(W) in the dtype vLLM serves in (bf16: it downcasts fp32 models and serves
ModelOpt checkpoints in bf16 / fp16 only), and its layers' outputs match qpeft's. Every ModelOpt
format, and the compressed-tensors schemes vLLM's wheel can run on a CPU (FP8 with dynamic
per-token inputs, NVFP4); the others need compiled CPU ops only vLLM's CPU build carries.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qpeft
from qpeft.quant.targets import quantized_layers
from tests.checkpoint.helpers import deploy_llama, randomize_adapters
from tests.tolerances import ENGINE_OUTPUT_RTOL

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
READER = ROOT / "tests" / "checkpoint" / "vllm_reader.py"
VLLM = ROOT / ".venv" / "vllm-reader"  # where `make vllm-reader` installs vLLM
# (format, preset): what vLLM detects, and the linear method and kernel it picks on the CPU
READS = {
    ("modelopt", "fp8"): (
        "modelopt",
        "ModelOptLinearMethod",
        "PerTensorTorchFP8ScaledMMLinearKernel",
    ),
    ("modelopt", "nvfp4"): ("modelopt_fp4", "ModelOptLinearMethod", "EmulationNvFp4LinearKernel"),
    # vLLM's W4A16 NVFP4 kernels are GPU-only: the reader's stand-in multiplies on the CPU
    ("modelopt", "nvfp4_weight_only"): ("modelopt_fp4", "ModelOptLinearMethod", "_WeightOnlyFp4"),
    ("compressed-tensors", "fp8_dynamic"): (
        "compressed-tensors",
        "CompressedTensorsW8A8Fp8",
        "ChannelWiseTorchFP8ScaledMMLinearKernel",
    ),
    ("compressed-tensors", "nvfp4"): (
        "compressed-tensors",
        "CompressedTensorsW4A4Fp4",
        "EmulationNvFp4LinearKernel",
    ),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CASES = [(f, p, d) for f, p in READS for d in DTYPES]
FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
BLOCK = "model.layers.0"
# one adapter, its rank and scale set per layer (an alpha that is not an integer included)
ADAPTERS = {
    "*proj*": {"rank": 4, "scale": 2.0},
    "*q_proj*": {"rank": 2, "scale": 0.3},
    "*mlp*": {"rank": 8, "scale": 1.5},
}
VLLM_LAYERS = {f"{BLOCK}.self_attn.{n}" for n in ("qkv_proj", "o_proj")} | {
    f"{BLOCK}.mlp.{n}" for n in ("gate_up_proj", "down_proj")
}


@pytest.fixture(scope="module")
def read(tmp_path_factory):
    """{(format, preset, dtype id): (qpeft model, vLLM's tensors, vLLM's json)}, read in one
    vLLM process."""
    if not (VLLM / "vllm").is_dir():
        pytest.skip("vLLM's reader is not installed: run `make vllm-reader` (make test does)")
    base = tmp_path_factory.mktemp("vllm")
    models, args = {}, []
    for case in CASES:
        form, preset, dtype = case
        models[case] = deploy_llama(preset, DTYPES[dtype])
        qpeft.update_model(models[case], {"adapter_cfg": ADAPTERS})
        randomize_adapters(models[case])
        ckpt = qpeft.export_hf_checkpoint(models[case], base / "-".join(case), format=form)
        args += [str(ckpt), str(base / "-".join(case + ("read",)))]
    env = {**os.environ, "PYTHONPATH": str(VLLM)}
    run = subprocess.run(
        [sys.executable, str(READER), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    found = {}
    for case, model in models.items():
        out = base / "-".join(case + ("read",))
        info = json.loads((out / "vllm.json").read_text())
        found[case] = model, load_file(str(out / "vllm.safetensors")), info
    return found


def _adapters(model):
    return {name: layer.adapters["default"] for name, layer in qpeft.lora_layers(model).items()}


def _parts(name):
    parent, leaf = name.rsplit(".", 1)
    return [f"{parent}.{p}" for p in FUSED.get(leaf, [leaf])]


@pytest.mark.parametrize("form,preset", sorted(READS))
def test_vllm_detects_the_format_and_fuses_the_layers(read, form, preset):
    quantization, method, kernel = READS[form, preset]
    for dtype in DTYPES:
        _, _, info = read[form, preset, dtype]
        assert info["quantization"] == quantization
        assert info["dtype"] == "bfloat16"
        assert set(info["layers"]) == VLLM_LAYERS  # lm_head stays unquantized
        for layer in info["layers"].values():
            assert layer == {"method": method, "kernel": kernel}


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_vllm_multiplies_by_exactly_qpeft_quantized_weights(read, case):
    model, tensors, _ = read[case]
    layers = quantized_layers(model)
    for name in sorted(VLLM_LAYERS):
        want = torch.cat([layers[p].quantized_weight() for p in _parts(name)])
        assert torch.equal(tensors[f"{name}.weight"], want.to(torch.bfloat16)), name
    state = model.state_dict()
    kept = {k.removesuffix(".state"): v for k, v in tensors.items() if k.endswith(".state")}
    assert set(kept) == {k for k in state if "_quantizer" not in k and "proj" not in k}
    for key, value in kept.items():
        assert torch.equal(value, state[key].to(torch.bfloat16)), key


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_vllm_loads_the_adapter_as_trained(read, case):
    model, tensors, info = read[case]
    adapters = _adapters(model)
    assert set(info["adapters"]) == {"default"}
    assert set(info["adapters"]["default"]) == set(adapters)
    for name, adapter in adapters.items():
        rank, scaling = info["adapters"]["default"][name]
        assert rank == adapter.rank and scaling == pytest.approx(adapter.scale, rel=1e-12), name
        for key in ("lora_a", "lora_b"):
            got = tensors[f"lora.default.{name}.{key}"]
            assert torch.equal(got, getattr(adapter, key).detach().to(torch.bfloat16)), name


def _lora_delta(tensors, info, name, x):
    """vLLM's LoRA term of one layer: scaling * (x A^T) B^T, from the tensors vLLM loaded."""
    _, scaling = info["adapters"]["default"][name]
    a, b = (tensors[f"lora.default.{name}.{k}"].float() for k in ("lora_a", "lora_b"))
    return scaling * (x.float() @ a.t()) @ b.t()


def _outputs(model, tensors, name, dtype):
    """(vLLM's base output, qpeft's output) of one vLLM layer on vLLM's probe input."""
    x = tensors[f"{name}.input"]
    layers = qpeft.lora_layers(model)
    with torch.no_grad():
        want = torch.cat([layers[p](x.to(dtype)) for p in _parts(name)], dim=-1)
    return tensors[f"{name}.output"].float(), want.float()


def _relative(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_vllm_kernels_give_qpeft_base_outputs(read, case):
    """vLLM's base kernel against qpeft's quantized layer with its adapter off."""
    model, tensors, _ = read[case]
    qpeft.disable_adapters(model)
    try:
        for name in sorted(VLLM_LAYERS):
            got, want = _outputs(model, tensors, name, DTYPES[case[2]])
            assert _relative(got, want) <= ENGINE_OUTPUT_RTOL, name
    finally:
        qpeft.enable_adapters(model)


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_vllm_kernels_and_adapter_give_qpeft_outputs(read, case):
    """vLLM's base kernel plus its LoRA term (each fused slice with its own adapter) against
    qpeft's layer with its adapter."""
    model, tensors, info = read[case]
    for name in sorted(VLLM_LAYERS):
        got, want = _outputs(model, tensors, name, DTYPES[case[2]])
        x = tensors[f"{name}.input"]
        got = got + torch.cat([_lora_delta(tensors, info, p, x) for p in _parts(name)], dim=-1)
        assert _relative(got, want) <= ENGINE_OUTPUT_RTOL, name
