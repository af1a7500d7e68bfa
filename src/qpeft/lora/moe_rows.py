"""Routed rows of a top-k mixture of experts, and matmuls with one weight per expert over them.

Top-k routing sends token ``t`` (of ``T``) to ``k`` experts with weights ``w[t, j]``. The
``S = T * k`` (token, expert) pairs are the *rows* an expert layer computes on. Two row layouts,
the two of transformers' loop-free experts implementations:

- ``grouped``: rows sorted by expert, contiguous per expert; ``offsets: [E]`` (int32) holds the
  end row of each expert, and ``x [S, K] @ W[e] [K, N]`` for every row is one grouped GEMM
  (``torch.nn.functional.grouped_mm``).
- ``batched``: rows in token order (``t * k + j``); each row gathers its expert's matrix and one
  ``bmm`` computes all rows (memory ``S * K * N``).

:func:`expert_matmul` is the per-row product ``x[s] @ W[expert(s)]`` for ``x: [S, K]`` and
``W: [E, K, N]``; :meth:`Routing.combine` sums each token's ``k`` weighted rows back to ``[T, H]``
in the same order as transformers does, so the base part of a LoRA experts layer matches it bit
for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Routing", "expert_matmul"]

_ALIGN_BYTES = 16  # grouped_mm needs every non-unit stride and the data pointer 16-byte aligned


@dataclass
class Routing:
    """Where each row comes from and goes to. ``kind`` is ``"grouped"`` or ``"batched"``."""

    kind: str
    expert_ids: torch.Tensor  # [S] expert of each row, in row order
    source: torch.Tensor  # [S] flat (t * k + j) position of each row
    weights: torch.Tensor  # [S] routing weight of each row
    offsets: torch.Tensor | None  # [E] int32 end row per expert (grouped only)
    num_tokens: int
    top_k: int

    @classmethod
    def build(
        cls, kind: str, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
    ) -> Routing:
        """Rows for ``top_k_index, top_k_weights: [T, k]`` in layout ``kind``.

        Raises:
            ValueError: for an unknown ``kind`` or an expert index outside ``[0, num_experts)``.
        """
        if kind not in ("grouped", "batched"):
            raise ValueError(f"unknown row layout {kind!r}; expected 'grouped' or 'batched'")
        num_tokens, top_k = top_k_index.shape
        flat_ids, flat_w = top_k_index.reshape(-1), top_k_weights.reshape(-1)
        if flat_ids.numel() and (int(flat_ids.min()) < 0 or int(flat_ids.max()) >= num_experts):
            raise ValueError(f"top_k_index holds an expert outside [0, {num_experts})")
        if kind == "batched":
            source = torch.arange(flat_ids.numel(), device=flat_ids.device)
            return cls(kind, flat_ids, source, flat_w, None, num_tokens, top_k)
        ids, source = torch.sort(flat_ids)
        # histc, as transformers does: float input on CPU/MPS, int elsewhere.
        counts_in = ids.float() if ids.device.type in ("cpu", "mps") else ids.int()
        counts = torch.histc(counts_in, bins=num_experts, min=0, max=num_experts - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        return cls(kind, ids, source, flat_w[source], offsets, num_tokens, top_k)

    def rows(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[T, H] -> [S, H]``: the input of every row."""
        if self.kind == "batched":
            return hidden_states.repeat_interleave(self.top_k, dim=0)
        return hidden_states[self.source // self.top_k]

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        """``[S, H] -> [T, H]``: weight every row and sum each token's ``k`` rows (top-k order)."""
        weighted = rows * self.weights.unsqueeze(-1)
        if self.kind == "grouped":
            inverse = torch.empty_like(self.source)
            inverse[self.source] = torch.arange(self.source.numel(), device=self.source.device)
            weighted = weighted[inverse]
        return weighted.view(self.num_tokens, self.top_k, -1).sum(dim=1)


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % _ALIGN_BYTES == 0 and all(
        (s * size) % _ALIGN_BYTES == 0
        for s, n in zip(t.stride(), t.shape, strict=True)
        if s != 1 and n > 1
    )


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype:
        return False
    if x.device.type == "cuda" and w.dtype != torch.bfloat16:
        return False  # the CUDA grouped GEMM kernels take bf16 only
    return x.device.type in ("cpu", "cuda") and _aligned(x) and _aligned(w)


def expert_matmul(x: torch.Tensor, weight: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``out[s] = x[s] @ weight[expert(s)]`` for ``x: [S, K]``, ``weight: [E, K, N]`` -> ``[S, N]``.

    Grouped rows use one ``grouped_mm`` when dtype, device and strides allow it; otherwise (and for
    batched rows) each row gathers its expert's matrix for one ``bmm``. Never a loop over experts.
    """
    if routing.kind == "grouped" and _grouped_mm_ok(x, weight):
        return F.grouped_mm(x, weight, offs=routing.offsets)
    return torch.bmm(x.unsqueeze(1), weight[routing.expert_ids]).squeeze(1)
