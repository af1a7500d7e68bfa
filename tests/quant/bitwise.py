"""Bitwise tensor comparison for the quantization tests (distinguishes -0.0 from +0.0)."""

import torch

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Assert same dtype, shape and bit pattern; report how many elements differ."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.detach().cpu(), expected.detach().cpu()
    diff = a.view(_INT_VIEW[a.dtype]) != e.view(_INT_VIEW[e.dtype])
    assert not diff.any(), (
        f"{int(diff.sum())}/{diff.numel()} elements differ; first: "
        f"{a[diff][:5].tolist()} vs {e[diff][:5].tolist()}"
    )
