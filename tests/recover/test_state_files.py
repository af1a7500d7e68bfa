"""Resume-state folders: optimizer and scheduler state round-trip bit-exactly through the files, a
save that fails midway leaves the previous state whole, foreign folders are never replaced."""

from __future__ import annotations

import pytest
import torch

import qpeft.recover.state_files as state_files
from qpeft.recover.state_files import (
    join_state,
    read_state,
    remove_state,
    split_state,
    write_state,
)


def _trainer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=8, pct_start=0.3)
    return model, opt, sched


def _steps(model, opt, sched, steps: range) -> None:
    for i in steps:
        x = torch.linspace(-1, 1, 8).reshape(2, 4) * (i + 1)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_a_training_continued_from_the_files_equals_an_uninterrupted_one(tmp_path):
    model, opt, sched = _trainer()
    _steps(model, opt, sched, range(8))

    first, opt1, sched1 = _trainer()
    _steps(first, opt1, sched1, range(3))
    tensors: dict[str, torch.Tensor] = {}
    trainer = {"optimizer": opt1.state_dict(), "scheduler": sched1.state_dict(), "n": (1, None)}
    doc = {"trainer": split_state(trainer, "trainer", tensors)}
    tensors.update({f"param.{k}": v for k, v in first.state_dict().items()})
    write_state(tmp_path / "state", doc, tensors)

    read_doc, read = read_state(tmp_path / "state")
    again, opt2, sched2 = _trainer(seed=1)  # other initial weights: all comes from the files
    again.load_state_dict({k[len("param.") :]: v for k, v in read.items() if "param." in k})
    back = join_state(read_doc["trainer"], read)
    opt2.load_state_dict(back["optimizer"])
    sched2.load_state_dict(back["scheduler"])
    assert back["n"] == [1, None]  # tuples come back as lists
    _steps(again, opt2, sched2, range(3, 8))
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_a_save_failing_midway_leaves_the_previous_state(tmp_path, monkeypatch):
    folder = tmp_path / "state"
    write_state(folder, {"step": 1}, {"t": torch.ones(2)})

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_files, "write_json", disk_full)
    with pytest.raises(OSError):
        write_state(folder, {"step": 2}, {"t": torch.zeros(2)})
    doc, tensors = read_state(folder)
    assert doc == {"step": 1} and torch.equal(tensors["t"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_a_folder_holding_other_files_is_neither_replaced_nor_removed(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        write_state(folder, {}, {})
    remove_state(folder)
    assert (folder / "notes.txt").read_text() == "mine"
    assert read_state(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("bad", "error"),
    [({"x": object()}, TypeError), ({(1, 2): 0}, TypeError)],
)
def test_what_json_cannot_hold_is_refused_by_name(bad, error):
    with pytest.raises(error, match="under 'extra'|cannot save"):
        split_state(bad, "extra", {})


def test_a_reference_to_a_missing_tensor_is_a_value_error():
    with pytest.raises(ValueError, match="unreadable"):
        join_state({"items": [["a", {"tensor": "gone"}]]}, {})
