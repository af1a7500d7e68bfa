"""export_hf_checkpoint(format="modelopt"): ModelOpt 0.47's unified checkpoint layout, decoded
by an independent reference decoder to qpeft's Q(W)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import qpeft
from qpeft.quant.targets import quantized_layers
from tests.checkpoint.helpers import DEPLOY_IDS, decode_modelopt, deploy_llama
from tests.models import tiny_llama

transformers = pytest.importorskip("transformers")

ALGOS = {"fp8": "FP8", "nvfp4": "NVFP4", "nvfp4_weight_only": "W4A16_NVFP4"}
LAYERS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.0.mlp.down_proj",
]
F32, E4M3, U8 = torch.float32, torch.float8_e4m3fn, torch.uint8


def _layout(algo, out, inp):
    """{suffix: (dtype, shape)} of one linear layer as ModelOpt 0.47 writes it."""
    if algo == "FP8":
        return {"weight": (E4M3, [out, inp]), "weight_scale": (F32, []), "input_scale": (F32, [])}
    found = {
        "weight": (U8, [out, inp // 2]),
        "weight_scale": (E4M3, [out, inp // 16]),
        "weight_scale_2": (F32, []),
    }
    if algo == "NVFP4":
        found["input_scale"] = (F32, [])
    return found


def _weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("preset", sorted(ALGOS))
def test_layout_and_decoding_are_modelopt_and_exact(tmp_path, preset, dtype):
    model = deploy_llama(preset, dtype)
    out = qpeft.export_hf_checkpoint(model, tmp_path / "hf", format="modelopt")
    algo, tensors = ALGOS[preset], _weights(out)
    state = model.state_dict()
    layers = quantized_layers(model)
    for name in LAYERS:
        layer = layers[name]
        w = layer.quantized_weight()
        got = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(name)}
        layout = {k: (v.dtype, list(v.shape)) for k, v in got.items()}
        assert layout == _layout(algo, *w.shape), name
        assert torch.equal(decode_modelopt(tensors, name, dtype), w), name  # bit-exact
        w_amax = layer.weight_quantizer.amax.float()
        if algo == "FP8":  # ModelOpt's meaning: amax / 448, to within one ulp
            for key, amax in (
                ("weight_scale", w_amax),
                ("input_scale", layer.input_quantizer.amax),
            ):
                torch.testing.assert_close(
                    got[key], (amax / 448.0).reshape(()), rtol=2**-23, atol=0
                )
        else:
            assert torch.equal(got["weight_scale_2"], (w_amax / 2688.0).reshape(()))
            if algo == "NVFP4":
                want = (layer.input_quantizer.amax / 2688.0).reshape(())
                assert torch.equal(got["input_scale"], want)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(tensors[key], state[key])
    assert not [k for k in tensors if "quantizer" in k or "_amax" in k]

    quantization = {"quant_algo": algo, "kv_cache_quant_algo": None}
    if algo != "FP8":
        quantization["group_size"] = 16
    quantization["exclude_modules"] = ["lm_head", "model.embed_tokens"]  # as ModelOpt 0.47
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    assert hf_quant == {
        "producer": {"name": "qpeft", "version": qpeft.__version__},
        **{"quantization": quantization},
    }
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = {"dynamic": False, "num_bits": 8 if algo == "FP8" else 4, "type": "float"}
    if algo != "FP8":
        weights["group_size"] = 16
    assert "group_size" not in quant  # ModelOpt 0.47 keeps it in config_groups only
    group = quant["config_groups"]["group_0"]
    inputs = {} if algo == "W4A16_NVFP4" else {"input_activations": weights}  # key left out
    assert group == {**inputs, "weights": weights, "targets": ["Linear"]}
    assert quant["quant_method"] == "modelopt" and quant["quant_algo"] == algo
    assert (
        quant["ignore"] == ["lm_head", "model.embed_tokens"]
        and quant["producer"] == hf_quant["producer"]
    )
    config = transformers.AutoConfig.from_pretrained(out)  # transformers still reads the config
    assert config.quantization_config["quant_algo"] == algo
    assert config.hidden_size == model.config.hidden_size


def test_compressed_model_writes_the_same_checkpoint(tmp_path):
    model = deploy_llama("nvfp4", torch.bfloat16)
    qpeft.export_hf_checkpoint(model, tmp_path / "a", format="modelopt")
    model.requires_grad_(False)
    model = qpeft.compress(model)
    qpeft.export_hf_checkpoint(model, tmp_path / "b", format="modelopt")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].reshape(-1).view(U8), b[k].reshape(-1).view(U8)), k


@pytest.mark.parametrize(
    "preset",
    ["int8", "int8_weight_only", "int8_dynamic", "int4", "mxfp4", "fp8_dynamic", "fp8_block128"],
)
def test_other_presets_are_refused_naming_the_format(tmp_path, preset):
    model = deploy_llama(preset)
    with pytest.raises(ValueError, match=r"format 'modelopt' has no layout.*compressed-tensors"):
        qpeft.export_hf_checkpoint(model, tmp_path / "hf", format="modelopt")
    assert not (tmp_path / "hf").exists()


def test_refusal_names_the_layer_format(tmp_path):
    model = deploy_llama("fp8_weight_only")
    with pytest.raises(ValueError, match=r"q_proj'.*static per-tensor fp8 input"):
        qpeft.export_hf_checkpoint(model, tmp_path / "hf", format="modelopt")
    model = deploy_llama("int8")
    with pytest.raises(ValueError, match=r"int8 weights per axis 0"):
        qpeft.export_hf_checkpoint(model, tmp_path / "hf", format="modelopt")
    mixed = deploy_llama()
    cfg = {**qpeft.PRESETS["nvfp4"], "*mlp*input_quantizer": {"enable": False}}
    qpeft.quantize(mixed, {"quant_cfg": cfg}, lambda m: m(DEPLOY_IDS))
    with pytest.raises(ValueError, match="quantized differently"):
        qpeft.export_hf_checkpoint(mixed, tmp_path / "hf", format="modelopt")
    assert not (tmp_path / "hf").exists()


def test_adapters_and_tokenizer_are_written_as_for_compressed_tensors(tmp_path):
    model = deploy_llama("nvfp4_weight_only", torch.bfloat16)
    qpeft.update_model(model, {"adapter_cfg": {"*.layers.*": {"rank": 4}}})
    qpeft.update_model(model, {"adapter_name": "b", "adapter_cfg": {"*q_proj": {"rank": 2}}})
    mo = qpeft.export_hf_checkpoint(model, tmp_path / "mo", format="modelopt")
    ct = qpeft.export_hf_checkpoint(model, tmp_path / "ct")
    assert sorted(p.name for p in (mo / "adapters").iterdir()) == ["b", "default"]
    for name in ("b", "default"):
        for f in (ct / "adapters" / name).iterdir():
            assert (mo / "adapters" / name / f.name).read_bytes() == f.read_bytes()
    qpeft.export_hf_checkpoint(model, mo)  # a directory it wrote in either format is replaced
    qpeft.export_hf_checkpoint(model, mo, format="modelopt")
    assert (mo / "hf_quant_config.json").is_file()


def test_exclude_modules_summarize_unquantized_blocks_as_modelopt_does(tmp_path):
    model = tiny_llama()  # two blocks; the second is left unquantized
    cfg = {**qpeft.PRESETS["nvfp4_weight_only"], "*layers.1.*": {"enable": False}}
    qpeft.quantize(model, {"quant_cfg": cfg}, lambda m: m(DEPLOY_IDS), tie_fused_scales=True)
    out = qpeft.export_hf_checkpoint(model, tmp_path / "hf", format="modelopt")
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    assert hf_quant["quantization"]["exclude_modules"] == [
        "lm_head",
        "model.embed_tokens",
        "model.layers.1*",
    ]
    tensors = _weights(out)
    assert tensors["model.layers.1.mlp.up_proj.weight"].dtype == F32  # written unquantized
    assert "model.layers.1.mlp.up_proj.weight_scale" not in tensors
