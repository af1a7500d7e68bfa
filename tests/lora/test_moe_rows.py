"""Routed rows and per-expert matmuls: grouped (sorted, grouped_mm) and batched (gather + bmm)."""

import pytest
import torch

from qpeft.lora.moe_rows import Routing, expert_matmul


def _case(tokens=9, experts=5, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    return idx, torch.rand(tokens, k, generator=g)


@pytest.mark.parametrize("kind", ["grouped", "batched"])
@pytest.mark.parametrize(("k_dim", "n_dim"), [(8, 4), (8, 3), (6, 5)])  # aligned, then fallbacks
def test_expert_matmul_equals_each_rows_own_expert(kind, k_dim, n_dim):
    idx, w = _case()
    routing = Routing.build(kind, idx, w, num_experts=5)
    x = torch.randn(routing.expert_ids.numel(), k_dim)
    weight = torch.randn(5, k_dim, n_dim)
    expected = torch.stack([x[s] @ weight[e] for s, e in enumerate(routing.expert_ids.tolist())])
    torch.testing.assert_close(expert_matmul(x, weight, routing), expected)


@pytest.mark.parametrize("kind", ["grouped", "batched"])
def test_rows_and_combine_give_the_weighted_sum_per_token(kind):
    idx, w = _case(k=3)
    routing = Routing.build(kind, idx, w, num_experts=5)
    hidden = torch.randn(9, 4)
    rows = routing.rows(hidden)
    scale = torch.arange(1.0, 6.0)  # "expert e multiplies by e + 1"
    out = routing.combine(rows * scale[routing.expert_ids, None])
    expected = hidden * (w * scale[idx]).sum(-1, keepdim=True)
    torch.testing.assert_close(out, expected)


def test_grouped_rows_are_sorted_with_offsets_per_expert():
    idx, w = _case()
    routing = Routing.build("grouped", idx, w, num_experts=5)
    assert torch.equal(routing.expert_ids, routing.expert_ids.sort().values)
    counts = torch.bincount(idx.reshape(-1), minlength=5)
    assert torch.equal(routing.offsets, counts.cumsum(0).to(torch.int32))


def test_bad_routing_is_rejected():
    idx, w = _case()
    with pytest.raises(ValueError, match="outside"):
        Routing.build("grouped", idx, w, num_experts=3)
    with pytest.raises(ValueError, match="row layout"):
        Routing.build("looped", idx, w, num_experts=5)
