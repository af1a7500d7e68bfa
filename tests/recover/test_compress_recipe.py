"""``qpeft recover --compress``: training on the compressed student gives the uncompressed run's
metrics and losses exactly, the same ``deploy/`` bytes, and the summary reports peak memory."""

import pytest

from qpeft.quant import CompressedLinear
from qpeft.recover.pipeline import RecoverOptions, run_recipe
from qpeft.recover.report import summary_table
from qpeft.recover.saving import write_deploy
from tests.recover.tiny_lm import build_tiny_causal_lm, write_corpus


def _runs(model, corpus, fmt, **options):
    """The recipe without and with ``--compress``: ``(plain, packed)``."""
    runs = {}
    for compress in (False, True):
        opts = RecoverOptions(
            model=str(model),
            data=str(corpus),
            format=fmt,
            rank=8,
            train_texts=16,
            valid_texts=4,
            eval_texts=8,
            batch_size=8,
            block_epochs=1,
            epochs=1,
            compress=compress,
            progress=False,
            **options,
        )
        runs[compress] = run_recipe(opts, say=lambda _: None)
    return runs[False], runs[True]


@pytest.mark.parametrize("fmt", ["nvfp4_weight_only", "int8"])
def test_compressed_recovery_matches_the_uncompressed_one(tmp_path, fmt):
    model, corpus = build_tiny_causal_lm(tmp_path / "lm"), write_corpus(tmp_path / "corpus.txt")
    # tie_fused_scales: exact deploy/ bytes, nothing is requantized at export
    plain, packed = _runs(model, corpus, fmt, tie_fused_scales=True)
    assert any(isinstance(m, CompressedLinear) for m in packed.student.modules())
    assert not any(isinstance(m, CompressedLinear) for m in plain.student.modules())
    assert packed.stages == plain.stages
    assert packed.train_losses == plain.train_losses and packed.block_losses == plain.block_losses
    assert packed.sizes["model_mb"] < plain.sizes["model_mb"]
    assert packed.sizes["dense_mb"] == plain.sizes["dense_mb"] == plain.sizes["model_mb"]
    deployed = []
    for name, run in (("plain", plain), ("packed", packed)):
        assert run.sizes["peak_rss_mb"] > 0
        record = write_deploy(run.student, run.tokenizer, tmp_path / name, run.sizes["dense_mb"])
        assert record["written"] and record["ratio"] < 1 and record["warnings"] == []
        table = summary_table({**run.to_json(), "deploy": record})
        assert "peak memory" in table and "deploy/ (compressed-tensors): model" in table
        deployed.append((tmp_path / name / "deploy" / "model.safetensors").read_bytes())
    assert deployed[0] == deployed[1]


def test_compressed_recovery_of_an_moe_model_matches_the_uncompressed_one(tmp_path):
    lm = build_tiny_causal_lm(tmp_path / "lm", arch="qwen3_moe")
    corpus = write_corpus(tmp_path / "corpus.txt")
    plain, packed = _runs(lm, corpus, "nvfp4_weight_only")
    kinds = {type(m).__name__ for m in packed.student.modules()}
    assert {"CompressedHFExperts", "CompressedLinear"} <= kinds  # the experts are packed too
    assert packed.stages == plain.stages
    assert packed.train_losses == plain.train_losses and packed.block_losses == plain.block_losses
    assert packed.sizes["model_mb"] < 0.3 * plain.sizes["model_mb"]
