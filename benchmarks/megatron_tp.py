"""Per-step time of a LoRA'd Megatron-Core MLP on CPU (gloo): tensor-parallel size 1 vs 2.

The MLP is ``RowParallelLinear(gelu(ColumnParallelLinear(x)))`` with a rank-r adapter on both
layers (base frozen); a step is forward + backward of ``x: [s, b, h]``. Each size runs in its own
group of processes (``torch.multiprocessing.spawn``); rank 0 prints the median step time.

Run: ``.venv/bin/python -m benchmarks.megatron_tp [--seq 256 --batch 4 --hidden 1024
--ffn 4096 --rank 16 --repeats 10]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world))  # the same cores for every size
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    import qpeft

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    config = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True)
    init = torch.nn.init.xavier_normal_
    torch.manual_seed(0)
    mlp = torch.nn.ModuleDict(
        {
            "fc1": ColumnParallelLinear(
                args.hidden, args.ffn, config=config, init_method=init, gather_output=False
            ),
            "fc2": RowParallelLinear(
                args.ffn,
                args.hidden,
                config=config,
                init_method=init,
                bias=True,
                input_is_parallel=True,
                skip_bias_add=False,
            ),
        }
    )
    qpeft.update_model(mlp, {"adapter_cfg": {"*": {"rank": args.rank}}})
    x = torch.randn(args.seq, args.batch, args.hidden)
    times = []
    for i in range(args.repeats + 2):
        dist.barrier()
        start = time.perf_counter()
        h, _ = mlp["fc1"](x)
        y, _ = mlp["fc2"](torch.nn.functional.gelu(h))
        y.square().mean().backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    if rank == 0:
        print(
            f"TP={world}: {statistics.median(times) * 1e3:8.1f} ms/step ({torch.get_num_threads()} "
            "threads/rank)"
        )
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [
        ("seq", 256),
        ("batch", 4),
        ("hidden", 1024),
        ("ffn", 4096),
        ("rank", 16),
        ("repeats", 10),
        ("threads", torch.get_num_threads()),
    ]:
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    print(
        f"s={args.seq} b={args.batch} h={args.hidden} ffn={args.ffn} r={args.rank} "
        f"cores={args.threads}"
    )
    for world in (1, 2):
        torch.multiprocessing.spawn(_worker, args=(world, _port(), args), nprocs=world, join=True)


if __name__ == "__main__":
    main()
