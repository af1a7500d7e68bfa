"""Load a checkpoint folder with vLLM's own model loader on the CPU; write what vLLM holds.

Run in its own process, with vLLM on ``PYTHONPATH`` (``make vllm-reader`` installs it beside
the venv): ``python tests/checkpoint/vllm_reader.py CKPT OUT [CKPT OUT ...]``. It builds the model
class the folder's ``config.json`` names, lets vLLM read ``hf_quant_config.json`` /
``quantization_config``, load every tensor through its weight loaders (fusing q/k/v and
gate/up) and post-process the weights into its kernels' layout. Then, for every linear layer
vLLM built, it writes to ``OUT/vllm.safetensors``
(in the dtype vLLM serves in: it downcasts fp32 models to bf16, and serves ModelOpt
checkpoints in bf16 / fp16 only):

- ``<layer>.weight``: the weight the layer's kernel multiplies by, decoded from vLLM's
  processed parameters (FP8: ``fp32(code) * weight_scale``; NVFP4: vLLM's own
  ``dequantize_to_dtype``), in the runtime dtype, rows in the checkpoint's order;
- ``<layer>.input`` and ``<layer>.output``: a probe input and the layer's forward on it, through
  the kernel vLLM chose on the CPU (FP8: ``torch._scaled_mm``; NVFP4 W4A4: vLLM's emulation).

Every adapter folder under ``CKPT/adapters/`` is loaded by vLLM's LoRA loader too: its A and B go
to ``lora.<adapter>.<module>.lora_a`` / ``lora_b``, rank and scaling to ``vllm.json``.

The same holds for compressed-tensors folders, for the schemes whose CPU kernels vLLM's wheel
carries in Python (FP8 with dynamic per-token inputs, NVFP4 W4A4); its int8, int4, static-FP8
and weight-only CPU kernels call compiled ops (``torch.ops._C``) that only vLLM's CPU build has.

``<name>.state`` holds every other parameter (embeddings, norms, ``lm_head``) as loaded, and
``OUT/vllm.json`` the quantization method vLLM detected and each layer's method and kernel.
W4A16 NVFP4 has only GPU kernels in vLLM (Marlin, CuTe); on the CPU the layer gets a stand-in
that multiplies by vLLM's decoded weight, so for it only loading and decoding are vLLM's, not
the GEMM.

Three settings adapt vLLM to a machine without an accelerator (its wheel picks no platform when it
finds no GPU): the CPU platform is set by hand, ``torch.accelerator.empty_cache`` is a no-op, and
vLLM's NVFP4 emulation kernel is registered for the CPU platform (vLLM's plugin call).
"""

import json
import sys
from pathlib import Path

import torch

PROBE_ROWS = 4
KERNEL_FIELDS = ("kernel", "fp8_linear")  # where vLLM's linear methods and schemes keep it


def _cpu_vllm():
    """Point vLLM at its CPU platform before anything reads it."""
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    platforms._current_platform = CpuPlatform()
    torch.accelerator.empty_cache = lambda: None


class _WeightOnlyFp4:
    """Stand-in for vLLM's GPU-only W4A16 NVFP4 kernels: x @ decoded weight."""

    def input_quant_key(self):
        return None

    def process_weights_after_loading(self, layer):
        pass

    def apply_weights(self, layer, x, bias=None):
        out = x @ _decoded(layer, x.dtype).t()
        return out if bias is None else out + bias


def _cpu_fp4_kernels():
    """vLLM registers no NVFP4 kernel for its CPU platform: offer it vLLM's own emulation
    (dequantize, then a dense matmul) for W4A4, and the stand-in above for W4A16."""
    from vllm.model_executor.kernels.linear import register_linear_kernel
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.model_executor.layers.quantization import modelopt
    from vllm.platforms import PlatformEnum

    register_linear_kernel(EmulationNvFp4LinearKernel, PlatformEnum.CPU, "nvfp4")

    select = modelopt.select_linear_kernel

    def select_or_stand_in(spec, layer, rt, weight_shape=None):
        try:
            return select(spec, layer, rt, weight_shape=weight_shape)
        except ValueError:
            if spec.activation is not None:
                raise
            return _WeightOnlyFp4()

    modelopt.select_linear_kernel = select_or_stand_in


def _kernel(layer, scheme):
    for owner in (layer.quant_method, scheme):
        for field in KERNEL_FIELDS:
            if getattr(owner, field, None) is not None:
                return getattr(owner, field)
    return None


def _decoded(layer, dtype):
    """The [out, in] weight the layer's kernel multiplies by."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (
        dequantize_to_dtype,
    )

    w = layer.weight
    if w.dtype == torch.float8_e4m3fn:  # stored [in, out] for torch._scaled_mm
        return (w.t().float() * layer.weight_scale.float()).to(dtype)
    if w.dtype == torch.uint8:
        gs = layer.weight_global_scale
        return dequantize_to_dtype(w, layer.weight_scale, gs, dtype, 16, swizzle=False)
    return w.to(dtype)


def _config(ckpt: Path | None = None):
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig

    found = {"device_config": DeviceConfig("cpu"), "load_config": LoadConfig()}
    if ckpt is not None:
        found["model_config"] = ModelConfig(
            model=str(ckpt), skip_tokenizer_init=True, enforce_eager=True
        )
    return VllmConfig(**found)


def _parallel_state():
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with set_current_vllm_config(_config()):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method="tcp://127.0.0.1:0",
            backend="gloo",
        )
        initialize_model_parallel(1, 1)


def _read(ckpt: Path, out: Path) -> None:
    """Load ``ckpt`` with vLLM and write what it holds to ``out`` (see the module's text)."""
    from safetensors.torch import save_file
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model

    config = _config(ckpt)
    with set_current_vllm_config(config), torch.no_grad():
        model = get_model(vllm_config=config)
        runtime = config.model_config.dtype
        tensors, layers = _probe(model, runtime)
        scales = _adapters(ckpt / "adapters", runtime, tensors)
    info = {
        "quantization": config.model_config.quantization,
        "dtype": str(runtime).removeprefix("torch."),
        "layers": layers,
        "adapters": scales,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "vllm.safetensors"))
    (out / "vllm.json").write_text(json.dumps(info, indent=1))


def _adapters(folder: Path, runtime, tensors) -> dict:
    """Load every HF PEFT folder under ``folder`` with vLLM's LoRA loader (what
    ``--lora-modules`` runs); store its A and B as ``lora.<adapter>.<module>.lora_a`` / ``lora_b``
    and return {adapter: {module: (rank, scaling)}}."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    found = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        helper = PEFTHelper.from_local_dir(str(path), max_position_embeddings=None)
        lora = LoRAModel.from_local_checkpoint(
            str(path), set(helper.target_modules), helper, device="cpu", dtype=runtime
        )
        found[path.name] = {}
        for module, weights in lora.loras.items():
            tensors[f"lora.{path.name}.{module}.lora_a"] = weights.lora_a.contiguous()
            tensors[f"lora.{path.name}.{module}.lora_b"] = weights.lora_b.contiguous()
            found[path.name][module] = [weights.rank, weights.scaling]
    return found


def _probe(model, runtime):
    from vllm.model_executor.layers.linear import LinearBase

    tensors, layers = {}, {}
    gen = torch.Generator().manual_seed(0)
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase):
            for key, p in layer.named_parameters(prefix=name, recurse=False):
                tensors[f"{key}.state"] = p.detach().contiguous()
            continue
        x = torch.randn(PROBE_ROWS, layer.input_size, generator=gen).to(runtime)
        y = layer(x)
        tensors[f"{name}.weight"] = _decoded(layer, runtime).contiguous()
        tensors[f"{name}.input"] = x
        tensors[f"{name}.output"] = (y[0] if isinstance(y, tuple) else y).contiguous()
        scheme = getattr(layer, "scheme", None)  # compressed-tensors keeps its kernel there
        kernel = _kernel(layer, scheme)
        layers[name] = {
            "method": type(scheme or layer.quant_method).__name__,
            "kernel": None if kernel is None else type(kernel).__name__,
        }
    return tensors, layers


def main(args: list[str]) -> None:
    """``CKPT OUT [CKPT OUT ...]``: read each checkpoint folder into its output folder."""
    if not args or len(args) % 2:
        raise SystemExit("usage: vllm_reader.py CKPT OUT [CKPT OUT ...]")
    _cpu_vllm()
    _cpu_fp4_kernels()
    _parallel_state()
    for ckpt, out in zip(args[::2], args[1::2], strict=True):
        _read(Path(ckpt), Path(out))


if __name__ == "__main__":
    main(sys.argv[1:])
