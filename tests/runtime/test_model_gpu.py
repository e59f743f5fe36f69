"""The CUDA path of the model (Triton ops), on random-weight benchmark shapes and tiny models.

Skipped without a GPU (CI has none). On a GPU machine these check that dummy weights of the
8B shape are generated on the device in seconds, that the Triton ops give the logits of the
PyTorch reference ops for the same weights, and that tiny models of each architecture match
transformers on the GPU.
"""

from __future__ import annotations

import time

import pytest
import torch

from radixserve.runtime.forward_batch import SeqStep, build_forward_batch
from radixserve.runtime.kv_cache import KVCache
from radixserve.runtime.loader import ResolvedModel, load_model
from radixserve.runtime.model_config import NAMED_SHAPES, ModelConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _dummy(name: str) -> ResolvedModel:
    return ResolvedModel(name=name, path=None, config=NAMED_SHAPES[name], load_format="dummy", tokenizer_path=None)


def _steps(page_size: int) -> tuple[list[SeqStep], list[SeqStep]]:
    """A prefill batch (a fresh prompt, a prompt's first chunk) and the follow-up mixed batch."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 32000, (300,), generator=g).tolist()
    b = torch.randint(0, 32000, (200,), generator=g).tolist()
    # Scattered, disjoint page ids, all < 40 + 520 / page_size (the pool below has more).
    pa = [40 + 2 * i for i in range(-(-301 // page_size))]
    pb = [41 + 2 * i for i in range(-(-200 // page_size))]
    first = [SeqStep(a, 0, pa, logits_from=0), SeqStep(b[:130], 0, pb, logits_from=0)]
    second = [SeqStep(b[130:], 130, pb, logits_from=0), SeqStep([7], 300, pa)]
    return first, second


def test_dummy_8b_generates_on_device_quickly():
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model = load_model(_dummy("llama-8b"), "cuda", torch.bfloat16, progress=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    print(f"llama-8b dummy weights: {n / 1e9:.2f}B parameters in {elapsed:.1f} s on {torch.cuda.get_device_name()}")
    assert elapsed < 60
    w = model.model.layers[3].self_attn.qkv_proj.weight
    assert w.device.type == "cuda" and w.dtype == torch.bfloat16 and abs(w.float().std().item() - 0.02) < 1e-3
    kv = KVCache.for_model(model.config, 64, 16, torch.bfloat16, "cuda")
    with torch.no_grad():
        out = model(build_forward_batch([SeqStep(list(range(1, 200)), 0, list(range(1, 14)))], 16, "cuda"), kv)
    assert out.shape == (1, 128256) and out.dtype == torch.float32 and torch.isfinite(out).all()
    del model, kv
    torch.cuda.empty_cache()


def _run_1b(ops: str, dtype: torch.dtype, page_size: int) -> torch.Tensor:
    resolved = _dummy("llama-1b")
    model = load_model(resolved, "cuda", dtype, ops=ops, progress=False, seed=3)
    kv = KVCache.for_model(resolved.config, 40 + 1040 // page_size, page_size, dtype, "cuda")
    first, second = _steps(page_size)
    with torch.no_grad():
        out = torch.cat([model(build_forward_batch(first, page_size, "cuda"), kv),
                         model(build_forward_batch(second, page_size, "cuda"), kv)])
    del model, kv
    torch.cuda.empty_cache()
    return out


@pytest.mark.parametrize("page_size", [1, 16])
def test_triton_ops_match_reference_ops_llama_1b(page_size):
    """fp32: Triton and PyTorch ops agree closely. bf16: both drift from the fp32 logits by
    rounding, and the Triton path drifts no more than the reference path does."""
    exact = _run_1b("torch", torch.float32, page_size)
    triton32 = _run_1b("triton", torch.float32, page_size)
    scale = exact.abs().max().item()
    err32 = (triton32 - exact).abs().max().item()
    err_triton = (_run_1b("triton", torch.bfloat16, page_size) - exact).abs().max().item()
    err_torch = (_run_1b("torch", torch.bfloat16, page_size) - exact).abs().max().item()
    print(f"llama-1b P={page_size}: logit scale {scale:.3f}; fp32 |triton - torch| {err32:.2e}; "
          f"bf16 vs fp32: triton {err_triton:.4f}, torch {err_torch:.4f}")
    assert err32 <= 1e-3 * scale
    assert err_triton <= 1.5 * err_torch + 1e-3 * scale


def test_tiny_llama_fp32_triton_matches_transformers(tmp_path):
    import transformers

    kinds = {
        "llama3": transformers.LlamaConfig(
            vocab_size=500, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "qwen2": transformers.Qwen2Config(vocab_size=500, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        "qwen3": transformers.Qwen3Config(vocab_size=500, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                          max_position_embeddings=512),
    }
    from radixserve.runtime.loader import resolve_model

    for name, hf_config in kinds.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in pname else 0.1 * torch.randn_like(p))
        hf.save_pretrained(str(tmp_path / name))
        hf = hf.cuda().eval()
        ours = load_model(resolve_model(str(tmp_path / name), "hf"), "cuda", torch.float32, progress=False)
        ids = torch.randint(0, 500, (100,)).tolist()
        kv = KVCache.for_model(ours.config, 32, 16, torch.float32, "cuda")
        pages = [5, 9, 2, 30, 11, 7, 20]
        with torch.no_grad():
            ref = hf(torch.tensor([ids], device="cuda")).logits[0].float()
            rows = [ours(build_forward_batch([SeqStep(ids[:61], 0, pages, logits_from=0)], 16, "cuda"), kv)]
            rows.append(ours(build_forward_batch([SeqStep(ids[61:97], 61, pages, logits_from=0)], 16, "cuda"), kv))
            for t in range(97, 100):
                rows.append(ours(build_forward_batch([SeqStep([ids[t]], t, pages)], 16, "cuda"), kv))
        diff = (torch.cat(rows) - ref).abs().max().item()
        print(f"{name}: fp32 max |ours(triton) - transformers| on GPU {diff:.2e}")
        assert diff < 2e-3


def test_config_of_dummy_shapes_is_consistent():
    for name in ("llama-1b", "llama-8b"):
        cfg = NAMED_SHAPES[name]
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg
