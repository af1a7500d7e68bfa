"""Banded dequantization: ``unpack_into`` rebuilds ``Q(W)`` band by band, bit for bit."""

import pytest
import torch

from qpeft.quant.dequant import dequantize, unpack_into
from qpeft.quant.packing import unpack
from tests.quant.bitwise import assert_bits_equal
from tests.quant.test_packing import FORMATS, _packed, _weight


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [200, 256])  # 256: fp4 bands multiplied straight into out
def test_bands_of_rows_rebuild_the_quantizer_bit_for_bit(name, dtype, cols):
    w = _weight((300, cols), dtype)  # 300 rows: bands end inside a 128-row block's tail
    q, tensors, spec = _packed(FORMATS[name], w)
    expected = q(w)
    for band in (1, 999, 1 << 30):  # one row (or row block) per band, a few bands, one band
        out = torch.full(spec.shape, float("nan"), dtype=dtype)
        assert unpack_into(out, tensors, spec, band_elems=band) is out
        assert_bits_equal(out, expected)
    assert_bits_equal(dequantize(tensors, spec, dtype), unpack(tensors, spec, dtype))


def test_refuses_a_wrong_output_shape_or_band():
    w = _weight((8, 32), torch.float32)
    _, tensors, spec = _packed(FORMATS["nvfp4"], w)
    with pytest.raises(ValueError, match="out has shape"):
        unpack_into(torch.empty(8, 31), tensors, spec)
    with pytest.raises(ValueError, match="band_elems"):
        unpack_into(torch.empty(8, 32), tensors, spec, band_elems=0)
