"""Run output folders: all-or-nothing, and only an earlier run's folder is ever replaced."""

import pytest

from qpeft.recover.outputs import RUN_MARKER, output_directory
from tests.checkpoint.test_safety import snapshot


def _run(tmp_path, name="run", text="old"):
    with output_directory(tmp_path / name, tmp_path / "model") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text(text)
        (tmp / "report.json").write_text("{}")
    return tmp_path / name


def test_an_earlier_run_is_replaced(tmp_path):
    target = _run(tmp_path)
    _run(tmp_path, text="new")
    assert (target / "sub" / "a.txt").read_text() == "new" and (target / RUN_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_the_old_target_and_no_temp(tmp_path, error):
    target = _run(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(error), output_directory(target, tmp_path / "model") as tmp:
        (tmp / "half.txt").write_text("half")
        raise error()
    assert snapshot(tmp_path) == before


def test_a_folder_no_run_wrote_is_refused_and_kept(tmp_path):
    user = tmp_path / "thesis"
    (user / "src").mkdir(parents=True)
    (user / "main.py").write_text("print(1)")
    (user / "thesis.tex").write_text("\\begin{document}")
    before = snapshot(tmp_path)
    with (
        pytest.raises(FileExistsError, match="main.py, src, thesis.tex"),
        output_directory(user, tmp_path / "model"),
    ):
        pass
    assert snapshot(tmp_path) == before


def test_a_run_folder_with_a_user_file_added_is_refused(tmp_path):
    target = _run(tmp_path)
    (target / "sub" / "mine.txt").write_text("keep")
    before = snapshot(tmp_path)
    with (
        pytest.raises(FileExistsError, match="sub/mine.txt"),
        output_directory(target, tmp_path / "model"),
    ):
        pass
    assert snapshot(tmp_path) == before


def test_output_at_or_inside_the_model_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "link").symlink_to(model)
    before = snapshot(tmp_path)
    for out in (model, model / "out", tmp_path / "link", tmp_path):
        with pytest.raises(ValueError, match="model folder"), output_directory(out, model):
            pass
    assert snapshot(tmp_path) == before


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "run").write_text("x")
    with (
        pytest.raises(FileExistsError, match="not a directory"),
        output_directory(tmp_path / "run", tmp_path / "model"),
    ):
        pass
    assert (tmp_path / "run").read_text() == "x"
