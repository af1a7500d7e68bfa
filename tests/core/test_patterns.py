import pytest

from qpeft import matches_pattern
from qpeft.core.patterns import merge_matching


@pytest.mark.parametrize(
    "pattern, expected",
    [
        (None, True),
        ("*", True),
        ("model.*.q_proj", True),  # '*' crosses dots
        ("*k_proj", False),
        ("model.layers.0.self_attn.q_proj", True),
        (lambda n: n.endswith("q_proj"), True),
        (["*k_proj", "*q_proj"], True),
        (("*k_proj",), False),
        ([], False),
    ],
)
def test_matches_pattern(pattern, expected):
    assert matches_pattern("model.layers.0.self_attn.q_proj", pattern) is expected


def test_matches_pattern_type_errors():
    with pytest.raises(TypeError):
        matches_pattern("a", 3)
    with pytest.raises(TypeError, match="callable"):
        matches_pattern("a", lambda n: True, allow_callable=False)


def test_merge_is_ordered_and_key_by_key():
    cfg = {"*": {"rank": 8}, "*attn*": {"scale": 2}, "*attn.k*": {"rank": 4}}
    assert merge_matching("x.attn.q", cfg) == {"rank": 8, "scale": 2}
    assert merge_matching("x.attn.k", cfg) == {"rank": 4, "scale": 2}
    assert merge_matching("x.mlp", cfg) == {"rank": 8}
    assert merge_matching("x", {"*attn*": {"rank": 1}}) is None
