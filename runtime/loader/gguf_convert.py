"""Convert a llama.cpp GGUF file into a Hugging Face model folder, once, into a cache.

GGUF stores quantized weights under llama.cpp names and a config as metadata; the runtime
loads one format only (safetensors folders), so a GGUF model is converted on first use:

    x.gguf --GGUFReader--> metadata -> config.json (+ generation_config.json)
           --dequantize--> fp32 tensors, renamed to HF names, q/k rows un-permuted -> model.safetensors
           --transformers GGUF tokenizer--> tokenizer.json, tokenizer_config.json, chat_template.jinja

Weights are written in fp32: dequantized values (scale * q + min, fp16 scales) are not all
representable in bf16, and fp32 keeps our logits equal to transformers' GGUF loader's.

llama.cpp's converter permutes the rows of Llama's q and k projections so that RoPE pairs
(i, i + D/2) become adjacent (GPT-J style); `_unpermute` restores the HF (rotate_half) order.
Qwen2/Qwen3 GGUFs are written without that permutation.

The folder is built in a temporary sibling directory and renamed into place in one step, so
a crash or a concurrent start never leaves (or reads) a half-written cache; a marker file
written last records the source and the converter version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["convert_gguf_cached", "gguf_cache_dir_name", "MARKER_FILE", "CONVERTER_VERSION"]

#: Written last into a finished cache folder; a folder without it is not a cache.
MARKER_FILE = "radixserve-cache.json"
#: Bump when the output of the converter changes, so old caches are rebuilt.
CONVERTER_VERSION = 1

# GGUF metadata key (after "<arch>.") -> HF config key.
_METADATA_KEYS = MappingProxyType({
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
})

# Per-layer tensor names: GGUF "blk.{i}.<key>" -> HF "model.layers.{i}.<value>".
_LAYER_TENSORS = MappingProxyType({
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
})
_GLOBAL_TENSORS = MappingProxyType({
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
})


@dataclass(frozen=True)
class _GGUFArch:
    """How one GGUF `general.architecture` maps to a HF architecture."""

    hf_architecture: str
    model_type: str
    permute_qk: bool  # llama.cpp permuted q/k rows for this architecture


_GGUF_ARCHS: Mapping[str, _GGUFArch] = MappingProxyType({
    # Mistral GGUFs are written as "llama" too; the layouts are identical.
    "llama": _GGUFArch("LlamaForCausalLM", "llama", permute_qk=True),
    "qwen2": _GGUFArch("Qwen2ForCausalLM", "qwen2", permute_qk=False),
    "qwen3": _GGUFArch("Qwen3ForCausalLM", "qwen3", permute_qk=False),
})


class GGUFConversionError(ValueError):
    """The GGUF file cannot be converted (unsupported architecture or content)."""


def gguf_cache_dir_name(gguf_path: Path) -> str:
    """`<file stem>-<hash of path, size, mtime>`: a changed or moved source gets a new cache."""
    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}"
    return f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def is_complete_cache(folder: Path) -> bool:
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("converter_version") == CONVERTER_VERSION


def convert_gguf_cached(gguf_path: Path, cache_root: Path, name: str | None = None) -> Path:
    """The HF folder converted from `gguf_path` under `cache_root`, converting it if needed."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    folder = cache_root / (name or gguf_cache_dir_name(gguf_path))
    if is_complete_cache(folder):
        return folder
    cache_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(cache_root)
    t0 = time.perf_counter()
    logger.info("converting %s into %s (once; later starts load the folder)", gguf_path, folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=cache_root))
    try:
        _convert(gguf_path, tmp)
        # mkdtemp makes the folder private (0700) and safetensors writes 0600: a model cache
        # is ordinary readable data.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        (tmp / MARKER_FILE).write_text(json.dumps({
            "converter_version": CONVERTER_VERSION,
            "source": str(gguf_path.resolve()),
            "source_size": gguf_path.stat().st_size,
            "created": time.time(),
        }, indent=2))
        _publish(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - t0)
    return folder


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished temp folder into place; if another process won the race, keep its
    (equivalent) folder; an incomplete folder in the way is moved aside and deleted."""
    if folder.exists() and not is_complete_cache(folder):
        trash = folder.with_name(f".{folder.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:
        if not is_complete_cache(folder):
            raise


def _remove_stale_temp_dirs(cache_root: Path, max_age_s: float = 24 * 3600) -> None:
    # Leftovers of crashed conversions; a live conversion's temp dir is younger than a day.
    now = time.time()
    for p in cache_root.glob(".*.tmp-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


# ------------------------------------------------------------------------------- conversion


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_to_hf_config(reader: Any) -> tuple[dict[str, Any], _GGUFArch]:
    """config.json dict from GGUF metadata."""
    arch_name = _field(reader, "general.architecture")
    if arch_name not in _GGUF_ARCHS:
        raise GGUFConversionError(
            f"GGUF architecture {arch_name!r} is not supported; supported: {', '.join(_GGUF_ARCHS)}"
        )
    arch = _GGUF_ARCHS[arch_name]
    config: dict[str, Any] = {"architectures": [arch.hf_architecture], "model_type": arch.model_type,
                              "hidden_act": "silu"}
    for gguf_key, hf_key in _METADATA_KEYS.items():
        value = _field(reader, f"{arch_name}.{gguf_key}")
        if value is not None:
            config[hf_key] = value
    if "vocab_size" not in config:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise GGUFConversionError("GGUF has neither <arch>.vocab_size nor tokenizer.ggml.tokens")
        config["vocab_size"] = len(tokens.data)
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    rope_dim = _field(reader, f"{arch_name}.rope.dimension_count")
    if rope_dim is not None and rope_dim != head_dim:
        raise GGUFConversionError(f"partial RoPE (rope.dimension_count {rope_dim} != head_dim {head_dim}) is not supported")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFConversionError(
            "this GGUF carries rope_freqs (Llama 3.1 long-context RoPE factors), which the converter does not "
            "translate; load the model's Hugging Face safetensors folder instead"
        )
    scaling_type = _field(reader, f"{arch_name}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise GGUFConversionError(f"GGUF rope scaling {scaling_type!r} is not supported (only linear)")
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": float(_field(reader, f"{arch_name}.rope.scaling.factor"))}
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    config["attention_bias"] = any(t.name.endswith("attn_q.bias") for t in reader.tensors)
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            config[key.replace("padding_", "pad_")] = int(value)
    config["torch_dtype"] = "float32"
    config["dtype"] = "float32"
    return config, arch


def hf_tensor_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF checkpoint name, e.g. blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    if len(parts) == 1 and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.{suffix}"
    raise GGUFConversionError(f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent in this converter")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute`: per head, rows [r0 r1 r2 r3 ...] (pairs (i, i+D/2) interleaved)
    back to HF's [first halves | second halves] order.

        llama.cpp:  w.reshape(H, 2, D/2, ...).swapaxes(1, 2)   (what was applied)
        inverse:    w.reshape(H, D/2, 2, ...).swapaxes(1, 2)
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert(gguf_path: Path, out: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    reader = GGUFReader(str(gguf_path))
    config, arch = gguf_to_hf_config(reader)
    heads = {"attn_q": config["num_attention_heads"],
             "attn_k": config.get("num_key_value_heads", config["num_attention_heads"])}
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)
        expected = tuple(int(s) for s in reversed(t.shape))
        w = np.ascontiguousarray(w.reshape(expected), dtype=np.float32)
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
        if arch.permute_qk and kind in heads:  # weights and biases alike: llama.cpp permuted both
            w = np.ascontiguousarray(_unpermute(w, heads[kind]))
        tensors[hf_tensor_name(t.name)] = w
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    _write_tokenizer(gguf_path, out)


def _write_tokenizer(gguf_path: Path, out: Path) -> None:
    # transformers rebuilds a fast tokenizer (tokenizer.json) from the GGUF vocabulary, merges
    # and special tokens, and keeps its chat template.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    tok.save_pretrained(str(out))
    if not (out / "tokenizer.json").is_file():
        raise GGUFConversionError(f"could not build a fast tokenizer from {gguf_path}")

