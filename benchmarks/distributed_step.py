"""Per-step training time of a LoRA model on 1 rank vs. 2 ranks (DDP, FSDP2, tensor parallel).

Run: ``.venv/bin/python -m benchmarks.distributed_step [--steps 10] [--threads 1] [--engines ddp
fsdp2 tp]``

The model is a small Llama (built from a config, random weights) with LoRA (rank 16) on every
projection; one step is forward, cross-entropy, backward and an AdamW step on the adapters, over a
fixed global batch. Data parallel ranks take half the batch each; tensor-parallel ranks take the
whole batch and half of every projection. Ranks are CPU processes on gloo with ``--threads``
intra-op threads each (default 1: one core per rank). A step's time is the
slowest rank's (ranks synchronise before and after it); the table gives the median over ``--steps``
measured steps after 2 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.nn.parallel import DistributedDataParallel as DDP

import qpeft

WARMUP = 2
ENGINES = {"single": 1, "ddp": 2, "fsdp2": 2, "tp": 2}


def build_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg)
    return qpeft.update_model(model, {"adapter_cfg": {"*proj*": {"rank": 16}}})


def tp_plan() -> dict:
    layer = "model.layers.*."
    plan = {layer + f"self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")}
    plan.update(
        {layer + "self_attn.o_proj": RowwiseParallel(), layer + "mlp.down_proj": RowwiseParallel()}
    )
    plan.update({layer + f"mlp.{p}": ColwiseParallel() for p in ("gate_proj", "up_proj")})
    return plan


def prepare(engine: str, model: torch.nn.Module, world: int) -> torch.nn.Module:
    mesh = init_device_mesh("cpu", (world,))
    if engine == "ddp":
        return DDP(model)
    if engine == "fsdp2":
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if engine == "tp":
        return qpeft.parallelize_lora(model, mesh, tp_plan())
    return model


def rank_main(
    rank: int, engine: str, world: int, args: argparse.Namespace, store: str, out: str
) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = prepare(engine, build_model(), world)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (args.batch, args.seq + 1), generator=gen)
    if engine in ("ddp", "fsdp2"):
        ids = ids.chunk(world)[rank]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(WARMUP + args.steps):
        dist.barrier()
        start = time.perf_counter()
        logits = model(ids[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def measure(engine: str, args: argparse.Namespace) -> float:
    world = ENGINES[engine]
    with tempfile.TemporaryDirectory() as tmp:
        store, out = str(Path(tmp) / "store"), str(Path(tmp) / "times.json")
        mp.spawn(rank_main, args=(engine, world, args, store, out), nprocs=world, join=True)
        return statistics.median(json.loads(Path(out).read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="measured steps per engine")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=64, help="sequence length")
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    engines = [
        e for e in ENGINES if e == "single" or e in args.engines
    ]  # always the 1-rank baseline
    results = {engine: measure(engine, args) for engine in engines}
    base = results["single"]
    print(
        f"LoRA Llama step, batch {args.batch}x{args.seq}, {args.threads} thread(s) per rank, "
        f"median of {args.steps} steps"
    )
    print("| engine | ranks | median step (ms) | vs 1 rank |\n|---|---|---|---|")
    for engine, seconds in results.items():
        print(f"| {engine} | {ENGINES[engine]} | {seconds * 1e3:.1f} | {base / seconds:.2f}x |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "median_s": results}, indent=2
            )
        )


if __name__ == "__main__":
    main()
