"""The shape and numerics of a decoder-only model, parsed from a Hugging Face `config.json`.

`ModelConfig` is the one description every other part of the runtime reads: the model
definition builds its layers from it, the loader checks tensor shapes against it, the KV pool
sizes pages from it. `ModelConfig.from_hf(dict)` parses the config.json of the supported
architectures (Llama 2/3/3.1 and SmolLM, Mistral, Qwen2, Qwen3) through a registry of
per-architecture specs, accepting both transformers 5's `rope_parameters` and the older
top-level `rope_theta` / `rope_scaling`. `NAMED_SHAPES` holds the random-weight benchmark
shapes of BENCHMARKS.md (`llama-1b`, `llama-8b`) and a `tiny-llama` for tests.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ModelConfig",
    "NAMED_SHAPES",
    "SUPPORTED_ARCHITECTURES",
    "UnsupportedArchitectureError",
    "named_shape",
]

# The RoPE variants the rotary kernels implement (radixserve.kernels.rotary.rope_inv_freq).
# Others (dynamic NTK, yarn, longrope) change attention numerics: refusing them is better
# than silently serving a model whose outputs drift at long context.
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
})


class UnsupportedArchitectureError(ValueError):
    """A config.json names an architecture this runtime has no model definition for."""


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyper-parameters (Llama family layout).

    Invariants (checked in __post_init__): sizes are positive; `num_heads` is a multiple of
    `num_kv_heads` (GQA groups); `head_dim` is even (RoPE rotates halves); `rope_scaling` is
    None or a dict whose `rope_type` is one the rotary kernels implement; `eos_token_ids` is a
    tuple (possibly empty). `dtype` is the checkpoint's dtype, a hint only: the loader takes
    the serving dtype as an argument.
    """

    architecture: str  # HF class name, e.g. "LlamaForCausalLM"; key of the model registry
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None for plain RoPE; else HF's dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}.
    # Excluded from hashing (dicts are unhashable), still compared by ==.
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # q/k/v projections have a bias (Qwen2; Llama/Qwen3 with attention_bias)
    o_bias: bool = False  # the attention output projection has a bias (Llama/Qwen3 with attention_bias)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(_unsupported_message(self.architecture))
        _SPEC_BY_ARCH[self.architecture].check_flags(self)
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1):
            raise ValueError(f"ModelConfig.rms_norm_eps must be in (0, 1), got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"ModelConfig.rope_theta must be positive, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling)
            # A private copy: the caller's dict must not be able to mutate a frozen config.
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        if not isinstance(self.dtype, torch.dtype) or self.dtype not in set(_DTYPES.values()):
            raise ValueError(f"ModelConfig.dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.bos_token_id is not None and not _is_token_id(self.bos_token_id, self.vocab_size):
            raise ValueError(f"ModelConfig.bos_token_id {self.bos_token_id!r} is not a token id < {self.vocab_size}")
        if not isinstance(self.eos_token_ids, tuple):
            raise TypeError(f"ModelConfig.eos_token_ids must be a tuple, got {type(self.eos_token_ids).__name__}")
        for eos in self.eos_token_ids:
            if not _is_token_id(eos, self.vocab_size):
                raise ValueError(f"ModelConfig.eos_token_ids has {eos!r}, not a token id < {self.vocab_size}")

    # ----------------------------------------------------------------------------- derived

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.o_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * self.head_dim
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return self.num_layers * layer + v * h + h + head

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers (and `from_hf`) read back to this config."""
        spec = _SPEC_BY_ARCH[self.architecture]
        rope_parameters: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope_parameters.update(self.rope_scaling)
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": spec.model_types[0],
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,  # read by transformers < 5
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "rope_parameters": rope_parameters,  # read by transformers >= 5
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (self.eos_token_ids[0] if len(self.eos_token_ids) == 1
                             else list(self.eos_token_ids) or None),
            "torch_dtype": _dtype_name(self.dtype),
            "dtype": _dtype_name(self.dtype),
        }
        if spec.attention_bias_key:
            out["attention_bias"] = self.qkv_bias
        if spec.model_types[0] in ("mistral", "qwen2", "qwen3"):
            out["sliding_window"] = None
            out["use_sliding_window"] = False
        return out

    # ----------------------------------------------------------------------------- parsing

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Parse a Hugging Face config.json dict.

        The architecture comes from `architectures[0]` or else `model_type`. Raises
        UnsupportedArchitectureError naming it and the supported ones; ValueError for a
        missing size, an unsupported activation or RoPE variant.
        """
        if not isinstance(hf, Mapping):
            raise TypeError(f"ModelConfig.from_hf expects a dict (parsed config.json), got {type(hf).__name__}")
        spec = _find_spec(hf)
        if "text_config" in hf and "hidden_size" not in hf:
            raise UnsupportedArchitectureError(
                f"config with a nested text_config (multimodal model) is not supported: {_supported_list()}"
            )

        def required(key: str) -> Any:
            if hf.get(key) is None:
                raise ValueError(f"config.json of a {spec.name} model lacks {key!r}")
            return hf[key]

        def optional(key: str) -> Any:
            value = hf.get(key)
            return spec.defaults.get(key) if value is None else value

        act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (Llama-family models use 'silu')")
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported (no Llama/Mistral/Qwen checkpoint uses it)")

        hidden_size = int(required("hidden_size"))
        num_heads = int(required("num_attention_heads"))
        head_dim = optional("head_dim")
        if head_dim is None:
            head_dim = hidden_size // num_heads
        max_pos = int(optional("max_position_embeddings"))
        rope_theta, rope_scaling = _parse_rope(hf, spec, max_pos)
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported (RoPE over the whole head)")

        window = _sliding_window(hf, spec)
        if window is not None and window < max_pos:
            # Full attention equals sliding-window attention while sequences fit in the window,
            # so capping the context keeps outputs exact rather than silently different.
            logger.warning(
                "%s uses sliding-window attention (window %d); radixserve attends to the full "
                "context, so max_position_embeddings is capped from %d to %d",
                spec.name, window, max_pos, window,
            )
            max_pos = window

        if spec.attention_bias_key:
            # Llama / Qwen3: one flag puts a bias on q, k, v and o alike.
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        else:
            qkv_bias, o_bias = spec.qkv_bias, False

        return cls(
            architecture=spec.name,
            hidden_size=hidden_size,
            num_layers=int(required("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            intermediate_size=int(required("intermediate_size")),
            vocab_size=int(required("vocab_size")),
            rms_norm_eps=float(optional("rms_norm_eps")),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(optional("tie_word_embeddings")),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=spec.qk_norm,
            bos_token_id=hf.get("bos_token_id", spec.defaults.get("bos_token_id")),
            eos_token_ids=_eos_tuple(hf.get("eos_token_id", spec.defaults.get("eos_token_id"))),
            dtype=_parse_dtype(hf.get("dtype") or hf.get("torch_dtype")),
        )


# ------------------------------------------------------------------------------ arch registry


@dataclass(frozen=True)
class _ArchSpec:
    """How one HF architecture maps onto ModelConfig's flags, and its config defaults."""

    name: str  # canonical HF class name (ModelConfig.architecture)
    model_types: tuple[str, ...]  # config.json `model_type` values; the first is written by to_hf
    aliases: tuple[str, ...] = ()  # other `architectures` entries that mean the same layout
    qkv_bias: bool = False
    attention_bias_key: bool = True  # q/k/v/o biases read from config["attention_bias"]
    qk_norm: bool = False
    has_sliding_window: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def check_flags(self, config: ModelConfig) -> None:
        """The layout flags must be ones this architecture's config.json can express (so the
        model matches what transformers builds from the same file)."""
        if config.qk_norm != self.qk_norm:
            raise ValueError(f"{self.name} {'has' if self.qk_norm else 'has no'} q/k norm; got qk_norm={config.qk_norm}")
        if self.attention_bias_key:
            if config.qkv_bias != config.o_bias:
                raise ValueError(f"{self.name}: attention_bias sets qkv_bias and o_bias together; got "
                                 f"qkv_bias={config.qkv_bias}, o_bias={config.o_bias}")
        elif (config.qkv_bias, config.o_bias) != (self.qkv_bias, False):
            raise ValueError(f"{self.name} has qkv_bias={self.qkv_bias} and o_bias=False; got "
                             f"qkv_bias={config.qkv_bias}, o_bias={config.o_bias}")


_LLAMA_DEFAULTS = MappingProxyType({
    "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0,
})

_ARCH_SPECS: tuple[_ArchSpec, ...] = (
    _ArchSpec("LlamaForCausalLM", ("llama",), defaults=_LLAMA_DEFAULTS),
    _ArchSpec(
        "MistralForCausalLM", ("mistral",), attention_bias_key=False, has_sliding_window=True,
        defaults=MappingProxyType({**_LLAMA_DEFAULTS, "max_position_embeddings": 4096 * 32}),
    ),
    _ArchSpec(
        "Qwen2ForCausalLM", ("qwen2",), qkv_bias=True, attention_bias_key=False, has_sliding_window=True,
        defaults=MappingProxyType({
            "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": False,
            "rope_theta": 10000.0,
        }),
    ),
    _ArchSpec(
        "Qwen3ForCausalLM", ("qwen3",), qk_norm=True, has_sliding_window=True,
        defaults=MappingProxyType({
            "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": False,
            "rope_theta": 10000.0, "head_dim": 128,
        }),
    ),
)

_SPEC_BY_ARCH: Mapping[str, _ArchSpec] = MappingProxyType({s.name: s for s in _ARCH_SPECS})
_SPEC_BY_NAME: Mapping[str, _ArchSpec] = MappingProxyType(
    {name: s for s in _ARCH_SPECS for name in (s.name, *s.aliases)}
)
_SPEC_BY_MODEL_TYPE: Mapping[str, _ArchSpec] = MappingProxyType(
    {mt: s for s in _ARCH_SPECS for mt in s.model_types}
)

#: HF architecture names ModelConfig accepts (each maps to a model class in models/registry.py).
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_SPEC_BY_ARCH)


def _supported_list() -> str:
    return "supported architectures: " + ", ".join(
        f"{s.name} (model_type {s.model_types[0]!r})" for s in _ARCH_SPECS
    )


def _unsupported_message(arch: Any) -> str:
    return f"unsupported model architecture {arch!r}; {_supported_list()}"


def _find_spec(hf: Mapping[str, Any]) -> _ArchSpec:
    archs = hf.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    for arch in archs:
        if arch in _SPEC_BY_NAME:
            return _SPEC_BY_NAME[arch]
    model_type = hf.get("model_type")
    if not archs and model_type in _SPEC_BY_MODEL_TYPE:
        return _SPEC_BY_MODEL_TYPE[model_type]
    named = archs[0] if archs else model_type
    raise UnsupportedArchitectureError(_unsupported_message(named))


# ------------------------------------------------------------------------------ field parsers


def _parse_rope(hf: Mapping[str, Any], spec: _ArchSpec, max_pos: int) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either config style.

    transformers >= 5 writes `rope_parameters: {"rope_theta", "rope_type", ...scaling keys}`;
    older versions write `rope_theta` at top level and `rope_scaling: {"type" | "rope_type", ...}`
    (or null). Both may be present; `rope_parameters` wins.
    """
    params: dict[str, Any] = {}
    if hf.get("rope_scaling"):
        params.update(hf["rope_scaling"])
    rope_parameters = hf.get("rope_parameters")
    if rope_parameters:
        if not isinstance(rope_parameters, Mapping) or any(isinstance(v, Mapping) for v in rope_parameters.values()):
            raise ValueError(f"per-layer-type rope_parameters are not supported: {rope_parameters!r}")
        params.update(rope_parameters)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = hf.get("rope_theta") or spec.defaults.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported (RoPE over the whole head)")
    if rope_type == "default":
        return float(theta), None
    scaling = {"rope_type": rope_type, **params}
    if rope_type == "llama3":
        # transformers fills this in from max_position_embeddings when a config omits it.
        scaling.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings", max_pos))
    return float(theta), scaling


def _validate_rope_scaling(scaling: Mapping[str, Any]) -> None:
    if not isinstance(scaling, Mapping):
        raise TypeError(f"ModelConfig.rope_scaling must be a dict or None, got {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"RoPE scaling type {rope_type!r} is not supported; supported: {', '.join(_SUPPORTED_ROPE_TYPES)}"
        )
    required = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    for key in required.get(rope_type, ()):
        if key not in scaling:
            raise ValueError(f"RoPE scaling {dict(scaling)!r} of type {rope_type!r} lacks {key!r}")
    if "factor" in scaling and not float(scaling["factor"]) > 0:
        raise ValueError(f"RoPE scaling factor must be positive, got {scaling['factor']!r}")


def _sliding_window(hf: Mapping[str, Any], spec: _ArchSpec) -> int | None:
    if not spec.has_sliding_window:
        return None
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        return None  # Qwen2/Qwen3 ship `sliding_window` but switch it off
    window = hf.get("sliding_window")
    return int(window) if window else None


def _eos_tuple(eos: Any) -> tuple[int, ...]:
    if eos is None:
        return ()
    if isinstance(eos, int) and not isinstance(eos, bool):
        return (eos,)
    if isinstance(eos, (list, tuple)):
        return tuple(int(e) for e in eos)
    raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos!r}")


def _parse_dtype(name: Any) -> torch.dtype:
    if name is None:
        return torch.bfloat16
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported checkpoint dtype {name!r}; expected one of float32, float16, bfloat16")
    return _DTYPES[key]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_token_id(value: Any, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


# ------------------------------------------------------------------------------ named shapes

#: Random-weight shapes for `--load-format dummy` (BENCHMARKS.md "Models"), plus a tiny one for
#: tests. The Llama 3 RoPE settings are those of the real checkpoints, so attention numerics
#: (and therefore the work per token) are those of the real models.
NAMED_SHAPES: Mapping[str, ModelConfig] = MappingProxyType({
    "llama-1b": ModelConfig(
        architecture="LlamaForCausalLM", hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, intermediate_size=8192, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009), dtype=torch.bfloat16,
    ),
    "llama-8b": ModelConfig(
        architecture="LlamaForCausalLM", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009), dtype=torch.bfloat16,
    ),
    # Small enough for CPU unit tests; vocab of the default model's tokenizer, so the default
    # tokenizer serves it.
    "tiny-llama": ModelConfig(
        architecture="LlamaForCausalLM", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=128, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
        dtype=torch.float32,
    ),
})


def named_shape(name: str) -> ModelConfig:
    """The ModelConfig of a named shape; KeyError listing the names otherwise."""
    if name not in NAMED_SHAPES:
        raise KeyError(f"unknown named shape {name!r}; known: {', '.join(NAMED_SHAPES)}")
    return NAMED_SHAPES[name]
