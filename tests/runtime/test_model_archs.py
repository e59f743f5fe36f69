"""Each supported architecture against transformers' own modeling class, and config parsing.

For every architecture a tiny config is built with transformers' config class, the model is
created by transformers with random weights (norm weights and biases randomized too, so a
misapplied q/k norm or bias cannot hide behind ones and zeros) and saved as safetensors in a
tmp folder. That folder then goes through our whole path (resolve_model -> ModelConfig.from_hf
-> load_model -> paged forward) and the logits are compared with transformers' forward on the
same ids. fp32 on both sides; tiny models give logits of magnitude ~1, so agreement is
expected to ~1e-6 and the tolerance is 1e-4 (any real error is orders of magnitude larger).
"""

from __future__ import annotations

import json

import pytest
import torch

from radixserve.runtime.forward_batch import SeqStep, build_forward_batch
from radixserve.runtime.kv_cache import KVCache
from radixserve.runtime.loader import load_model, resolve_model
from radixserve.runtime.model_config import (
    NAMED_SHAPES,
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    UnsupportedArchitectureError,
)

ATOL = 1e-4
VOCAB = 320

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

# name -> (transformers config class, kwargs, expected (qkv_bias, qk_norm))
ARCHS = {
    "llama": ("LlamaConfig", dict(_COMMON, rope_theta=10000.0, tie_word_embeddings=False), (False, False)),
    "llama-tied-bias": ("LlamaConfig", dict(_COMMON, tie_word_embeddings=True, attention_bias=True), (True, False)),
    "llama3-rope-scaling": ("LlamaConfig", dict(
        _COMMON, rope_theta=10000.0,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ), (False, False)),
    "llama-linear-rope": ("LlamaConfig", dict(
        _COMMON, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}), (False, False)),
    "mistral": ("MistralConfig", dict(_COMMON, sliding_window=None, head_dim=16), (False, False)),
    "qwen2": ("Qwen2Config", dict(_COMMON, rope_theta=1000000.0, tie_word_embeddings=True), (True, False)),
    "qwen3": ("Qwen3Config", dict(_COMMON, head_dim=24, rope_theta=1000000.0), (False, True)),
}


def _make_hf_model(name: str, folder) -> torch.nn.Module:
    import transformers

    cls_name, kwargs, _ = ARCHS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))  # larger than 0.02: attention far from uniform
    model.eval()
    model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = _make_hf_model(request.param, folder)
    resolved = resolve_model(str(folder), "hf")
    ours = load_model(resolved, "cpu", torch.float32, ops="torch", progress=False)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (40,)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    return request.param, folder, resolved, ours, ids, ref


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"max |logit diff| {diff:.2e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_config_flags(arch):
    name, _, resolved, _, _, _ = arch
    expected_bias, expected_norm = ARCHS[name][2]
    cfg = resolved.config
    assert (cfg.qkv_bias, cfg.qk_norm) == (expected_bias, expected_norm)
    assert cfg.architecture in SUPPORTED_ARCHITECTURES
    kwargs = ARCHS[name][1]
    assert cfg.head_dim == kwargs.get("head_dim", 16)
    if "rope_parameters" in kwargs:
        assert cfg.rope_scaling["rope_type"] == kwargs["rope_parameters"]["rope_type"]


def test_prefill_matches_transformers(arch):
    _, _, resolved, ours, ids, ref = arch
    kv = KVCache.for_model(resolved.config, 32, 4, torch.float32, "cpu")
    with torch.no_grad():
        out = ours(build_forward_batch([SeqStep(ids, 0, [9, 3, 17, 1, 5, 30, 2, 8, 11, 4], logits_from=0)], 4, "cpu"),
                   kv)
    _close(out, ref)


def test_chunked_prefill_and_decode_match_transformers(arch):
    _, _, resolved, ours, ids, ref = arch
    page_size = 8
    kv = KVCache.for_model(resolved.config, 16, page_size, torch.float32, "cpu")
    pages = [7, 2, 12, 4, 9]
    rows = []
    with torch.no_grad():
        rows.append(ours(build_forward_batch([SeqStep(ids[:13], 0, pages, logits_from=0)], page_size, "cpu"), kv))
        rows.append(ours(build_forward_batch([SeqStep(ids[13:37], 13, pages, logits_from=0)], page_size, "cpu"), kv))
        for t in range(37, 40):
            rows.append(ours(build_forward_batch([SeqStep([ids[t]], t, pages)], page_size, "cpu"), kv))
    _close(torch.cat(rows), ref)


def test_saved_config_parses_like_legacy_style(arch):
    """transformers 5 saves `rope_parameters`; older files carry `rope_theta` / `rope_scaling`
    at top level. Both spellings of the same model give the same ModelConfig."""
    _, folder, resolved, _, _, _ = arch
    saved = json.loads((folder / "config.json").read_text())
    legacy = {k: v for k, v in saved.items() if k != "rope_parameters"}
    params = dict(saved["rope_parameters"])
    legacy["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    legacy["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **params}
    assert ModelConfig.from_hf(legacy) == resolved.config
    assert ModelConfig.from_hf(resolved.config.to_hf()) == resolved.config


# ------------------------------------------------------------------------ config parsing

LLAMA_31_8B = {  # config.json of meta-llama/Llama-3.1-8B-Instruct (transformers 4.x style)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}

LLAMA_32_1B = {  # config.json of meta-llama/Llama-3.2-1B-Instruct
    **LLAMA_31_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64,
    "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True,
}


def test_named_shapes_match_benchmarks_and_real_configs():
    one, eight = NAMED_SHAPES["llama-1b"], NAMED_SHAPES["llama-8b"]
    # BENCHMARKS.md "Models"
    assert (one.hidden_size, one.num_layers, one.num_heads, one.num_kv_heads, one.head_dim,
            one.intermediate_size, one.vocab_size, one.tie_word_embeddings) == \
        (2048, 16, 32, 8, 64, 8192, 128256, True)
    assert (eight.hidden_size, eight.num_layers, eight.num_heads, eight.num_kv_heads, eight.head_dim,
            eight.intermediate_size, eight.vocab_size) == (4096, 32, 32, 8, 128, 14336, 128256)
    assert ModelConfig.from_hf(LLAMA_31_8B) == eight
    assert ModelConfig.from_hf(LLAMA_32_1B) == one
    assert 1.2e9 < one.num_parameters() < 1.3e9 and 8.0e9 < eight.num_parameters() < 8.1e9
    for cfg in NAMED_SHAPES.values():
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_transformers_5_rope_parameters_style():
    new = {k: v for k, v in LLAMA_31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {"rope_theta": 500000.0, **LLAMA_31_8B["rope_scaling"]}
    assert ModelConfig.from_hf(new) == NAMED_SHAPES["llama-8b"]


def test_smollm_style_llama_defaults():
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 30,
                               "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
                               "vocab_size": 49152, "rope_theta": 100000, "tie_word_embeddings": True,
                               "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "bos_token_id": 1,
                               "eos_token_id": 2})
    assert cfg.head_dim == 64 and cfg.rope_scaling is None and cfg.rope_theta == 100000.0
    assert cfg.eos_token_ids == (2,) and cfg.dtype == torch.bfloat16


def test_model_type_without_architectures_and_qwen_defaults():
    cfg = ModelConfig.from_hf({"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
                               "vocab_size": 1000, "sliding_window": 4096, "use_sliding_window": False,
                               "eos_token_id": [5, 6]})
    assert cfg.architecture == "Qwen3ForCausalLM" and cfg.qk_norm and cfg.head_dim == 128
    assert cfg.max_position_embeddings == 32768  # sliding window switched off: not a cap
    assert cfg.eos_token_ids == (5, 6) and cfg.bos_token_id is None


def test_mistral_sliding_window_caps_context(caplog):
    cfg = ModelConfig.from_hf({"architectures": ["MistralForCausalLM"], "hidden_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 96,
                               "vocab_size": 1000, "max_position_embeddings": 32768, "sliding_window": 4096})
    assert cfg.max_position_embeddings == 4096
    assert "sliding-window" in caplog.text


def test_unsupported_architecture_names_it_and_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as e:
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in msg
    with pytest.raises(UnsupportedArchitectureError, match="'falcon'"):
        ModelConfig.from_hf({"model_type": "falcon"})


@pytest.mark.parametrize("change, match", [
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"intermediate_size": None}, "intermediate_size"),
    ({"num_hidden_layers": 0}, "num_layers"),
    ({"torch_dtype": "int8"}, "dtype"),
    ({"eos_token_id": 10**6}, "eos_token_ids"),
])
def test_invalid_configs_are_clear_errors(change, match):
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 1000}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf({**base, **change})


def test_config_is_frozen_and_owns_its_rope_dict():
    scaling = {"rope_type": "linear", "factor": 2.0}
    cfg = ModelConfig(architecture="LlamaForCausalLM", hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=16, intermediate_size=96, vocab_size=100, rope_scaling=scaling)
    scaling["factor"] = 100.0
    assert cfg.rope_scaling["factor"] == 2.0
    with pytest.raises(Exception):
        cfg.hidden_size = 3  # type: ignore[misc]
    hash(cfg)


def test_lm_head_writes_logits_into_a_given_buffer():
    """CUDA graphs of every batch size share one logits buffer: the LM head writes there (and
    returns it), the same logits as without it, and refuses a buffer of the wrong shape or type."""
    from radixserve.runtime.models.layers import ParallelLMHead

    head = ParallelLMHead(50, 8, dtype=torch.float32)
    torch.nn.init.normal_(head.weight)
    hidden = torch.randn(3, 8)
    buf = torch.full((5, 50), float("nan"))
    out = head(hidden, out=buf[:3])
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf[:3], head(hidden))
    assert buf[3:].isnan().all()
    with pytest.raises(ValueError, match="float32"):
        head(hidden, out=torch.empty(3, 50, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32"):
        head(hidden, out=buf[:2])
