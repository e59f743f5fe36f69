"""Model resolution and loading: formats, the GGUF cache, dummy weights, errors; plus the
small pieces the loader hands to the engine (KV cache sizing, batch builder, ops registry,
tokenizers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from radixserve.runtime.forward_batch import SeqStep, build_forward_batch
from radixserve.runtime.kv_cache import KVCache
from radixserve.runtime.loader import ModelResolveError, load_model, resolve_model
from radixserve.runtime.loader import gguf_convert
from radixserve.runtime.loader.weights import DUMMY_STD
from radixserve.runtime.model_config import NAMED_SHAPES, UnsupportedArchitectureError
from radixserve.runtime.ops import OPS_BACKENDS, select_ops
from radixserve.runtime.tokenizer import BYTE_TOKENIZER_VOCAB_SIZE, byte_level_tokenizer, load_tokenizer

TINY_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
           "vocab_size": 300, "max_position_embeddings": 128, "tie_word_embeddings": False}


def _tiny_hf_folder(path, **save_kwargs):
    """A transformers-made tiny Llama saved in `path`; returns the transformers model."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF)).eval()
    model.save_pretrained(str(path), **save_kwargs)
    return model


def _logits(model, ids: list[int]) -> torch.Tensor:
    cfg = model.config
    kv = KVCache.for_model(cfg, 8, 16, next(model.parameters()).dtype, "cpu")
    with torch.no_grad():
        return model(build_forward_batch([SeqStep(ids, 0, [1, 2, 3], logits_from=0)], 16, "cpu"), kv)


# ------------------------------------------------------------------------------ errors


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelResolveError, match="does not exist") as e:
        resolve_model(str(missing))
    assert str(missing) in str(e.value) and "never downloads" in str(e.value)


def test_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(ModelResolveError, match="not a GGUF file") as e:
        resolve_model(str(f))
    assert str(f) in str(e.value)
    with pytest.raises(ModelResolveError, match="is a file, not a model folder"):
        resolve_model(str(f), "hf")
    with pytest.raises(ModelResolveError, match="not a GGUF file"):
        resolve_model(str(f), "gguf")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelResolveError, match="config.json is missing") as e:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    with pytest.raises(ModelResolveError, match="has no weights.*dummy") as e:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelResolveError, match="pytorch_model.bin.*not supported"):
        resolve_model(str(tmp_path), "hf")
    # The same folder is a fine source of a config for random weights.
    assert resolve_model(str(tmp_path), "dummy").load_format == "dummy"


def test_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelResolveError, match="model-00001-of-00002.safetensors"):
        resolve_model(str(tmp_path))


def test_unsupported_architecture_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        resolve_model(str(tmp_path), "dummy")


def test_unknown_load_format_and_name():
    with pytest.raises(ModelResolveError, match="unknown load format 'pickle'"):
        resolve_model("default", "pickle")
    with pytest.raises(ModelResolveError, match="llama-1b"):
        resolve_model("llama-70b-that-does-not-exist")


def test_checkpoint_missing_extra_or_misshapen_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    _tiny_hf_folder(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    full = dict(weights)

    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelResolveError, match="lacks weights for model.layers.1.mlp.gate_up_proj.weight"):
        load_model(resolve_model(str(tmp_path)), "cpu", torch.float32, progress=False)

    save_file({**full, "model.layers.0.self_attn.extra.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="self_attn.extra.weight"):
        load_model(resolve_model(str(tmp_path)), "cpu", torch.float32, progress=False)

    save_file({**full, "model.norm.weight": torch.ones(31)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(31,\).*\(32,\)"):
        load_model(resolve_model(str(tmp_path)), "cpu", torch.float32, progress=False)


# ------------------------------------------------------------------------------ hf format


def test_sharded_checkpoint_and_dtype(tmp_path):
    hf = _tiny_hf_folder(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    resolved = resolve_model(str(tmp_path / "sharded"))
    assert resolved.load_format == "hf" and len(resolved.weight_files) > 1
    assert resolved.tokenizer_path is None  # no tokenizer files: the byte-level tokenizer
    ids = [5, 17, 290, 3, 3, 100]
    ours = load_model(resolved, "cpu", torch.float32, progress=False)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (_logits(ours, ids) - ref).abs().max() < 1e-4
    bf16 = load_model(resolved, "cpu", torch.bfloat16, progress=False)
    assert bf16.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert _logits(bf16, ids).dtype == torch.float32
    tok = load_tokenizer(resolved)
    assert tok.decode(tok.encode("héllo", add_special_tokens=False)) == "héllo"


def test_cpu_backend_packs_projections(tmp_path):
    """With the "cpu" ops backend every fp32 projection (and the LM head) gets a packed weight;
    the "torch" backend and bf16 weights keep F.linear; the logits agree either way."""
    from radixserve.kernels.cpu_linear import HAS_PACKED_LINEAR
    from radixserve.runtime.models.layers import _PackableWeight

    _tiny_hf_folder(tmp_path / "m")
    resolved = resolve_model(str(tmp_path / "m"))
    ids = [5, 17, 290, 3, 3, 100]
    packed = load_model(resolved, "cpu", torch.float32, ops="cpu", progress=False)
    plain = load_model(resolved, "cpu", torch.float32, ops="torch", progress=False)
    layers = [m for m in packed.modules() if isinstance(m, _PackableWeight)]
    assert len(layers) == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the LM head
    assert all((m.packed_weight is not None) == HAS_PACKED_LINEAR for m in layers)
    assert all(m.packed_weight is None for m in plain.modules() if isinstance(m, _PackableWeight))
    assert (_logits(packed, ids) - _logits(plain, ids)).abs().max() < 1e-4


# ------------------------------------------------------------------------------ dummy


def test_dummy_named_shape():
    resolved = resolve_model("tiny-llama")
    assert resolved.load_format == "dummy" and resolved.path is None
    assert resolved.config == NAMED_SHAPES["tiny-llama"]
    assert resolved.tokenizer_path is not None  # vocab 49152 fits the default model's tokenizer
    model = load_model(resolved, "cpu", torch.float32, progress=False, seed=1)
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    w = layer.mlp.gate_up_proj.weight
    assert abs(w.std().item() - DUMMY_STD) < 0.002 and abs(w.mean().item()) < 0.002
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    logits = _logits(model, [1, 2, 3, 4])
    assert logits.shape == (4, 49152) and torch.isfinite(logits).all()
    again = load_model(resolved, "cpu", torch.float32, progress=False, seed=1)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_dummy_small_vocab_uses_byte_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    resolved = resolve_model(str(tmp_path / "config.json"), "dummy")
    assert resolved.tokenizer_path is None
    tok = load_tokenizer(resolved)
    assert len(tok) == BYTE_TOKENIZER_VOCAB_SIZE <= resolved.config.vocab_size
    (tmp_path / "config.json").write_text(json.dumps({**TINY_HF, "vocab_size": 100}))
    with pytest.raises(ModelResolveError, match="too small"):
        resolve_model(str(tmp_path), "dummy")


def test_byte_level_tokenizer():
    tok = byte_level_tokenizer()
    text = "naïve café 🚀 <|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[:-1] == list("naïve café 🚀 ".encode()) and ids[-1] == 260
    assert tok.decode(ids) == text
    assert tok.decode([*ids, 1000]) == text  # ids past the tokenizer's vocabulary decode to nothing
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------------------ gguf / default


def test_default_model_cache_is_reused():
    first = resolve_model("default")
    marker = first.path / gguf_convert.MARKER_FILE
    assert marker.is_file()
    stamp = marker.stat().st_mtime_ns
    second = resolve_model("default", "gguf")
    assert second.path == first.path and marker.stat().st_mtime_ns == stamp
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert (first.path / f).is_file(), f
    tok = load_tokenizer(first)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token_id == 2 and len(tok) == first.config.vocab_size
    assert first.tokenizer_path == first.path


def test_conversion_is_atomic(tmp_path, monkeypatch):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 16)
    cache = tmp_path / "cache"
    calls = []

    def crash(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(gguf_convert, "_convert", crash)
    with pytest.raises(RuntimeError, match="killed"):
        gguf_convert.convert_gguf_cached(src, cache)
    assert list(cache.iterdir()) == []  # neither a final folder nor a temp folder is left

    def convert(gguf_path, out):
        calls.append(out)
        (out / "config.json").write_text(json.dumps(TINY_HF))

    # A folder in the way without the marker (an old crash) is replaced, not trusted.
    stale = cache / gguf_convert.gguf_cache_dir_name(src)
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"x")
    monkeypatch.setattr(gguf_convert, "_convert", convert)
    folder = gguf_convert.convert_gguf_cached(src, cache)
    assert folder == stale and not (folder / "half.safetensors").exists()
    assert (folder / gguf_convert.MARKER_FILE).is_file()
    assert gguf_convert.convert_gguf_cached(src, cache) == folder and len(calls) == 1
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]
    assert folder.stat().st_mode & 0o777 == 0o755  # mkdtemp's 0700 is not what a shared cache wants


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for heads, head_dim, cols in ((9, 64, 5), (3, 64, 5), (2, 8, 1)):
        w = rng.standard_normal((heads * head_dim, cols)).astype(np.float32)
        # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        permuted = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
        assert np.array_equal(gguf_convert._unpermute(permuted, heads), w)
    assert gguf_convert.hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert gguf_convert.hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_convert.hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="blk.0.ssm_a"):
        gguf_convert.hf_tensor_name("blk.0.ssm_a")


# ------------------------------------------------------------------------------ kv cache, batch, ops


def test_kv_cache_layout_and_budget():
    cfg = NAMED_SHAPES["llama-8b"]
    # 2 (K, V) * 32 layers * 16 tokens * 8 heads * 128 dims * 2 bytes
    assert KVCache.pages_for_budget(cfg, 16, 2 * 32 * 16 * 8 * 128 * 2 * 10 + 5, torch.bfloat16) == 10
    assert KVCache.pages_for_budget(cfg, 16, 100, torch.bfloat16) == 0
    kv = KVCache(num_layers=2, num_pages=5, page_size=4, num_kv_heads=3, head_dim=8, dtype=torch.float16,
                 device="cpu")
    assert kv.k[1].shape == (5, 4, 3, 8) and kv.v[0].dtype == torch.float16 and kv.k[0].is_contiguous()
    assert kv.bytes_per_page == 2 * 2 * 4 * 3 * 8 * 2 and kv.num_slots == 20
    # Zeroed, not garbage: reference attention gathers whole pages and 0 * NaN would leak.
    assert all(torch.count_nonzero(t) == 0 for t in (*kv.k, *kv.v))
    with pytest.raises(ValueError, match="page_size"):
        KVCache(1, 1, 65, 1, 8, torch.float16, "cpu")


def test_build_forward_batch_layout():
    #   r0: 3 cached + 4 new over pages [7, 2] (P=4): positions 3..6 -> slots 31, 8, 9, 10
    #   r1: decode at position 5 over pages [4, 0]: slot 0*4 + 1 = 1
    b = build_forward_batch([SeqStep([11, 12, 13, 14], 3, [7, 2, 9], logits_from=-2),
                             SeqStep([21], 5, [4, 0])], 4, "cpu")
    assert b.input_ids.tolist() == [11, 12, 13, 14, 21] and b.input_ids.dtype == torch.int64
    assert b.positions.tolist() == [3, 4, 5, 6, 5]
    assert b.out_slots.tolist() == [31, 8, 9, 10, 1]
    assert b.page_table.tolist() == [[7, 2], [4, 0]] and b.page_table.dtype == torch.int32
    assert b.seq_lens.tolist() == [7, 6] and b.extend_lens.tolist() == [4, 1] and b.cu_extend.tolist() == [0, 4, 5]
    assert b.logits_indices.tolist() == [2, 3, 4]
    assert b.seq_lens_cpu == (7, 6) and not b.is_decode and b.max_seq_len == 7 and b.num_tokens == 5
    assert build_forward_batch([SeqStep([1], 0, [3], logits_from=None)], 4, "cpu").logits_indices.numel() == 0
    with pytest.raises(ValueError, match="needing 2 pages"):
        build_forward_batch([SeqStep([1, 2], 3, [1])], 4, "cpu")
    with pytest.raises(ValueError, match="at least one token"):
        SeqStep([], 0, [1])
    with pytest.raises(ValueError, match="logits_from"):
        SeqStep([1, 2], 0, [1], logits_from=2)


def test_ops_registry():
    assert select_ops("cpu").name == "cpu"  # the fast CPU ops over the references
    assert select_ops("cpu", "torch").name == "torch"
    assert set(OPS_BACKENDS) == {"torch", "cpu", "triton"}
    assert select_ops("cpu", "triton").name == "triton"  # explicit choice honored (interpreter / CUDA)
    with pytest.raises(ValueError, match="unknown ops backend 'cuda'.*torch, cpu, triton"):
        select_ops("cpu", "cuda")
