import json

import pytest
import torch

from qpeft import ExportPEFTConfig, PEFTAttributeConfig, PEFTConfig

SEED_ATTR_DEFAULT = {
    "enable": True,
    "rank": 64,
    "scale": 1.0,
    "lora_a_init": None,
    "lora_b_init": None,
    "lora_dtype": None,
    "lora_init_method": "kaiming_zeros",
}
SEED_PEFT_DEFAULT = {
    "adapter_name": "default",
    "adapter_cfg": {"*": {"rank": 64}},
    "adapter_type": "lora",
    "freeze_base_model": True,
    "freeze_lora_weights": False,
}


def test_defaults_match_the_seed_json():
    assert PEFTAttributeConfig().model_dump_json() == json.dumps(
        SEED_ATTR_DEFAULT, separators=(",", ":")
    )
    assert json.loads(PEFTConfig().model_dump_json()) == SEED_PEFT_DEFAULT
    assert ExportPEFTConfig().model_dump() == {}


@pytest.mark.parametrize("value", [torch.nn.init.xavier_uniform_, "torch.nn.init.xavier_uniform_"])
def test_initializer_accepts_callable_or_dotted_name_and_serializes_to_the_name(value):
    cfg = PEFTAttributeConfig(lora_a_init=value)
    assert cfg.lora_a_init == "torch.nn.init.xavier_uniform_"
    assert json.loads(cfg.model_dump_json())["lora_a_init"] == "torch.nn.init.xavier_uniform_"


@pytest.mark.parametrize(
    "value, words",
    [
        ("torch.nn.init.normal", "in-place"),  # not in-place
        ("torch.nn.init.nope_", "not a function"),
        ("os.system", "fully-qualified"),
        (print, "not a function of torch.nn.init"),  # a foreign callable
        (lambda t: t, "not a function of torch.nn.init"),
        ("torch.nn.init.calculate_gain", "in-place"),
        (3, "initializer"),
    ],
)
def test_bad_initializers_are_errors_naming_the_field(value, words):
    with pytest.raises(ValueError) as err:
        PEFTAttributeConfig(lora_b_init=value)
    assert "lora_b_init" in str(err.value) and words in str(err.value)


def test_validating_an_initializer_string_never_imports_it(monkeypatch):
    import builtins

    imported = []
    real_import = builtins.__import__
    monkeypatch.setattr(
        builtins, "__import__", lambda n, *a, **k: imported.append(n) or real_import(n, *a, **k)
    )
    with pytest.raises(ValueError):
        PEFTAttributeConfig(lora_a_init="evil_module_xyz.run_")
    assert "evil_module_xyz" not in imported


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rank": 0}, "rank"),
        ({"scale": 0}, "scale"),
        ({"lora_dtype": "int8"}, "lora_dtype"),
        ({"lora_init_method": "pissa"}, "lora_init_method"),
        ({"rnak": 3}, "rnak"),
    ],
)
def test_attribute_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PEFTAttributeConfig(**kwargs)


@pytest.mark.parametrize("dtype", ["bf16", "bfloat16", "fp16", "float16", "fp32", "float32"])
def test_lora_dtype_strings(dtype):
    assert PEFTAttributeConfig(lora_dtype=dtype).torch_dtype() == getattr(
        torch,
        dtype.replace("bf16", "bfloat16").replace("fp16", "float16").replace("fp32", "float32"),
    )


def test_adapter_cfg_errors_name_the_pattern_and_field():
    with pytest.raises(ValueError) as err:
        PEFTConfig(adapter_cfg={"*": {"rank": 4}, "*attn*": {"scale": -1}})
    assert "'*attn*'" in str(err.value) and "scale" in str(err.value)
    with pytest.raises(ValueError, match="adapter_cfg"):
        PEFTConfig(adapter_cfg={3: {"rank": 4}})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"adapter_name": "not valid"}, "adapter_name"),
        ({"adapter_name": "class"}, "adapter_name"),
        ({"adapter_name": "keys"}, "reserved"),
        ({"adapter_type": "dora"}, "adapter_type"),
        ({"extra": 1}, "extra"),
    ],
)
def test_peft_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PEFTConfig(**kwargs)


def test_peft_config_keeps_callables_and_explicit_keys():
    def pred(name):
        return name.endswith("q")

    cfg = PEFTConfig(adapter_cfg={pred: {"scale": 2.0}})
    ((key, attrs),) = cfg.adapter_cfg.items()
    assert key is pred and attrs.model_fields_set == {"scale"}


def test_initializer_schema_is_a_documented_string():
    prop = PEFTAttributeConfig.model_json_schema()["properties"]["lora_a_init"]
    string = next(s for s in prop["anyOf"] if s.get("type") == "string")
    assert string["examples"] and "torch.nn.init" in string["description"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": "8"}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": 8.0}, "rank"),
        ({"scale": "2"}, "scale"),
        ({"scale": True}, "scale"),
        ({"scale": float("inf")}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"scale": 1e308}, "scale"),
        ({"enable": 1}, "enable"),
        ({"enable": "yes"}, "enable"),
    ],
)
def test_loose_types_and_out_of_range_values_are_errors_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PEFTAttributeConfig(**kwargs)
    with pytest.raises(ValueError, match=f"adapter_cfg\\['\\*'\\]: {field}"):
        PEFTConfig(adapter_cfg={"*": kwargs})


def test_an_int_scale_is_a_number():
    assert PEFTAttributeConfig(scale=2).scale == 2.0


@pytest.mark.parametrize(
    "name", ["training", "_modules", "_parameters", "_buffers", "forward", "base", "_x"]
)
def test_reserved_adapter_names_are_refused(name):
    with pytest.raises(ValueError, match=f"adapter name {name!r} is reserved"):
        PEFTConfig(adapter_name=name)


def test_a_reserved_name_leaves_the_model_untouched():
    import qpeft

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="reserved"):
        qpeft.update_model(model, {"adapter_name": "training", "adapter_cfg": {"*": {"rank": 2}}})
    assert not qpeft.is_peft_model(model) and qpeft.state(model) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
