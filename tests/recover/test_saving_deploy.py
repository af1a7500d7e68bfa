"""``deploy/`` of a run: written with ``export_hf_checkpoint`` and measured, or, for a student the
format cannot hold, not written with the reason in the record and the summary."""

import sys

import pytest

import qpeft
from qpeft.recover.quantizing import quantize_student
from qpeft.recover.report import deploy_lines
from qpeft.recover.saving import write_deploy
from tests.checkpoint.helpers import deploy_llama
from tests.models import tiny_gpt2, tiny_llama, token_ids

pytest.importorskip("compressed_tensors")


def _wide_llama():
    """One Llama block whose 128-wide layers hold whole int4 blocks."""
    return deploy_llama()


def _student(build, fmt, tie=False):
    model = build()
    quantize_student(model, fmt, lambda m: m(token_ids()), tie)
    qpeft.update_model(model, {"adapter_cfg": {"*layers.*": {"rank": 2}, "*.h.*": {"rank": 2}}})
    return model


def test_deploy_is_written_and_measured(tmp_path):
    record = write_deploy(_student(tiny_llama, "nvfp4_weight_only"), None, tmp_path, 0.5)
    deploy = tmp_path / "deploy"
    weights = (deploy / "model.safetensors").stat().st_size / 2**20
    adapter = (deploy / "adapters" / "default" / "adapter_model.safetensors").stat().st_size
    assert record["written"] and record["path"] == "deploy"
    assert record["model_mb"] == weights and record["adapters_mb"] == adapter / 2**20
    assert record["ratio"] == weights / 0.5 and record["dense_mb"] == 0.5
    line = deploy_lines({"deploy": record})[0]
    assert line.startswith("deploy/ (compressed-tensors): model ") and "vs dense 0.50 MiB" in line


def test_untied_fused_scales_are_recorded_and_summarized_tied_ones_export_silently(tmp_path):
    untied = write_deploy(_student(tiny_llama, "fp8", False), None, tmp_path / "untied", 1.0)
    tied = write_deploy(_student(tiny_llama, "fp8", True), None, tmp_path / "tied", 1.0)
    assert tied["written"] and tied["warnings"] == []
    assert len(deploy_lines({"deploy": tied})) == 1
    assert untied["written"] and len(untied["warnings"]) == 1
    assert "do not share their scales" in untied["warnings"][0]
    line = deploy_lines({"deploy": untied})[1]
    groups = untied["warnings"][0].count(" weight elements change")
    assert groups >= 2 and line.startswith(f"deploy/ holds {groups} fused groups")
    assert "--tie-fused-scales" in line


@pytest.mark.parametrize(
    ("build", "fmt", "why"),
    [
        (tiny_llama, "int4", "32 input features in blocks of 128"),
        (tiny_gpt2, "fp8_weight_only", "Conv1D layers have no compressed-tensors layout"),
    ],
    ids=["int4-blocks", "conv1d"],
)
def test_a_student_the_format_cannot_hold_gets_no_deploy_and_a_reason(tmp_path, build, fmt, why):
    record = write_deploy(_student(build, fmt), None, tmp_path, dense_mb=1.0)
    assert record == {"written": False, "reason": record["reason"]}
    assert why in record["reason"] and "\n" not in record["reason"]
    assert list(tmp_path.iterdir()) == []
    assert deploy_lines({"deploy": record}) == [f"deploy/ not written: {record['reason']}"]
    assert deploy_lines({}) == []  # a report written before deploy/ existed


def test_a_missing_deploy_package_is_a_reason_not_a_failed_run(tmp_path, monkeypatch):
    assert write_deploy(_student(_wide_llama, "int4"), None, tmp_path / "ok", 1.0)["written"]
    monkeypatch.setitem(sys.modules, "compressed_tensors.compressors.pack_quantized.helpers", None)
    record = write_deploy(_student(_wide_llama, "int4"), None, tmp_path, dense_mb=1.0)
    assert not record["written"] and "pip install 'qpeft[deploy]'" in record["reason"]
    assert "needs the package compressed_tensors" in record["reason"]
    assert not (tmp_path / "deploy").exists()


def test_other_libraries_warnings_during_the_export_pass_through_and_stay_out_of_the_record(
    tmp_path, monkeypatch
):
    import warnings

    import qpeft.recover.saving as saving

    export = saving.export_hf_checkpoint

    def noisy(*args, **kwargs):
        warnings.warn("a reader library's deprecation notice", UserWarning, stacklevel=1)
        return export(*args, **kwargs)

    monkeypatch.setattr(saving, "export_hf_checkpoint", noisy)
    with pytest.warns(UserWarning, match="deprecation notice"):
        record = write_deploy(_student(tiny_llama, "fp8", True), None, tmp_path, 1.0)
    assert record["written"] and record["warnings"] == []
