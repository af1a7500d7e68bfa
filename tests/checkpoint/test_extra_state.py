"""Modules' ``_extra_state`` in checkpoints: None is skipped on save and accepted absent on load
(as Megatron-Core's Column/RowParallelLinear have it); any other non-tensor value is refused.

The Megatron cases run at tensor-parallel size 1 in this process: a 2-layer ``GPTModel`` (local
spec, state dicts compared; its forward needs CUDA-only calls) and the README's MLP (outputs
compared).
"""

import pytest
import torch
from torch import nn

import qpeft
from tests.checkpoint.helpers import assert_same_state
from tests.lora.layer_kinds import single_process_group

LORA = {"adapter_cfg": {"*": {"rank": 2, "lora_b_init": "torch.nn.init.normal_"}}}


class _WithExtraState(nn.Linear):
    def __init__(self, extra):
        super().__init__(4, 3)
        self.extra = extra

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, state):
        assert state is None


def _model(extra=None):
    torch.manual_seed(0)
    return nn.Sequential(_WithExtraState(extra), nn.ReLU(), nn.Linear(3, 2))


def test_none_extra_state_is_skipped_and_its_absence_accepted(tmp_path):
    model = _model()
    assert model.state_dict()["0._extra_state"] is None
    qpeft.update_model(model, LORA)
    qpeft.save(model, tmp_path / "ck")
    restored = qpeft.restore(_model(), tmp_path / "ck")
    assert_same_state(restored, model)
    x = torch.randn(5, 4)
    assert torch.equal(restored(x), model(x))


def test_other_extra_state_is_refused_by_name(tmp_path):
    model = _model(extra={"fp8_meta": 1})
    with pytest.raises(
        TypeError, match=r"'0\._extra_state' is a module's extra state of type dict"
    ):
        qpeft.save(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


@pytest.fixture
def megatron_tp1():
    pytest.importorskip("megatron.core")
    from megatron.core import parallel_state

    with single_process_group():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()


def _gpt():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True
    )
    torch.manual_seed(0)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=32,
        max_sequence_length=8,
    )


def _readme_mlp():
    """The README's Megatron example (smaller)."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    config = ModelParallelConfig(tensor_model_parallel_size=1, use_cpu_initialization=True)
    init = nn.init.xavier_normal_
    torch.manual_seed(0)
    fc1 = ColumnParallelLinear(8, 16, config=config, init_method=init, gather_output=False)
    fc2 = RowParallelLinear(
        16, 8, config=config, init_method=init, bias=True, input_is_parallel=True,
        skip_bias_add=False,
    )  # fmt: skip
    return nn.ModuleDict({"fc1": fc1, "fc2": fc2})


def _run_mlp(mlp, x):
    with torch.no_grad():
        h, _ = mlp["fc1"](x)
        return mlp["fc2"](torch.nn.functional.gelu(h))[0]


def test_megatron_gpt_save_restore_and_adapter_files(megatron_tp1, tmp_path):
    gpt = _gpt()
    qpeft.update_model(gpt, LORA)
    assert any(k.endswith("linear_qkv._extra_state") for k in gpt.state_dict())
    qpeft.save(gpt, tmp_path / "full")
    assert_same_state(qpeft.restore(_gpt(), tmp_path / "full"), gpt)
    qpeft.save_adapters(gpt, tmp_path / "adapters")
    loaded = qpeft.load_adapters(_gpt(), tmp_path / "adapters")
    assert_same_state(loaded, gpt)


def test_megatron_readme_mlp_save_restore_is_bit_exact(megatron_tp1, tmp_path):
    mlp = _readme_mlp()
    qpeft.update_model(mlp, LORA)
    qpeft.save(mlp, tmp_path / "full")
    restored = qpeft.restore(_readme_mlp(), tmp_path / "full")
    x = torch.randn(4, 2, 8)
    assert torch.equal(_run_mlp(restored, x), _run_mlp(mlp, x))
    assert_same_state(restored, mlp)
