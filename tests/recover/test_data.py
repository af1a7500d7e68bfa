"""Text harvesting, file reading and the deterministic split."""

import json

import pytest

from qpeft.recover.data import first_paragraph, read_texts, split_texts, stdlib_docstrings


def test_first_paragraph_stops_at_blank_line_and_collapses_space():
    assert (
        first_paragraph("  One line\n   continues here.\n\nSecond paragraph.")
        == "One line continues here."
    )


def test_stdlib_docstrings_are_many_distinct_and_stable():
    texts = stdlib_docstrings()
    assert len(texts) > 500
    assert len(set(texts)) == len(texts)
    assert texts == sorted(texts)
    assert all(len(t.split()) >= 4 and "\n" not in t for t in texts)


def test_split_is_disjoint_and_independent_of_order():
    texts = [f"text number {i} has some words" for i in range(200)]
    a, b = split_texts(texts), split_texts(list(reversed(texts)))
    assert a == b
    assert not (set(a.train) & set(a.eval)) and not (set(a.valid) & set(a.eval))
    assert len(a.train) + len(a.valid) + len(a.eval) == 200


def test_split_of_a_tiny_corpus_fills_every_set():
    s = split_texts(["a b c d", "e f g h", "i j k l", "m n o p"])
    assert s.train and s.valid and s.eval


def test_split_needs_four_texts():
    with pytest.raises(ValueError, match="at least 4"):
        split_texts(["one", "two", "one"])


def test_read_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  second line  \n")
    assert read_texts(tmp_path / "a.txt") == ["first line", "second line"]
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "hello there"}) + "\n\n" + json.dumps("plain") + "\n"
    )
    assert read_texts(tmp_path / "b.jsonl") == ["hello there", "plain"]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.txt", "\n \n", "holds no text"),
        ("bad.jsonl", '{"text": "ok"}\n{oops\n', "line 2: not JSON"),
        ("field.jsonl", '{"body": "x"}\n', "line 1: expected"),
    ],
)
def test_read_errors_name_the_problem(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        read_texts(tmp_path / name)


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read data file"):
        read_texts(tmp_path / "nope.txt")
