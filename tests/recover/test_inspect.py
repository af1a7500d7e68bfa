"""``describe``: checkpoints and HF PEFT files read from headers only."""

import json

import pytest
import torch
from safetensors.torch import save_file

from qpeft.recover.inspect import describe


def test_hf_peft_files_show_rank_and_scale(tmp_path):
    save_file(
        {
            "base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(4, 8),
            "base_model.model.layers.0.q_proj.lora_B.weight": torch.zeros(8, 4),
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    text = describe(tmp_path)
    assert "layers.0.q_proj  [default]  rank 4  scale 2  F32" in text
    assert "adapter_model.safetensors" in text


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        describe(tmp_path / "missing")
    with pytest.raises(ValueError, match="no JSON or safetensors"):
        describe(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04 not safetensors")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors"):
        describe(tmp_path)


def test_grouped_experts_adapters_are_listed_per_projection(tmp_path, capsys):
    import qpeft
    from qpeft.cli import main
    from tests.models import MOE_MODELS

    model = MOE_MODELS["qwen3_moe"]()
    qpeft.update_model(
        model, {"adapter_cfg": {"*": {"rank": 4}, "*experts": {"rank": 2, "scale": 0.5}}}
    )
    qpeft.save(model, tmp_path / "ckpt")
    qpeft.save_adapters(model, tmp_path / "adapters")
    for folder in ("ckpt", "adapters"):
        text = describe(tmp_path / folder)
        for layer in (0, 1):
            experts = f"model.layers.{layer}.mlp.experts"
            for proj in ("gate_up_proj", "down_proj"):
                assert f"{experts}.{proj}  [default]  rank 2  scale 0.5  F32  4 experts" in text
            assert f"model.layers.{layer}.self_attn.q_proj  [default]  rank 4  scale 1" in text
        assert "lm_head  [default]  rank 4" in text
        assert "adapters (13 layer adapters)" in text  # 2 x (4 attention + 2 expert proj.) + 1
    assert main(["inspect", str(tmp_path / "ckpt")]) == 0
    assert "model.layers.1.mlp.experts.down_proj  [default]  rank 2" in capsys.readouterr().out


def test_a_run_folder_counts_its_adapters_once_and_names_the_copies(tmp_path):
    import qpeft
    from tests.models import tiny_llama

    model = tiny_llama()
    qpeft.update_model(model, {"adapter_cfg": {"*layers.*": {"rank": 2}}})
    layers = len(qpeft.lora_layers(model))
    qpeft.save(model, tmp_path / "checkpoint")  # what a run writes: three folders of adapters
    qpeft.export_hf_peft(model, tmp_path / "hf_adapter")
    qpeft.export_hf_peft(model, tmp_path / "deploy" / "adapters" / "default")
    text = describe(tmp_path)
    assert f"adapters ({layers} layer adapters, from checkpoint/):" in text
    copies = "copies of these adapters (not counted again): deploy/adapters/default/, hf_adapter/"
    assert copies in text
    assert text.count("model.layers.0.self_attn.q_proj  [default]  rank 2") == 1
    only_hf = describe(tmp_path / "hf_adapter")  # one folder: its own adapters, no copies
    assert f"adapters ({layers} layer adapters):" in only_hf and "copies" not in only_hf
