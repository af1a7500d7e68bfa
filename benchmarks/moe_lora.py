"""Step time of LoRA on grouped experts vs the bare experts module (CPU, fp32).

A Qwen3-MoE-shaped experts module (fused ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
runs forward + backward on ``T`` tokens routed top-k: the bare module (frozen weights, input
gradient only) against the same module with a rank-r LoRA adapter on every expert (adapter
gradients), under transformers' ``grouped_mm`` and ``batched_mm`` experts implementations.

Run: ``.venv/bin/python -m benchmarks.moe_lora [--tokens 1024 --experts 16 --hidden 512
--inter 256 --top-k 4 --rank 16 --repeats 10 --implementations grouped_mm batched_mm]``.
``batched_mm`` gathers one weight matrix per routed row (``T * k * 2I * H`` floats): keep ``T``
small.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import qpeft


def _experts(args: argparse.Namespace, implementation: str) -> torch.nn.Module:
    cfg = Qwen3MoeConfig(
        hidden_size=args.hidden, moe_intermediate_size=args.inter, num_experts=args.experts
    )
    cfg._experts_implementation = implementation
    torch.manual_seed(0)
    module = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, 0.02)
        module.down_proj.normal_(0, 0.02)
    module.requires_grad_(False)
    return module


def _step_seconds(module: torch.nn.Module, inputs: tuple, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):  # two warm-up steps
        hidden = inputs[0].clone().requires_grad_()
        start = time.perf_counter()
        module(hidden, *inputs[1:]).square().mean().backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [
        ("tokens", 1024),
        ("experts", 16),
        ("hidden", 512),
        ("inter", 256),
        ("top-k", 4),
        ("rank", 16),
        ("repeats", 10),
    ]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument(
        "--implementations", nargs="+", default=["grouped_mm"], choices=["grouped_mm", "batched_mm"]
    )
    args = parser.parse_args()
    torch.manual_seed(1)
    hidden = torch.randn(args.tokens, args.hidden)
    scores = torch.randn(args.tokens, args.experts).softmax(-1)
    weights, index = scores.topk(args.top_k, dim=-1)
    print(
        f"T={args.tokens} E={args.experts} H={args.hidden} I={args.inter} k={args.top_k} "
        f"r={args.rank} threads={torch.get_num_threads()}"
    )
    print(f"{'implementation':<12} {'bare ms':>9} {'LoRA ms':>9} {'overhead':>9}")
    for implementation in args.implementations:
        bare = _experts(args, implementation)
        wrapped = torch.nn.ModuleDict({"experts": _experts(args, implementation)})
        qpeft.update_model(wrapped, {"adapter_cfg": {"*": {"rank": args.rank}}})
        inputs = (hidden, index, weights)
        t_bare = _step_seconds(bare, inputs, args.repeats)
        t_lora = _step_seconds(wrapped["experts"], inputs, args.repeats)
        print(
            f"{implementation:<12} {t_bare * 1e3:9.1f} {t_lora * 1e3:9.1f} {t_lora / t_bare:8.2f}x"
        )


if __name__ == "__main__":
    main()
