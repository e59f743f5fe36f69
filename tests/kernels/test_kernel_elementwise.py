"""store_kv, rms_norm, rotary and silu_and_mul: Triton (interpreted on CPU) vs reference vs HF/float64."""

from __future__ import annotations

import pytest
import torch

from kernel_test_utils import DEVICE, TOL, assert_close, gpu
from radixserve.kernels import (
    REFERENCE_OPS,
    TRITON_OPS,
    apply_rotary,
    apply_rotary_reference,
    rms_norm,
    rms_norm_reference,
    rope_cos_sin_cache,
    silu_and_mul,
    silu_and_mul_reference,
    store_kv,
    store_kv_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_registries_pair_every_op():
    assert set(TRITON_OPS) == set(REFERENCE_OPS)
    for name in TRITON_OPS:
        assert TRITON_OPS[name].__name__ == name
        assert REFERENCE_OPS[name].__name__ == f"{name}_reference"


# ---------------------------------------------------------------- store_kv

@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv(page_size, dtype):
    gen = torch.Generator().manual_seed(page_size)
    num_pages, hkv, d, t = 16, 3, 24, 11
    slots = torch.randperm(num_pages * page_size, generator=gen)[:t]
    # k and v as strided views of a fused [T, 3 * Hkv, D] projection (q | k | v).
    qkv = torch.randn(t, 3 * hkv, d, generator=gen).to(dtype).to(DEVICE)
    k, v = qkv[:, hkv : 2 * hkv], qkv[:, 2 * hkv :]
    caches = [torch.randn(num_pages, page_size, hkv, d, generator=gen).to(dtype).to(DEVICE) for _ in range(2)]
    expected_k, expected_v = caches[0].clone(), caches[1].clone()
    # Oracle: one token at a time.
    for i, s in enumerate(slots.tolist()):
        expected_k[s // page_size, s % page_size] = k[i]
        expected_v[s // page_size, s % page_size] = v[i]
    for fn in (store_kv_reference, store_kv):
        kc, vc = caches[0].clone(), caches[1].clone()
        assert fn(k, v, kc, vc, slots.to(DEVICE)) is None
        assert torch.equal(kc, expected_k) and torch.equal(vc, expected_v), fn.__name__


def test_store_kv_validation():
    kc = torch.zeros(4, 4, 2, 8, device=DEVICE)
    k = torch.zeros(3, 2, 8, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    for fn in (store_kv, store_kv_reference):
        with pytest.raises(ValueError, match="per slot"):
            fn(k[:, :1], k[:, :1], kc, kc.clone(), slots)
        with pytest.raises(TypeError, match="out_slots"):
            fn(k, k, kc, kc.clone(), slots.float())
        with pytest.raises(TypeError):
            fn(k.half(), k.half(), kc, kc.clone(), slots)
        with pytest.raises(ValueError, match="page_size"):
            big = torch.zeros(1, 65, 2, 8, device=DEVICE)
            fn(k, k, big, big.clone(), slots)


# ---------------------------------------------------------------- rms_norm

def _hf_rms_norm(x, weight, eps):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(x.shape[1], eps=eps).to(x.device)
    with torch.no_grad():
        norm.weight.copy_(weight)
    norm = norm.to(weight.dtype)
    with torch.no_grad():
        return norm(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [33, 96])
def test_rms_norm(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(5, hidden, generator=gen) * 3).to(dtype).to(DEVICE)
    res = torch.randn(5, hidden, generator=gen).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    eps = 1e-6
    # Reference == HF's LlamaRMSNorm exactly (same dtype for x and weight, as in the models).
    ref = rms_norm_reference(x, w, eps)
    assert ref.dtype == dtype
    assert torch.equal(ref, _hf_rms_norm(x, w, eps))
    # ... and close to a float64 oracle.
    xd = x.double()
    oracle = w.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    assert_close(ref, oracle, TOL[dtype], "reference vs float64")
    out = rms_norm(x, w, eps)
    assert_close(out, ref, TOL[torch.float32] if dtype == torch.float32 else 1e-2, "triton")
    # Fused residual: h = x + residual (in dtype), y = norm(h).
    y_ref, h_ref = rms_norm_reference(x, w, eps, residual=res)
    assert torch.equal(h_ref, x + res)
    assert torch.equal(y_ref, _hf_rms_norm(x + res, w, eps))
    y, h = rms_norm(x, w, eps, residual=res)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # Triton 3.9's interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest).
        assert_close(h, h_ref, 1e-2, "triton residual sum")
    else:
        assert torch.equal(h, h_ref)
    assert_close(y, y_ref, TOL[torch.float32] if dtype == torch.float32 else 1e-2, "triton residual")


def test_rms_norm_strided_rows_and_fp32_weight():
    x_big = torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16)
    x = x_big[:, :32]  # rows of stride 64
    w = torch.rand(32, device=DEVICE)
    assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), 1e-2)
    assert rms_norm(x, w, 1e-5).dtype == torch.bfloat16


def test_rms_norm_validation():
    x = torch.randn(2, 8, device=DEVICE)
    for fn in (rms_norm, rms_norm_reference):
        with pytest.raises(ValueError, match="weight"):
            fn(x, torch.ones(7, device=DEVICE), 1e-6)
        with pytest.raises(ValueError, match="residual"):
            fn(x, torch.ones(8, device=DEVICE), 1e-6, residual=x[:1])
        with pytest.raises(TypeError):
            fn(x.long(), torch.ones(8, device=DEVICE), 1e-6)


# ---------------------------------------------------------------- rotary

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
]


def _hf_cos_sin(head_dim, positions, base, scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": "default", "rope_theta": base} if scaling is None else {**scaling, "rope_theta": base}
    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                      max_position_embeddings=4096, rope_parameters=rope)
    emb = LlamaRotaryEmbedding(cfg)
    x = torch.zeros(1, dtype=torch.float32)
    return emb(x, positions[None])


@pytest.mark.parametrize("scaling", SCALINGS, ids=["default", "linear", "llama3"])
def test_rope_cache_matches_transformers(scaling):
    head_dim, base = 32, 10000.0
    positions = torch.arange(0, 300, 7)
    cos_hf, sin_hf = _hf_cos_sin(head_dim, positions, base, scaling)
    cache = rope_cos_sin_cache(head_dim, 300, base, scaling)
    assert cache.shape == (300, head_dim) and cache.dtype == torch.float32
    half = head_dim // 2
    assert torch.equal(cache[positions, :half], cos_hf[0, :, :half])
    assert torch.equal(cache[positions, half:], sin_hf[0, :, :half])


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rotary(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(1)
    t, hq, hkv, d = 9, 6, 2, 16
    cache = rope_cos_sin_cache(d, 128, 500000.0, SCALINGS[2])
    positions = torch.randint(0, 128, (t,), generator=gen)
    q = torch.randn(t, hq, d, generator=gen).to(dtype)
    k = torch.randn(t, hkv, d, generator=gen).to(dtype)
    # HF in fp32, heads first: [1, H, T, D] with cos/sin [1, T, D].
    cos = torch.cat([cache[positions, : d // 2]] * 2, -1)[None]
    sin = torch.cat([cache[positions, d // 2 :]] * 2, -1)[None]
    q_hf, k_hf = apply_rotary_pos_emb(q.float().transpose(0, 1)[None], k.float().transpose(0, 1)[None], cos, sin)
    q_hf, k_hf = q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1)
    q_ref, k_ref = apply_rotary_reference(positions, q, k, cache)
    if dtype == torch.float32:
        assert torch.equal(q_ref, q_hf) and torch.equal(k_ref, k_hf)
    tol = TOL[dtype] if dtype != torch.float32 else 1e-6
    assert_close(q_ref, q_hf, tol, "reference q")
    q_in, k_in = q.to(DEVICE), k.to(DEVICE)
    q_out, k_out = apply_rotary(positions.to(DEVICE), q_in, k_in, cache.to(DEVICE))
    assert torch.equal(q_in, q.to(DEVICE)), "apply_rotary is out-of-place"
    assert q_out.dtype == dtype
    assert_close(q_out, q_ref.to(DEVICE), tol, "triton q")
    assert_close(k_out, k_ref.to(DEVICE), tol, "triton k")


def test_apply_rotary_strided_views_of_fused_qkv():
    t, hq, hkv, d = 5, 4, 2, 8
    qkv = torch.randn(t, hq + 2 * hkv, d, device=DEVICE)
    q, k = qkv[:, :hq], qkv[:, hq : hq + hkv]
    positions = torch.tensor([0, 3, 4, 10, 31], device=DEVICE)
    cache = rope_cos_sin_cache(d, 32, 10000.0).to(DEVICE)
    expected = apply_rotary_reference(positions, q.contiguous(), k.contiguous(), cache)
    for got, exp in zip(apply_rotary(positions, q, k, cache), expected):
        assert_close(got, exp, 1e-6)


def test_rope_validation():
    with pytest.raises(ValueError, match="rope_type"):
        rope_cos_sin_cache(16, 8, 10000.0, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_cos_sin_cache(16, 8, 10000.0, {"rope_type": "llama3", "factor": 2.0})
    with pytest.raises(ValueError, match="even"):
        rope_cos_sin_cache(15, 8, 10000.0)
    q = torch.randn(3, 2, 8, device=DEVICE)
    cache = rope_cos_sin_cache(8, 8, 10000.0).to(DEVICE)
    for fn in (apply_rotary, apply_rotary_reference):
        with pytest.raises(ValueError, match="positions"):
            fn(torch.arange(2, device=DEVICE), q, q, cache)
        with pytest.raises(TypeError, match="positions"):
            fn(torch.arange(3.0, device=DEVICE), q, q, cache)


# ---------------------------------------------------------------- silu_and_mul

@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 2 * 1100, generator=gen) * 4).to(dtype).to(DEVICE)  # I = 1100 > one 1024 block
    ref = silu_and_mul_reference(x)
    xd = x.double()
    oracle = xd[:, :1100] * torch.sigmoid(xd[:, :1100]) * xd[:, 1100:]
    assert ref.shape == (7, 1100) and ref.dtype == dtype
    assert_close(ref, oracle, TOL[dtype] if dtype != torch.float32 else 1e-6, "reference")
    assert_close(silu_and_mul(x), ref, 1e-6 if dtype == torch.float32 else 1e-2, "triton")
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(x[:, :5])


@pytest.mark.parametrize("op", ["rms_norm", "silu_and_mul"])
def test_elementwise_gpu_sizes(op):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.randn(4096, 8192, device="cuda", dtype=torch.bfloat16)
    if op == "rms_norm":
        w = torch.randn(8192, device="cuda", dtype=torch.bfloat16)
        assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), 1e-2)
    else:
        assert_close(silu_and_mul(x), silu_and_mul_reference(x), 1e-2)


for _mark in gpu:
    test_elementwise_gpu_sizes = _mark(test_elementwise_gpu_sizes)


def test_package_imports_without_triton():
    """References must work where Triton is missing; launchers then raise a clear RuntimeError."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, radixserve.kernels as K\n"
        "assert not K.HAS_TRITON\n"
        "x = torch.randn(2, 8)\n"
        "K.REFERENCE_OPS['silu_and_mul'](x)\n"
        "try:\n"
        "    K.TRITON_OPS['silu_and_mul'](x)\n"
        "except RuntimeError as e:\n"
        "    assert 'silu_and_mul_reference' in str(e)\n"
        "else:\n"
        "    raise SystemExit('launcher ran without triton')\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
