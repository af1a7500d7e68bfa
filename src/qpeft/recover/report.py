"""The run's human-readable outputs: the summary table, ``report.json`` and PNG plots.

Plots (matplotlib, Agg backend, no display needed):
``layer_error.png`` per-layer relative weight error ``||W - Q(W) - sBA|| / ||W||`` after
quantization, after init and after recovery; ``training_loss.png`` block-wise and end-to-end
losses per step (with the validation loss); ``metrics.png`` each headline metric per stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["summary_table", "deploy_lines", "write_report", "write_plots", "STAGES"]

STAGES = ("original", "quantized", "init", "blockwise", "recovered")
_LABELS = {
    "original": "before quantization",
    "quantized": "after quantization",
    "init": "after init",
    "blockwise": "after block-wise",
    "recovered": "after recovery",
}


def summary_table(run: dict[str, Any]) -> str:
    """The summary: headline metrics and time per stage, adapter vs model size, peak memory and
    the deployable size (plain text)."""
    names = list(run["headline"])
    rows = [["stage", *names, "time (s)"]]
    for stage in STAGES:
        if stage in run["stages"]:
            values = [f"{run['stages'][stage][n]:.4f}" for n in names]
            rows.append([_LABELS[stage], *values, f"{run['seconds'][stage]:.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def fmt(r: list[str]) -> str:
        cells = enumerate(zip(r, widths, strict=False))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in cells)

    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths), *map(fmt, rows[1:])]
    opts, sizes = run["options"], run["sizes"]
    lines += [
        "",
        f"format {opts['format']}, LoRA rank {opts['rank']} ({opts['init']}), "
        f"{run['counts']['train']} train / {run['counts']['valid']} valid / "
        f"{run['counts']['eval']} eval texts",
        f"adapter {sizes['adapter_mb']:.2f} MB vs model {sizes['model_mb']:.2f} MB "
        f"({100 * sizes['adapter_mb'] / max(sizes['model_mb'], 1e-9):.1f}%); "
        f"total time {sum(run['seconds'].values()):.1f} s",
        f"peak memory {sizes.get('peak_rss_mb', float('nan')):.0f} MiB (max RSS)"
        + (", compressed student" if opts.get("compress") else ""),
    ]
    return "\n".join(lines + _left_out_lines(run.get("hf_adapter_left_out")) + deploy_lines(run))


def _left_out_lines(left: dict[str, Any] | None) -> list[str]:
    """The note on adapters that the HF PEFT files cannot hold (grouped MoE experts)."""
    if not left:
        return []
    layers = left["layers"]
    names = ", ".join(layers[:2]) + (", ..." if len(layers) > 2 else "")
    where = "hf_adapter/ holds the other layers'" if left["written"] else "no hf_adapter/ written"
    return [
        f"not in the HF PEFT files: the adapters of {len(layers)} {left['kind']} "
        f"layer{'s' if len(layers) > 1 else ''} ({names}; no HF PEFT layout; {where}); "
        f"{left['held_in']}/ holds every adapter (qpeft.restore)"
    ]


# -- deploy/ (export_hf_checkpoint) ----------------------------------------------------------------
def deploy_lines(run: dict[str, Any]) -> list[str]:
    """The summary's deploy line: ``deploy/``'s size against the dense model, or why the run wrote
    no ``deploy/`` (``run["deploy"]``, see :func:`qpeft.recover.saving.write_deploy`); nothing
    when the run has no deploy record."""
    deploy = run.get("deploy")
    if not deploy:
        return []
    if not deploy["written"]:
        return [f"deploy/ not written: {deploy['reason']}"]
    return [
        f"deploy/ ({deploy['format']}): model {deploy['model_mb']:.2f} MiB vs dense "
        f"{deploy['dense_mb']:.2f} MiB ({100 * deploy['ratio']:.1f}%), "
        f"adapters {deploy['adapters_mb']:.2f} MiB"
    ] + [_warning_line(w) for w in deploy.get("warnings", [])]


def _warning_line(text: str) -> str:
    """One summary line for a warning of the export (the whole text is in report.json)."""
    if "do not share their scales" in text:
        groups = text.count(" weight elements change")
        return (
            f"deploy/ holds {groups} fused groups (q/k/v, gate/up) requantized with a shared "
            "scale, as engines run them: not exactly the trained student (the change per group is "
            "in report.json, deploy.warnings); --tie-fused-scales trains on the served numerics"
        )
    return f"deploy/ export warned: {text.splitlines()[0][:200]}"


def write_report(run: dict[str, Any], folder: Path) -> Path:
    """Write ``report.json`` (the whole run, plain JSON) and ``summary.txt``; return the JSON
    path."""
    path = folder / "report.json"
    path.write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
    (folder / "summary.txt").write_text(summary_table(run) + "\n", encoding="utf-8")
    return path


def write_plots(run: dict[str, Any], folder: Path) -> list[Path]:
    """Write the three PNG plots (see the module docstring); return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [folder / "layer_error.png", folder / "training_loss.png", folder / "metrics.png"]
    for path, draw in zip(paths, (_layer_error, _losses, _metrics), strict=True):
        fig = plt.figure(figsize=(9, 4.5))
        draw(fig, run)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return paths


def _layer_error(fig, run: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    for when, errors in run["layer_error"].items():
        ax.plot(
            range(len(errors)), list(errors.values()), marker=".", label=_LABELS.get(when, when)
        )
    ax.set(
        xlabel="quantized layer (model order)",
        ylabel="||W - Q(W) - sBA|| / ||W||",
        title="per-layer relative weight error",
        yscale="log",
    )
    ax.legend()


def _losses(fig, run: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    block, e2e = run["block_losses"], run["train_losses"]
    if block:
        ax.plot(range(len(block)), block, lw=0.8, label="block-wise (relative MSE)")
    if e2e:
        ax.plot(
            range(len(block), len(block) + len(e2e)), e2e, lw=0.8, label="end-to-end (distillation)"
        )
    if run["valid_losses"]:
        steps, values = zip(*run["valid_losses"], strict=True)
        ax.plot([len(block) + s for s in steps], values, "o-", label="end-to-end validation")
    ax.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    ax.legend()


def _metrics(fig, run: dict[str, Any]) -> None:
    stages = [s for s in STAGES if s in run["stages"]]
    names = list(run["headline"])
    for k, name in enumerate(names, 1):  # one panel per metric: their scales differ
        ax = fig.add_subplot(1, len(names), k)
        ax.plot(range(len(stages)), [run["stages"][s][name] for s in stages], "o-")
        ax.set_xticks(
            range(len(stages)), [_LABELS[s] for s in stages], rotation=35, ha="right", fontsize=8
        )
        ax.set(title=name)
    fig.suptitle("eval metric per stage")
