"""Models and checks shared by the persistence tests (checkpoint, safe I/O)."""

import copy

import torch

import qpeft
from qpeft import update_model
from tests.models import TinyBlock

X = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))


def randomize_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qpeft.lora_layers(model).values():
            for adapter in layer.adapters.values():
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen))


def quantize_tiny(model, preset="int8"):
    return qpeft.quantize(model, preset, forward_loop=lambda m: m(X))


def rich_model(merge=True):
    """Quantized, two adapters (callable pattern), edits, disabled layers, frozen and merged
    parts."""
    torch.manual_seed(0)
    model = quantize_tiny(TinyBlock())
    update_model(
        model,
        {
            "adapter_cfg": {
                "*": {"rank": 4},
                "*lm_head*": {"enable": False},
                "*q_proj*": {"lora_init_method": "svdquant"},
            }
        },
    )
    update_model(
        model,
        {
            "adapter_name": "task2",
            "adapter_cfg": {
                lambda n: n.startswith("mlp"): {"rank": 2, "scale": 3.0, "lora_dtype": "bf16"}
            },
        },
    )
    update_model(model, {"adapter_name": "gone", "adapter_cfg": {"*v_proj*": {"rank": 1}}})
    randomize_adapters(model)
    update_model(model, {"adapter_cfg": {"*mlp.up*": {"scale": 0.25}}})  # edit through the API
    model.attn["v_proj"].adapters["default"].scale = 1.5  # and a direct edit
    qpeft.disable_adapters(model, layers_to_disable="*down*", adapters_to_disable="task2")
    qpeft.freeze_lora_weights(model, layer_patterns="attn*")
    qpeft.disable_quantizer(model, "*mlp.down.input_quantizer")
    qpeft.delete_adapter(model, "gone")
    if merge:
        qpeft.merge_adapters(model, "default")
    return model


def adapter_facts(model):
    return {
        (ln, n): (
            a.scale,
            a.enable,
            a.merged,
            a.lora_a.dtype,
            a.lora_a.requires_grad,
            a.lora_b.requires_grad,
        )
        for ln, layer in qpeft.lora_layers(model).items()
        for n, a in layer.adapters.items()
    }


def assert_same(a, b, x=X):
    assert repr(a) == repr(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert adapter_facts(a) == adapter_facts(b)
    assert [(n, p.requires_grad) for n, p in a.named_parameters()] == [
        (n, p.requires_grad) for n, p in b.named_parameters()
    ]
    assert qpeft.state(a) == qpeft.state(b)
    if x is not None:
        with torch.no_grad():
            assert torch.equal(a(x), b(x))


def untouched(model):
    """A checker that ``model`` is exactly as it is now (structure, tensors, flags, mode log)."""
    ref = copy.deepcopy(model)
    return lambda: assert_same(model, ref, x=None)


def assert_same_state(got, want):
    """Equal ``state_dict`` keys and tensors; non-tensor entries (Megatron's ``_extra_state``)
    are None on both sides."""
    got, want = got.state_dict(), want.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert value is None and got[key] is None, key


DEPLOY_IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))


def deploy_llama(preset=None, dtype=torch.float32, tie=True):
    """A one-block Llama with 128 / 256 features, quantized with ``preset`` if given."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    if preset is not None:
        qpeft.quantize(model, preset, lambda m: m(DEPLOY_IDS), tie_fused_scales=tie)
    return model


# E2M1 values of the 16 codes: bits 0-2 index the grid, bit 3 is the sign.
_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M1_LUT = torch.tensor(_E2M1 + [-v for v in _E2M1])


def decode_modelopt(tensors, layer, dtype):
    """A reference decoder of one layer of a ModelOpt checkpoint, written from vLLM's and
    ModelOpt's documented decoding (not from qpeft): FP8 ``fp32(weight) * weight_scale``; NVFP4
    codes two per byte, element 2i in the low nibble, ``e2m1 * (fp32(weight_scale) *
    weight_scale_2)`` per 16 input features. Computed in fp32, cast to ``dtype``."""
    w = tensors[f"{layer}.weight"]
    if w.dtype == torch.float8_e4m3fn:
        return (w.float() * tensors[f"{layer}.weight_scale"]).to(dtype)
    low, high = (w & 0xF).long(), (w >> 4).long()
    values = torch.stack((E2M1_LUT[low], E2M1_LUT[high]), dim=-1).reshape(w.shape[0], -1)
    scale = tensors[f"{layer}.weight_scale"].float() * tensors[f"{layer}.weight_scale_2"]
    blocks = values.reshape(w.shape[0], -1, 16) * scale.unsqueeze(-1)
    return blocks.reshape(w.shape[0], -1).to(dtype)
