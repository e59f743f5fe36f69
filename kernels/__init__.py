"""radixserve.kernels: the model's compute ops, each as a Triton kernel and a PyTorch reference.

Every op `<name>` (Triton launcher, CUDA tensors or the Triton interpreter) has a twin
`<name>_reference` with the same signature (PyTorch, any device; the CPU serving path and the
test oracle). `TRITON_OPS` and `REFERENCE_OPS` map op names to the two implementations for the
runtime's registry; `CPU_OPS` holds the faster CPU versions of some of them (kernels/cpu_ops.py),
which the runtime's "cpu" backend lays over the references. Importing this package does not need Triton: without it, `HAS_TRITON` is
False, the launchers raise RuntimeError, and the references work.

Ops:
    store_kv(k, v, k_cache, v_cache, out_slots) -> None
    extend_attention(q, k_cache, v_cache, page_table, seq_lens, extend_lens, cu_extend,
                     max_extend_len, sm_scale) -> o
    decode_attention(q, k_cache, v_cache, page_table, seq_lens, sm_scale, max_seq_len) -> o
    shared_prefix_decode_attention(q, k_cache, v_cache, prefix_page_table, prefix_lens, cu_groups,
                                   suffix_page_table, suffix_lens, sm_scale, max_prefix_len,
                                   max_suffix_len, max_group_size) -> o
    merge_attention_states(o1, lse1, o2, lse2) -> (o, lse)
    rms_norm(x, weight, eps, residual=None) -> y | (y, x + residual)
    apply_rotary(positions, q, k, cos_sin_cache) -> (q_out, k_out)
    silu_and_mul(x) -> y
and the helper rope_cos_sin_cache(head_dim, max_position, base, scaling=None, dtype) (plain
PyTorch, computed once at model load).

Note: the attributes `decode_attention` and `extend_attention` of this package are the ops,
which shadow the submodules of the same names; reach a module (for its tuning entry points,
e.g. `extend_attention_impl`) with importlib.import_module("radixserve.kernels.extend_attention").
"""

from __future__ import annotations

from typing import Callable

from ._common import HAS_TRITON
from .activation import silu_and_mul, silu_and_mul_reference
from .cpu_ops import CPU_OPS
from .decode_attention import decode_attention, decode_attention_reference
from .extend_attention import extend_attention, extend_attention_reference
from .kv_store import store_kv, store_kv_reference
from .rmsnorm import rms_norm, rms_norm_reference
from .rotary import apply_rotary, apply_rotary_reference, rope_cos_sin_cache
from .shared_prefix_attention import (
    merge_attention_states,
    merge_attention_states_reference,
    shared_prefix_decode_attention,
    shared_prefix_decode_attention_reference,
)

TRITON_OPS: dict[str, Callable] = {
    "store_kv": store_kv,
    "extend_attention": extend_attention,
    "decode_attention": decode_attention,
    "shared_prefix_decode_attention": shared_prefix_decode_attention,
    "merge_attention_states": merge_attention_states,
    "rms_norm": rms_norm,
    "apply_rotary": apply_rotary,
    "silu_and_mul": silu_and_mul,
}

REFERENCE_OPS: dict[str, Callable] = {
    "store_kv": store_kv_reference,
    "extend_attention": extend_attention_reference,
    "decode_attention": decode_attention_reference,
    "shared_prefix_decode_attention": shared_prefix_decode_attention_reference,
    "merge_attention_states": merge_attention_states_reference,
    "rms_norm": rms_norm_reference,
    "apply_rotary": apply_rotary_reference,
    "silu_and_mul": silu_and_mul_reference,
}

__all__ = [
    "HAS_TRITON",
    "TRITON_OPS",
    "REFERENCE_OPS",
    "CPU_OPS",
    "rope_cos_sin_cache",
    *TRITON_OPS,
    *(f"{name}_reference" for name in TRITON_OPS),
]
