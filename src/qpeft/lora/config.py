"""Configuration classes of the PEFT mode: ``PEFTAttributeConfig``, ``PEFTConfig``,
``ExportPEFTConfig``.

They follow the documented contract field for field (names, defaults, JSON). Beyond it:

- initializer strings are looked up inside ``torch.nn.init`` only, so validating a config from an
  untrusted file never imports anything;
- ``adapter_cfg`` entries remember which keys they set explicitly, so later patterns override
  earlier
  ones key by key (see :func:`qpeft.core.patterns.resolve_attributes`);
- every error names the field and, inside ``adapter_cfg``, the pattern.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_serializer,
    field_validator,
)

__all__ = [
    "ExportPEFTConfig",
    "PEFTAttributeConfig",
    "PEFTConfig",
    "LORA_DTYPES",
    "resolve_initializer",
]

INIT_PREFIX = "torch.nn.init."

#: Accepted ``lora_dtype`` strings and the torch dtype each names.
LORA_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def _initializer_name(value: Any) -> Any:
    """Normalize an initializer (callable or dotted name) to ``torch.nn.init.<name>``; never
    imports."""
    if value is None:
        return None
    if callable(value):
        name = getattr(value, "__name__", None)
        if not name or getattr(torch.nn.init, name, None) is not value:
            raise ValueError(f"{value!r} is not a function of torch.nn.init")
    elif isinstance(value, str):
        if not value.startswith(INIT_PREFIX):
            raise ValueError(
                f"{value!r} is not a fully-qualified torch.nn.init name (e.g. "
                "'torch.nn.init.zeros_')"
            )
        name = value[len(INIT_PREFIX) :]
        if not name.isidentifier() or not callable(getattr(torch.nn.init, name, None)):
            raise ValueError(f"{value!r} is not a function of torch.nn.init")
    else:
        raise ValueError(
            f"an initializer must be a torch.nn.init function or its name, got {value!r}"
        )
    if not name.endswith("_") or name.startswith("_"):
        raise ValueError(
            f"initializer {INIT_PREFIX}{name} is not in-place (its name must end with '_')"
        )
    return INIT_PREFIX + name


def resolve_initializer(name: str) -> Callable[..., Any]:
    """Return the ``torch.nn.init`` function a validated initializer name refers to."""
    return getattr(torch.nn.init, _initializer_name(name)[len(INIT_PREFIX) :])


_INIT_SCHEMA = {
    "anyOf": [
        {
            "type": "string",
            "title": "torch initializer",
            "description": "Fully-qualified callable from torch.nn.init. "
            "Must be in-place (name ends with \\_).",
            "examples": ["torch.nn.init.zeros_", "torch.nn.init.kaiming_uniform_"],
        },
        {"type": "null"},
    ]
}

Initializer = Annotated[
    str | None, BeforeValidator(_initializer_name), WithJsonSchema(_INIT_SCHEMA)
]


class _Config(BaseModel):
    # strict: no coercion ("8" or True for a rank, "2" for a scale); every value read from a file
    # goes through the same checks as the same value passed to the API
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, arbitrary_types_allowed=True, strict=True
    )


# Attributes of the ModuleDict holding the adapters (instance ones too: ``training``,
# ``_modules``...) and the wrapper's own names: an adapter named so would shadow them.
_RESERVED_NAMES = frozenset({*dir(torch.nn.ModuleDict()), "base", "adapters"})

#: Largest accepted ``scale`` (beyond it ``scale * B @ A`` overflows fp16 for any useful factor).
MAX_SCALE = 1e4


class PEFTAttributeConfig(_Config):
    """Attributes of one LoRA adapter on one layer."""

    enable: bool = Field(
        default=True, description="If True, enables the adapter. If False, by-passes it."
    )
    rank: int = Field(default=64, ge=1, description="The rank (dimension) of the LoRA matrices.")
    scale: float = Field(
        default=1.0,
        gt=0,
        le=MAX_SCALE,
        allow_inf_nan=False,
        description="Scaling factor for the LoRA output.",
    )
    lora_a_init: Initializer = Field(
        default=None, description="Initializer of A from torch.nn.init."
    )
    lora_b_init: Initializer = Field(
        default=None, description="Initializer of B from torch.nn.init."
    )
    lora_dtype: str | None = Field(
        default=None,
        description="Dtype of the LoRA factors: bf16, fp16, fp32 (or bfloat16, float16, float32). "
        "None inherits the wrapped layer's parameter dtype.",
    )
    lora_init_method: Literal["kaiming_zeros", "svdquant"] = Field(
        default="kaiming_zeros",
        description="'kaiming_zeros' honours lora_a_init / lora_b_init; "
        "'svdquant' seeds the factors "
        "from a rank-r SVD of the quantization residual W - Q(W).",
    )

    @field_validator("lora_dtype")
    @classmethod
    def _check_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in LORA_DTYPES:
            raise ValueError(f"unknown lora_dtype {value!r}; expected one of {sorted(LORA_DTYPES)}")
        return value

    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype named by ``lora_dtype`` (None when it inherits the base dtype)."""
        return None if self.lora_dtype is None else LORA_DTYPES[self.lora_dtype]


Pattern = str | Callable[[str], bool]


def _pattern_label(pattern: Any) -> str:
    return (
        repr(pattern) if isinstance(pattern, str) else getattr(pattern, "__name__", repr(pattern))
    )


def _validate_entry(pattern: Any, value: Any) -> PEFTAttributeConfig:
    if not isinstance(pattern, str) and not callable(pattern):
        raise ValueError(f"adapter_cfg pattern {pattern!r} must be a wildcard string or a callable")
    if isinstance(value, PEFTAttributeConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(
            f"adapter_cfg[{_pattern_label(pattern)}] must be a dict or PEFTAttributeConfig"
        )
    try:
        return PEFTAttributeConfig.model_validate(value)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}" for e in err.errors()
        )
        raise ValueError(f"adapter_cfg[{_pattern_label(pattern)}]: {problems}") from None


class PEFTConfig(_Config):
    """Configuration of one ``update_model`` call: which layers get adapter ``adapter_name``, and
    how."""

    adapter_name: str = Field(
        default="default", description="Name of the adapter to create or update."
    )
    adapter_cfg: dict[Any, PEFTAttributeConfig] = Field(
        default_factory=lambda: {"*": PEFTAttributeConfig(rank=64)},
        description="Ordered map from a module-name pattern (fnmatch wildcard or callable) "
        "to adapter "
        "attributes; later patterns override earlier ones key by key.",
    )
    adapter_type: str = Field(default="lora", description="Type of PEFT adapter. Only 'lora'.")
    freeze_base_model: bool = Field(default=True, description="Freeze every non-adapter parameter.")
    freeze_lora_weights: bool = Field(default=False, description="Freeze the adapter's weights.")

    @field_validator("adapter_name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not value.isidentifier() or keyword.iskeyword(value):
            raise ValueError(f"adapter name {value!r} is not a valid Python identifier")
        if value.startswith("_") or value in _RESERVED_NAMES:
            raise ValueError(
                f"adapter name {value!r} is reserved (a name of nn.Module's own, such as "
                "'training', or one starting with '_'); choose another"
            )
        return value

    @field_validator("adapter_type")
    @classmethod
    def _check_type(cls, value: str) -> str:
        if value != "lora":
            raise ValueError(f"adapter_type {value!r} is not supported; only 'lora' is")
        return value

    @field_validator("adapter_cfg", mode="before")
    @classmethod
    def _check_cfg(cls, value: Any) -> dict[Any, PEFTAttributeConfig]:
        if not isinstance(value, dict):
            raise ValueError("adapter_cfg must be a dict mapping patterns to attributes")
        return {pattern: _validate_entry(pattern, attrs) for pattern, attrs in value.items()}

    @field_serializer("adapter_cfg")
    def _dump_cfg(self, value: dict[Any, PEFTAttributeConfig]) -> dict[Any, dict[str, Any]]:
        # Only the keys each entry set explicitly: dumping and reloading keeps the override
        # semantics.
        return {pattern: attrs.model_dump(exclude_unset=True) for pattern, attrs in value.items()}


class ExportPEFTConfig(_Config):
    """Configuration of the export mode. It has no fields."""
