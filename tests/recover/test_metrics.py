"""Metric and loss functions."""

import torch

from qpeft.recover.metrics import (
    cosine_stats,
    masked_relative_mse,
    mean_pool,
    neighbour_agreement,
    next_token_nll,
    token_kl,
)
from tests.tolerances import FP32_ATOL


def test_mean_pool_ignores_padding_and_normalises():
    h = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    e = mean_pool(h, torch.tensor([[1, 1, 0]]))
    assert torch.allclose(e, torch.tensor([[1.0, 0.0]]), atol=FP32_ATOL)


def test_cosine_stats_and_neighbours():
    torch.manual_seed(0)
    e = torch.randn(10, 8)
    assert cosine_stats(e, e)[0] > 1 - FP32_ATOL
    assert neighbour_agreement(e, e) == 1.0
    flipped = e.clone()
    flipped[:, 0] *= -50  # a different geometry changes nearest neighbours
    assert neighbour_agreement(flipped, e) < 1.0
    assert cosine_stats(-e, e)[1] < -1 + FP32_ATOL


def test_token_kl_is_zero_for_equal_logits_and_masks_padding():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(token_kl(z, z, mask)) < FP32_ATOL
    other = z.clone()
    other[:, 2] += 10  # only padded positions differ
    assert float(token_kl(other, z, mask)) < FP32_ATOL
    assert float(token_kl(z + torch.randn_like(z), z, mask)) > 0


def test_next_token_nll_counts_only_real_pairs():
    logits = torch.zeros(1, 4, 3)  # uniform: nll = log 3 per token
    total, n = next_token_nll(logits, torch.tensor([[0, 1, 2, 0]]), torch.tensor([[1, 1, 1, 0]]))
    assert n == 2
    assert abs(total - 2 * torch.log(torch.tensor(3.0)).item()) < FP32_ATOL


def test_masked_relative_mse():
    t = torch.ones(1, 2, 2)
    o = t.clone()
    o[0, 1] = 5.0  # only in a masked-out position
    assert float(masked_relative_mse(o, t, torch.tensor([[1, 0]]))) == 0.0
    assert float(masked_relative_mse(2 * t, t, torch.tensor([[1, 1]]))) == 1.0
