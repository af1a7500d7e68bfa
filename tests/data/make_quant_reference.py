"""Generate ``quant_reference.safetensors``: NVIDIA ModelOpt 0.47.0 fake-quant outputs.

Not run by the tests. ModelOpt is never a dependency of qpeft: run this script from a
throwaway virtual environment outside the repository that has the CPU build of
``torch==2.13.0`` and ``nvidia-modelopt==0.47.0`` (plus ``requests`` and
``huggingface_hub``, which ModelOpt imports)::

    python3 -m venv <tmp>/movenv
    <tmp>/movenv/bin/pip install torch==2.13.0 nvidia-modelopt==0.47.0 requests huggingface_hub
    <tmp>/movenv/bin/python tests/data/make_quant_reference.py

Everything runs on CPU. References per format:

* int8 / int4: ModelOpt ``fake_tensor_quant`` and ``TensorQuantizer`` (its CPU path).
* fp8: ModelOpt ``scaled_e4m3`` (eager CPU path).
* nvfp4 / mxfp4: ModelOpt only fake-quantizes these with CUDA kernels, so the reference is
  ``NVFP4QTensor`` / ``MXFP4QTensor`` ``quantize`` followed by ``dequantize``. Inputs whose
  last dim is not a multiple of the block are zero-padded per row here, quantized, and
  sliced back (``MXFP4QTensor`` cannot pad; ``NVFP4QTensor`` pads but cannot unpad).
  ``MXFP4QTensor`` rounds E2M1 ties toward zero, while ModelOpt's MXFP4 fake-quant kernel (what
  it trains with, and qpeft's default) rounds them to even: the tests compare the stored mxfp4
  outputs with ``fake_quant_mxfp4(x, ties_to_even=False)`` and check that the default differs
  only at exact ties; the ties-to-even rule itself is checked on ModelOpt's own hand-made case.

Keys are ``<case>.<dtype>.<name>`` with name in x, amax, y, grad_out, grad, calib_amax.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from modelopt.torch.quantization.config import QuantizerAttributeConfig
from modelopt.torch.quantization.nn import TensorQuantizer
from modelopt.torch.quantization.qtensor import MXFP4QTensor, NVFP4QTensor
from modelopt.torch.quantization.tensor_quant import fake_tensor_quant, scaled_e4m3
from safetensors.torch import save_file

OUT = Path(__file__).with_name("quant_reference.safetensors")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]


def randn(gen, *shape, std=1.0):
    return torch.randn(*shape, generator=gen) * std


def calibrate(cfg: dict, x: torch.Tensor):
    q = TensorQuantizer(QuantizerAttributeConfig(**cfg))
    q.disable_quant()
    q.enable_calib()
    q(x)
    q.load_calib_amax()
    q.disable_calib()
    q.enable_quant()
    return q


def int_ref(x, amax, num_bits=8, grad_out=None):
    """ModelOpt integer fake quant; pass_through_bwd=False when a gradient is wanted."""
    x = x.clone().requires_grad_(grad_out is not None)
    y = fake_tensor_quant(x, amax, None, num_bits, False, False, None, grad_out is None)
    if grad_out is None:
        return y.detach(), None
    y.backward(grad_out)
    return y.detach(), x.grad


def fp8_ref(x, amax, grad_out=None):
    x = x.clone().requires_grad_(grad_out is not None)
    y = scaled_e4m3(x, amax, None, 4, 3, None, grad_out is None)
    if grad_out is None:
        return y.detach(), None
    y.backward(grad_out)
    return y.detach(), x.grad


def pad_last(x, block):
    return F.pad(x, (0, (-x.shape[-1]) % block))


def nvfp4_ref(x, global_amax, block=16):
    xp = pad_last(x, block)
    gs = global_amax.float() / (6.0 * 448.0)
    qt, scale, gs2 = NVFP4QTensor.quantize(xp, block, weights_scaling_factor_2=gs)
    y = qt.dequantize(scale=scale, double_scale=gs2, block_sizes={-1: block})
    return y[..., : x.shape[-1]]


def mxfp4_ref(x, block=32):
    xp = pad_last(x, block)
    qt, scale = MXFP4QTensor.quantize(xp, block)
    y = qt.dequantize(dtype=x.dtype, scale=scale, block_sizes={-1: block})
    return y[..., : x.shape[-1]]


def int_cases(gen, d, out):
    x = randn(gen, 16, 64, std=3.0)
    x[0, :12] = torch.tensor([0.0, -0.0, 3.1, -3.1, 4.0, -4.0, 50.0, -50.0, 1e-9, -1e-9, 3.0, -3.0])
    x = x.to(d)
    amax = torch.tensor(3.1)
    out["int8_tensor"] = {"x": x, "amax": amax, "y": int_ref(x, amax)[0]}
    # amax 127 makes the scale exactly 1, so every k + 0.5 is a round-half-even tie
    x = (torch.arange(-300, 300, dtype=torch.float32) / 2).reshape(20, 30).to(d)
    amax = torch.tensor(127.0)
    out["int8_ties"] = {"x": x, "amax": amax, "y": int_ref(x, amax)[0]}
    x = randn(gen, 4, 8).to(d)
    amax = torch.tensor(2.0**-25)
    out["int8_tiny"] = {"x": x, "amax": amax, "y": int_ref(x, amax)[0]}
    w = randn(gen, 32, 64, std=0.05)
    w[3] = 0.0
    w[3, ::2] = -0.0
    w[5] = randn(gen, 64, std=1e-9)
    w = w.to(d)
    calib = calibrate({"num_bits": 8, "axis": 0}, w)._amax.float()
    amax = calib * 0.75
    g = randn(gen, 32, 64).to(d)
    y, grad = int_ref(w, amax, grad_out=g)
    out["int8_row"] = {
        "x": w,
        "calib_amax": calib,
        "amax": amax,
        "y": y,
        "grad_out": g,
        "grad": grad,
    }
    y_full = calibrate({"num_bits": 8, "axis": 0}, w)(w)
    out["int8_row_calibrated"] = {"y": y_full}
    for name, shape in (("int4_block", (6, 200)), ("int4_block_even", (4, 256))):
        w = randn(gen, *shape, std=0.02)
        w[0, :128] = 0.0
        w[1, :3] = torch.tensor([-0.0, 0.1, -0.1])
        w = w.to(d)
        y = calibrate({"num_bits": 4, "block_sizes": {-1: 128}}, w)(w)
        out[name] = {"x": w, "y": y}


def fp8_cases(gen, d, out):
    x = randn(gen, 8, 64, std=4.0)
    x[0, :6] = torch.tensor([0.0, -0.0, 1000.0, -1000.0, 1e-12, -1e-12])
    x = x.to(d)
    amax = x.float().abs().amax() * 0.5
    g = randn(gen, 8, 64).to(d)
    y, grad = fp8_ref(x, amax, grad_out=g)
    out["fp8_tensor"] = {"x": x, "amax": amax, "y": y, "grad_out": g, "grad": grad}
    # many distinct amax values: 448 / amax and reciprocal(amax) * 448 differ for some
    x = (randn(gen, 32, 32) * torch.logspace(-3, 3, 32).unsqueeze(1)).to(d)
    amax = x.float().abs().amax(dim=1, keepdim=True) * 0.9
    out["fp8_row"] = {"x": x, "amax": amax, "y": fp8_ref(x, amax)[0]}
    x = torch.cat([randn(gen, 60, std=100.0), torch.tensor([448.0, 464.0, 480.0, -500.0])])
    x = x.reshape(4, 16).to(d)
    amax = torch.tensor(2.0**-25)
    out["fp8_tiny"] = {"x": x, "amax": amax, "y": fp8_ref(x, amax)[0]}


def ties_block(size):
    row = torch.zeros(size)
    row[0] = 6.0
    row[1:8] = torch.tensor(TIES)
    row[8:15] = -torch.tensor(TIES)
    row[15] = -0.0
    return row


def nvfp4_cases(gen, d, out):
    x = randn(gen, 8, 64)
    x[2, :16] = 0.0
    x[3, 16:32] = randn(gen, 16, std=1e-8)
    x[4, :4] = torch.tensor([-0.0, -1e-6, 1e-6, 0.0])
    x = x.to(d)
    gamax = x.float().abs().amax()
    out["nvfp4"] = {"x": x, "amax": gamax, "y": nvfp4_ref(x, gamax)}
    out["nvfp4_sat"] = {"x": x, "amax": gamax * 0.25, "y": nvfp4_ref(x, gamax * 0.25)}
    x = randn(gen, 4, 40, std=0.1).to(d)
    gamax = x.float().abs().amax()
    out["nvfp4_pad"] = {"x": x, "amax": gamax, "y": nvfp4_ref(x, gamax)}
    # global amax 2688 gives a global scale of exactly 1; block max 6 gives block scale 1
    x = torch.stack([ties_block(16), -ties_block(16)]).to(d)
    gamax = torch.tensor(2688.0)
    out["nvfp4_ties"] = {"x": x, "amax": gamax, "y": nvfp4_ref(x, gamax)}


def mxfp4_cases(gen, d, out):
    x = randn(gen, 8, 64)
    x[2, :32] = 0.0
    x[3, 32:] = randn(gen, 32, std=1e-30)
    x[5, :32] = torch.cat([ties_block(16), -ties_block(16)])
    # block amax one fp32 ulp above 6 * 2^3: fp32 log2 rounds, so the exponent is 3 not 4
    x[6, :32] = randn(gen, 32).clamp(-40, 40)
    x[6, 0] = torch.nextafter(torch.tensor(48.0), torch.tensor(100.0))
    x = x.to(d)
    out["mxfp4"] = {"x": x, "y": mxfp4_ref(x)}
    x = randn(gen, 4, 48, std=3.0).to(d)
    out["mxfp4_pad"] = {"x": x, "y": mxfp4_ref(x)}


def main():
    tensors = {}
    for dname, d in DTYPES.items():
        gen = torch.Generator().manual_seed(1234)
        cases: dict = {}
        for fn in (int_cases, fp8_cases, nvfp4_cases, mxfp4_cases):
            fn(gen, d, cases)
        for case, entries in cases.items():
            for key, t in entries.items():
                tensors[f"{case}.{dname}.{key}"] = t.detach().contiguous().clone()
    save_file(tensors, str(OUT), metadata={"modelopt": "0.47.0", "torch": torch.__version__})
    print(f"wrote {len(tensors)} tensors, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
