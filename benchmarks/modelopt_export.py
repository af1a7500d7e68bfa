"""qpeft's ``export_hf_checkpoint(format="modelopt")`` next to ModelOpt's own exporter.

Run: ``PYTHONPATH=<folder holding nvidia-modelopt 0.47> python -m benchmarks.modelopt_export``
(ModelOpt is an optional peer: without it the script says so and exits 0). CPU only: ModelOpt
calibrates on a CPU (its quantizers collect amaxes with fake quant off) and exports there (codes
come from the amaxes); it cannot run an NVFP4 forward on a CPU, which nothing here needs.

The model is the one-block Llama of ``tests/checkpoint`` (hidden 128, intermediate 256, 4 heads,
2 KV heads, vocab 64, seed 0), calibrated on the same ``[2, 8]`` token batch. For each algorithm
(``FP8_DEFAULT_CFG`` / ``fp8``, ``NVFP4_DEFAULT_CFG`` / ``nvfp4``, ``W4A16_NVFP4_CFG`` /
``nvfp4_weight_only``) and dtype (bf16, fp32) it prints:

1. ``layout``: the tensor names, dtypes and shapes, ``hf_quant_config.json`` and config.json's
   ``quantization_config`` of both exports (the producer aside): ``same`` or the differences;
2. ``codes``: weight codes (FP8 bytes, FP4 nibbles) and block scales ModelOpt writes that differ
   from qpeft's, both with the fused groups' scales tied (qpeft ``tie_fused_scales=True``), so
   the scales agree and only the rounding differs;
3. ``tie``: the decoded weight elements of the fused layers whose weight amax is not their
   group's largest (k / v of q/k/v, up of gate/up here) that differ from the weights trained
   without tying (qpeft's ``Q(W)``, quantized with ``tie_fused_scales=False``), for ModelOpt's
   export (it always ties) and for qpeft's (it ties at export and warns), and the same count
   over the other quantized layers (the rounding alone, for comparison).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

import qpeft
from qpeft.quant.targets import quantized_layers as _all_layers

CASES = [
    ("FP8", "FP8_DEFAULT_CFG", "fp8"),
    ("NVFP4", "NVFP4_DEFAULT_CFG", "nvfp4"),
    ("W4A16_NVFP4", "W4A16_NVFP4_CFG", "nvfp4_weight_only"),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GROUPS = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]
_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M1 = torch.tensor(_E2M1 + [-v for v in _E2M1])


def quantized_layers(model: torch.nn.Module) -> dict:
    """The layers whose weight quantizer is on (``lm_head`` has one, off)."""
    return {n: q for n, q in _all_layers(model).items() if q.weight_quantizer.is_enabled}


def llama(dtype: torch.dtype) -> torch.nn.Module:
    """The tests' one-block Llama (``tests/checkpoint/helpers.py: deploy_llama``)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    model.config.architectures = ["LlamaForCausalLM"]  # ModelOpt's exporter requires it
    return model


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))


def calibrate(model: torch.nn.Module) -> None:
    model(IDS)


def modelopt_export(model: torch.nn.Module, cfg_name: str, out: Path) -> Path:
    """Quantize ``model`` with ModelOpt's ``cfg_name`` and write its unified HF checkpoint."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        mtq.quantize(model, getattr(mtq, cfg_name), calibrate)
        with torch.no_grad():
            export_hf_checkpoint(model, export_dir=str(out))
    return out


def qpeft_export(model: torch.nn.Module, preset: str, out: Path, tie: bool) -> torch.nn.Module:
    qpeft.quantize(model, preset, calibrate, tie_fused_scales=tie)
    qpeft.export_hf_checkpoint(model, out, format="modelopt")
    return model


def read(out: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(tensors, hf_quant_config without producer, quantization_config without producer)``."""
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    for d in (hf_quant, config):
        d.pop("producer", None)
    return load_file(str(out / "model.safetensors")), hf_quant, config


def layout_differences(mo: Path, qp: Path) -> list[str]:
    """What differs between two exports' layouts (tensor names, dtypes, shapes; both configs)."""
    (mt, mh, mc), (qt, qh, qc) = read(mo), read(qp)
    found = [f"only ModelOpt writes {k}" for k in sorted(mt.keys() - qt.keys())]
    found += [f"only qpeft writes {k}" for k in sorted(qt.keys() - mt.keys())]
    for k in sorted(mt.keys() & qt.keys()):
        a, b = (mt[k].dtype, list(mt[k].shape)), (qt[k].dtype, list(qt[k].shape))
        if a != b:
            found.append(f"{k}: ModelOpt {a}, qpeft {b}")
    for what, a, b in (("hf_quant_config.json", mh, qh), ("quantization_config", mc, qc)):
        if a != b:
            found.append(f"{what}: ModelOpt {json.dumps(a)}, qpeft {json.dumps(b)}")
    return found


def decode(tensors: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """fp32 weight of one layer (vLLM's / ModelOpt's documented decoding)."""
    w = tensors[f"{layer}.weight"]
    if w.dtype == torch.float8_e4m3fn:
        return w.float() * tensors[f"{layer}.weight_scale"]
    values = torch.stack((E2M1[(w & 0xF).long()], E2M1[(w >> 4).long()]), -1)
    values = values.reshape(w.shape[0], -1, 16)
    scale = tensors[f"{layer}.weight_scale"].float() * tensors[f"{layer}.weight_scale_2"]
    return (values * scale.unsqueeze(-1)).reshape(w.shape[0], -1)


def _scales_agree(a: dict, b: dict, name: str) -> bool:
    """Whether two exports' per-tensor weight scales of ``name`` agree to one fp32 ulp."""
    key = f"{name}.weight_scale_2" if f"{name}.weight_scale_2" in a else f"{name}.weight_scale"
    return torch.allclose(a[key], b[key], rtol=2**-23, atol=0)


def code_differences(mo: Path, qp: Path, layers: list[str]) -> dict[str, int]:
    """Counts of the codes and block scales that differ, over the layers whose per-tensor
    weight scales agree (``layers``, ``codes``, ``differ``, ``minus_zero`` (ModelOpt's E2M1 -0
    where qpeft writes +0), ``scales``, ``scales_differ``, ``all_layers``)."""
    mt, qt = read(mo)[0], read(qp)[0]
    n = dict.fromkeys(("layers", "codes", "differ", "minus_zero", "scales", "scales_differ"), 0)
    n["all_layers"] = len(layers)
    for name in (m for m in layers if _scales_agree(mt, qt, m)):
        a, b = mt[f"{name}.weight"].view(torch.uint8), qt[f"{name}.weight"].view(torch.uint8)
        if mt[f"{name}.weight"].dtype == torch.uint8:  # two FP4 codes per byte
            a, b = torch.stack((a & 0xF, a >> 4)), torch.stack((b & 0xF, b >> 4))
            n["minus_zero"] += int(((a == 8) & (b == 0)).sum())
            sa = mt[f"{name}.weight_scale"].view(torch.uint8)
            sb = qt[f"{name}.weight_scale"].view(torch.uint8)
            n["scales"] += sa.numel()
            n["scales_differ"] += int((sa != sb).sum())
        n["layers"] += 1
        n["codes"] += a.numel()
        n["differ"] += int((a != b).sum())
    return n


def tied_members(model: torch.nn.Module) -> set[str]:
    """Fused-group members whose weight amax is below their group's largest."""
    layers = quantized_layers(model)
    out = set()
    for prefix in {n.rsplit(".", 1)[0] for n in layers}:
        for group in GROUPS:
            names = [f"{prefix}.{g}" for g in group if f"{prefix}.{g}" in layers]
            if len(names) < 2:
                continue
            amax = {n: float(layers[n].weight_quantizer.amax) for n in names}
            out |= {n for n in names if amax[n] < max(amax.values())}
    return out


def tie_differences(out: Path, trained: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{"tied": (differing, elements), "other": ...}`` of the decoded export vs ``Q(W)``.

    Values equal to a relative ``2**-20`` count as equal: ModelOpt's FP8 scale ``amax / 448`` and
    qpeft's ``reciprocal(448 / amax)`` may differ by one fp32 ulp, nothing else does that little.
    """
    tensors = read(out)[0]
    tied = tied_members(trained)
    counts = {"tied": [0, 0], "other": [0, 0]}
    for name, layer in quantized_layers(trained).items():
        want = layer.quantized_weight().float()
        got = decode(tensors, name).to(layer.quantized_weight().dtype).float()
        c = counts["tied" if name in tied else "other"]
        c[0] += int((~torch.isclose(got, want, rtol=2**-20, atol=0)).sum())
        c[1] += want.numel()
    return {k: (v[0], v[1]) for k, v in counts.items()}


def _pct(n: int, total: int) -> str:
    return f"{n} of {total} ({n / total:.2%})" if total else "none"


def run_case(algo: str, cfg_name: str, preset: str, dtype: str, root: Path) -> list[str]:
    base = llama(DTYPES[dtype])
    mo = modelopt_export(copy.deepcopy(base), cfg_name, root / f"mo-{algo}-{dtype}")
    qp_tied = root / f"qp-{algo}-{dtype}"
    tied_model = qpeft_export(copy.deepcopy(base), preset, qp_tied, tie=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qp_untied = root / f"qpu-{algo}-{dtype}"
        untied_model = qpeft_export(copy.deepcopy(base), preset, qp_untied, tie=False)
    layers = sorted(quantized_layers(tied_model))
    codes = code_differences(mo, qp_tied, layers)
    mo_tie, qp_tie = tie_differences(mo, untied_model), tie_differences(qp_untied, untied_model)
    members = ", ".join(sorted(n.rsplit(".", 1)[1] for n in tied_members(untied_model)))
    layout = layout_differences(mo, qp_tied)
    lines = [f"{algo} {dtype}: layout " + ("same" if not layout else "DIFFERS")]
    lines += [f"    {d}" for d in layout]
    line = (
        f"  codes ModelOpt writes other than qpeft's (qpeft tied; {codes['layers']} of "
        f"{codes['all_layers']} layers have the same per-tensor scale): "
        f"{_pct(codes['differ'], codes['codes'])}"
    )
    if codes["scales"]:
        line += (
            f", of them E2M1 -0 for qpeft's +0: {codes['minus_zero']}; block scales "
            f"{_pct(codes['scales_differ'], codes['scales'])}"
        )
    lines.append(line)
    lines.append(
        f"  tie: elements of the layers below their group's weight amax ({members}) whose "
        f"decoded value differs from the untied Q(W): ModelOpt's export {_pct(*mo_tie['tied'])}, "
        f"qpeft's {_pct(*qp_tie['tied'])}; the other layers: ModelOpt {_pct(*mo_tie['other'])}, "
        f"qpeft {_pct(*qp_tie['other'])}"
    )
    return lines


def main() -> int:
    if importlib.util.find_spec("modelopt") is None:
        print("nvidia-modelopt is not installed: nothing to compare (pip install nvidia-modelopt)")
        return 0
    from importlib.metadata import version

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", module="modelopt")
    print(f"ModelOpt {version('nvidia-modelopt')}, qpeft {qpeft.__version__}, CPU")
    with tempfile.TemporaryDirectory() as tmp:
        for algo, cfg_name, preset in CASES:
            for dtype in DTYPES:
                print("\n".join(run_case(algo, cfg_name, preset, dtype, Path(tmp))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
