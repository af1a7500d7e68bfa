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
