"""The benchmark harness: interleaving, repeat rule, and the results file's rendering."""

import pytest

from benchmarks import report
from benchmarks.harness import interleaved


def test_round_robin_with_rotating_order_and_warmup():
    calls = []
    out = interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=10, warmup=2
    )
    assert len(calls) == 24 and calls[:4] == ["a", "b", "b", "a"]
    assert {n: t.repeats for n, t in out.items()} == {"a": 10, "b": 10}
    assert all(t.q1 <= t.median <= t.q3 for t in out.values())


def test_fewer_than_ten_repeats_is_refused():
    with pytest.raises(ValueError, match="repeats must be >= 10"):
        interleaved({"a": lambda: None}, repeats=9)
    with pytest.raises(ValueError, match="no candidates"):
        interleaved({}, repeats=10)


def test_results_keep_other_scenarios_and_render_targets(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "HERE", tmp_path)
    first = report.Section(
        "a", "scenario A", [report.Row("x / y", "0.9x", "<= 1.0x", True)], ["note A"]
    )
    report.save([first], ["a", "b"])
    second = report.Section("b", "scenario B", [report.Row("u / v", "1.2x", "<= 1.1x", False)])
    text = report.save([second], ["a", "b"]).read_text()
    assert "| scenario A | x / y | 0.9x | <= 1.0x | yes |" in text
    assert "| scenario B | u / v | 1.2x | <= 1.1x | **no** |" in text
    assert "note A" in text and "torch" in text
