"""What differs between model kinds: loading, the distillation target, the loss and the metrics.

``encoder`` (sentence embedding models such as MiniLM): the target is the last hidden state
``[b, s, h]``; the loss is ``1 - cos`` of the mean-pooled normalised embeddings; metrics are the
mean / minimum cosine to the teacher and nearest-neighbour agreement on the eval set.
``causal`` (``*ForCausalLM``): the target is the logits ``[b, s, V]``; the loss is the token KL to
the teacher; metrics are the student's perplexity and its KL to the teacher.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import metrics

__all__ = ["Task", "TASKS", "load_models", "load_student", "make_batches"]

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Task:
    """The behaviour of one model kind (see the module docstring)."""

    kind: str
    forward: Callable[[nn.Module, Batch], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module, nn.Module, list[Batch]], dict[str, float]]
    headline: tuple[str, ...]  # metric names shown in the summary, first is the main one


def _encoder_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state


def _encoder_loss(student: torch.Tensor, teacher: torch.Tensor, batch: Batch) -> torch.Tensor:
    mask = batch["attention_mask"]
    pooled = (metrics.mean_pool(student, mask) * metrics.mean_pool(teacher, mask)).sum(-1)
    if "row_weight" in batch:  # a rank's share: weighted sum / (global rows / ranks)
        return ((1 - pooled) * batch["row_weight"]).sum() / batch["norm"]
    return (1 - pooled).mean()


@torch.no_grad()
def _encoder_evaluate(
    student: nn.Module, teacher: nn.Module, batches: list[Batch]
) -> dict[str, float]:
    emb_s = torch.cat(
        [metrics.mean_pool(_encoder_forward(student, b), b["attention_mask"]) for b in batches]
    )
    emb_t = torch.cat(
        [metrics.mean_pool(_encoder_forward(teacher, b), b["attention_mask"]) for b in batches]
    )
    mean, low = metrics.cosine_stats(emb_s, emb_t)
    return {
        "cos_mean": mean,
        "cos_min": low,
        "nn_agreement": metrics.neighbour_agreement(emb_s, emb_t),
    }


def _causal_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    return out.logits


def _causal_loss(student: torch.Tensor, teacher: torch.Tensor, batch: Batch) -> torch.Tensor:
    return metrics.token_kl(student, teacher, metrics.loss_mask(batch), batch.get("norm"))


@torch.no_grad()
def _causal_evaluate(
    student: nn.Module, teacher: nn.Module, batches: list[Batch]
) -> dict[str, float]:
    nll, count, kl, weight = 0.0, 0, 0.0, 0.0
    for b in batches:
        logits_s, logits_t = _causal_forward(student, b), _causal_forward(teacher, b)
        part, n = metrics.next_token_nll(logits_s, b["input_ids"], b["attention_mask"])
        nll, count = nll + part, count + n
        tokens = float(b["attention_mask"].sum())
        kl, weight = (
            kl + float(metrics.token_kl(logits_s, logits_t, b["attention_mask"])) * tokens,
            weight + tokens,
        )
    return {
        "perplexity": float(torch.tensor(nll / max(count, 1)).exp()),
        "kl": kl / max(weight, 1.0),
    }


TASKS: dict[str, Task] = {
    "encoder": Task(
        "encoder",
        _encoder_forward,
        _encoder_loss,
        _encoder_evaluate,
        ("cos_mean", "cos_min", "nn_agreement"),
    ),
    "causal": Task("causal", _causal_forward, _causal_loss, _causal_evaluate, ("perplexity", "kl")),
}

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def check_model_dir(model_dir: str | Path) -> None:
    """Check, before any work, that ``model_dir`` holds a config and a tokenizer.

    Raises:
        ValueError: the directory is missing, or has no ``config.json`` or no tokenizer file.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a Hugging Face model directory (no config.json)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"{str(path)!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES[:4])}, ...); "
            "save the tokenizer into the model folder (tokenizer.save_pretrained)"
        )


def load_models(
    model_dir: str | Path, prepare_teacher: Callable[[nn.Module], nn.Module] | None = None
) -> tuple[nn.Module, nn.Module, Any, Task]:
    """Teacher (frozen, eval mode), an independent student copy, the tokenizer and the task.

    The kind is ``causal`` when the config's ``architectures`` name a causal LM head, else
    ``encoder``. Loading is offline: nothing is ever downloaded. With ``prepare_teacher`` (e.g.
    sharding it), the teacher is passed through it first and the student is read from
    ``model_dir`` again instead of copied, so the whole teacher and the student never coexist.

    Raises:
        ValueError: the directory is missing, has no ``config.json`` or tokenizer, or cannot be
            loaded.
    """
    path = _offline_dir(model_dir)
    from transformers import AutoTokenizer

    teacher, kind = _read_model(path)
    with _one_line_error(path):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    teacher.eval().requires_grad_(False)
    if prepare_teacher is None:
        return teacher, copy.deepcopy(teacher), tokenizer, TASKS[kind]
    teacher = prepare_teacher(teacher)
    student, _ = _read_model(path)
    return teacher, student.eval().requires_grad_(False), tokenizer, TASKS[kind]


def load_student(model_dir: str | Path) -> nn.Module:
    """A fresh, plain student read from ``model_dir`` as :func:`load_models` reads it (fp32,
    eval mode, frozen, offline), e.g. to restore a checkpoint of the run into.

    Raises:
        ValueError: the directory is missing, has no ``config.json`` or tokenizer, or cannot be
            loaded.
    """
    student, _ = _read_model(_offline_dir(model_dir))
    return student.eval().requires_grad_(False)


def _read_model(path: Path) -> tuple[nn.Module, str]:
    """The fp32 model of a checked directory with the head its kind needs, and that kind."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    with _one_line_error(path):
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        kind = _kind(config)
        loader = AutoModelForCausalLM if kind == "causal" else AutoModel
        return loader.from_pretrained(path, local_files_only=True, dtype=torch.float32), kind


@contextmanager
def _one_line_error(path: Path) -> Iterator[None]:
    """transformers' loading errors as one ``ValueError`` line naming the directory."""
    try:
        yield
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"cannot load model from {str(path)!r}: {str(err).splitlines()[0]}"
        ) from None


def _offline_dir(model_dir: str | Path) -> Path:
    """The checked model directory; transformers set to load offline and quietly."""
    path = Path(model_dir)
    check_model_dir(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show progress; errors stay one line
    hf_logging.set_verbosity_error()
    return path


def _kind(config: Any) -> str:
    """``causal`` when the config's ``architectures`` name a causal LM head, else ``encoder``."""
    heads = config.architectures or []
    return "causal" if any(a.endswith(_CAUSAL_SUFFIXES) for a in heads) else "encoder"


def make_batches(tokenizer: Any, texts: list[str], batch_size: int, max_length: int) -> list[Batch]:
    """Tokenised batches of texts sorted by length (little padding), deterministic.

    Raises:
        ValueError: when no text has a token.
    """
    lengths = [
        len(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts
    ]
    ordered = [t for n, t in sorted(zip(lengths, texts, strict=True)) if n > 0]
    if not ordered:
        raise ValueError("the texts tokenize to nothing")
    return [
        dict(
            tokenizer(
                ordered[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(ordered), batch_size)
    ]
