"""Persistence and export against their peers: ``python -m benchmarks.persist [--repeats N]``.

Model: a Llama (hidden 512, 4 layers, vocab 8192, about 21M parameters) with a rank-16 LoRA on
every attention and MLP projection. Times are medians over ``N`` interleaved repeats (each
candidate once per round, order rotating) after one warm-up round; sizes are bytes on disk.

- full checkpoint: ``qpeft.save`` / ``qpeft.restore`` (safetensors + JSON, atomic swap, restore
  validated on a deep copy then replayed) vs ``torch.save`` / ``torch.load`` + ``load_state_dict``
  of the same state dict (a pickle, not atomic, no validation);
- adapter only: ``qpeft.save_adapters`` and ``qpeft.export_hf_peft`` vs ``peft``'s
  ``save_pretrained``;
- parity: qpeft -> HF PEFT files -> ``peft`` outputs, ``peft`` -> ``import_hf_peft`` outputs,
  ``export`` outputs, ``merge``/``unmerge`` weight round trip (max absolute differences, fp32).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import qpeft


def _build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def _peft_model():
    model = _build()
    qpeft.update_model(model, {"adapter_cfg": {"*layers*": {"rank": 16, "scale": 2.0}}})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in qpeft.lora_layers(model).values():
            for p in layer.adapters.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def _size(path: Path) -> int:
    return (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def _time(candidates: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {n: [] for n in candidates}
    names = list(candidates)
    for round_ in range(repeats + 1):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            candidates[name]()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.persist", description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    import peft

    model = _peft_model()
    ids = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    tmp = Path(tempfile.mkdtemp())
    fresh = [_build() for _ in range(2 * args.repeats + 2)]  # restore needs an unconverted model
    hf = peft.get_peft_model(
        _build(),
        peft.LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules="all-linear",
            exclude_modules=["lm_head"],
            init_lora_weights=False,
        ),
    )

    def torch_load():
        m = fresh.pop()
        qpeft.update_model(m, {"adapter_cfg": {"*layers*": {"rank": 16, "scale": 2.0}}})
        m.load_state_dict(torch.load(tmp / "sd.pt", weights_only=True))

    t = _time(
        {
            "qpeft.save": lambda: qpeft.save(model, tmp / "ck"),
            "torch.save": lambda: torch.save(model.state_dict(), tmp / "sd.pt"),
        },
        args.repeats,
    )
    t |= _time(
        {
            "qpeft.restore": lambda: qpeft.restore(fresh.pop(), tmp / "ck"),
            "update_model + torch.load": torch_load,
        },
        args.repeats,
    )
    t |= _time(
        {
            "qpeft.save_adapters": lambda: qpeft.save_adapters(model, tmp / "ad"),
            "qpeft.export_hf_peft": lambda: qpeft.export_hf_peft(model, tmp / "hf"),
            "peft save_pretrained": lambda: hf.save_pretrained(tmp / "peft"),
        },
        args.repeats,
    )
    sizes = {
        "qpeft.save": tmp / "ck",
        "torch.save": tmp / "sd.pt",
        "qpeft.save_adapters": tmp / "ad",
        "qpeft.export_hf_peft": tmp / "hf",
        "peft save_pretrained": tmp / "peft",
    }
    for name, seconds in t.items():
        size = f"{_size(sizes[name]) / 2**20:8.2f} MiB" if name in sizes else ""
        print(f"{name:28s} {seconds * 1e3:9.1f} ms  {size}")

    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(_build(), tmp / "hf").eval()
        print(
            f"max |qpeft - peft(export_hf_peft)|     {(loaded(ids).logits - ref).abs().max():.3g}"
        )
        back = qpeft.import_hf_peft(_build(), tmp / "peft")
        print(
            "max |import_hf_peft - peft|            "
            f"{(back(ids).logits - hf.eval()(ids).logits).abs().max():.3g}"
        )
        restored = qpeft.restore(_build(), tmp / "ck")
        print(f"restore bit-identical                  {torch.equal(restored(ids).logits, ref)}")
        merged = copy.deepcopy(model)
        before = {k: v.clone() for k, v in merged.state_dict().items()}
        qpeft.merge_adapters(merged)
        print(
            f"max |merged - LoRA| outputs            {(merged(ids).logits - ref).abs().max():.3g}"
        )
        qpeft.unmerge_adapters(merged)
        err = max((v - before[k]).abs().max().item() for k, v in merged.state_dict().items())
        print(f"max |unmerge(merge(W)) - W|            {err:.3g}")
        qpeft.export(model)
        print(f"max |export - LoRA| outputs            {(model(ids).logits - ref).abs().max():.3g}")


if __name__ == "__main__":
    main()
