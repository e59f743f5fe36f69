"""The Llama-family decoder (Llama 2/3/3.1, SmolLM, Mistral, Qwen2, Qwen3) over a paged KV cache.

One model file covers the family because the architectures differ only in flags of
`ModelConfig`: Qwen2 adds a bias to the q/k/v projections (`qkv_bias`), Qwen3 normalizes each
head of q and k with an RMSNorm before RoPE (`qk_norm`), Mistral is the Llama layout. The
forward pass consumes a flattened `ForwardBatch` (every request's new tokens concatenated on
one token axis) and the shared `KVCache`; per layer:

    x ─ rms_norm ─ qkv_proj ─ split ─ [q_norm/k_norm] ─ rope ─ store_kv(k, v) ─ attention ─ o_proj ─ (+x)
      ─ rms_norm ─ gate_up_proj ─ silu_and_mul ─ down_proj ─ (+)

Attention reads the whole sequence (cached prefix and this step's tokens) from the cache after
the new K/V are stored: `decode_attention` when every request adds one token, else
`extend_attention`. The final norm and the LM head run only on `batch.logits_indices` rows.

Parameter names follow Hugging Face checkpoints except for the fused projections
(`qkv_proj` = q|k|v, `gate_up_proj` = gate|up); `load_weights` maps checkpoint names onto them.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from radixserve.kernels.rotary import rope_cos_sin_cache

from ..forward_batch import ForwardBatch
from ..kv_cache import KVCache
from ..model_config import ModelConfig
from ..ops import Ops
from .layers import (
    MergedColumnParallelLinear,
    ParallelContext,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

__all__ = ["LlamaForCausalLM"]

Device = torch.device | str | None


class RMSNorm(nn.Module):
    """RMSNorm through the op registry; with `residual` it fuses the residual add and returns
    (normed, x + residual)."""

    def __init__(self, size: int, eps: float, ops: Ops, *, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):  # noqa: ANN201
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, ops: Ops, parallel: ParallelContext, *,
                 dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.ops = ops
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads,
                                          bias=config.qkv_bias, dtype=dtype, device=device, parallel=parallel)
        # Heads of this rank (all of them at tp_size=1).
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.qkv_proj.q_size
        self.kv_size = self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size, bias=config.o_bias,
                                        dtype=dtype, device=device, parallel=parallel)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, ops, dtype=dtype, device=device)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, ops, dtype=dtype, device=device)
        else:
            self.q_norm = self.k_norm = None
        self.sm_scale = config.head_dim ** -0.5

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv_cache: KVCache,
                cos_sin_cache: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            # Qwen3: RMSNorm over head_dim of every head, before RoPE.
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(t, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(t, self.num_kv_heads, self.head_dim)
        q, k = self.ops.apply_rotary(batch.positions, q, k, cos_sin_cache)
        k_cache, v_cache = kv_cache.layer(self.layer_id)
        self.ops.store_kv(k, v, k_cache, v_cache, batch.out_slots)
        if batch.cascade is not None:
            c = batch.cascade
            out = self.ops.shared_prefix_decode_attention(
                q, k_cache, v_cache, c.prefix_page_table, c.prefix_lens, c.cu_groups, c.suffix_page_table,
                c.suffix_lens, self.sm_scale, c.max_prefix_len, c.max_suffix_len, c.max_group_size)
        elif batch.is_decode:
            out = self.ops.decode_attention(q, k_cache, v_cache, batch.page_table, batch.seq_lens,
                                            self.sm_scale, batch.max_seq_len)
        else:
            out = self.ops.extend_attention(q, k_cache, v_cache, batch.page_table, batch.seq_lens,
                                            batch.extend_lens, batch.cu_extend, batch.max_extend_len,
                                            self.sm_scale, k_new=k, v_new=v)
        return self.o_proj(out.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops, parallel: ParallelContext, *,
                 dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.ops = ops
        i = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [i, i], bias=False,
                                                       dtype=dtype, device=device, parallel=parallel)
        self.down_proj = RowParallelLinear(i, config.hidden_size, bias=False,
                                           dtype=dtype, device=device, parallel=parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, ops: Ops, parallel: ParallelContext, *,
                 dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, ops, parallel, dtype=dtype, device=device)
        self.mlp = LlamaMLP(config, ops, parallel, dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops,
                                                dtype=dtype, device=device)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch, kv_cache: KVCache,
                cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (h', residual'): the residual add of the previous sub-block is fused
        into this block's first norm, so `residual + h` is the true hidden state."""
        if residual is None:
            residual = h
            x = self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(x, batch, kv_cache, cos_sin_cache)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops, parallel: ParallelContext, *,
                 dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   dtype=dtype, device=device, parallel=parallel)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, ops, parallel, dtype=dtype, device=device) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype=dtype, device=device)

    def forward(self, batch: ForwardBatch, kv_cache: KVCache, cos_sin_cache: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the `batch.logits_indices` rows, normalized: [S, hidden]."""
        h = self.embed_tokens(batch.input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            h, residual = layer(h, residual, batch, kv_cache, cos_sin_cache)
        # The final norm is per row, so select the rows first: prefill computes it (and the LM
        # head) for a handful of rows instead of thousands.
        rows = batch.logits_indices
        h = h.index_select(0, rows)
        if residual is not None:
            residual = residual.index_select(0, rows)
        out = self.norm(h, residual)
        return out[0] if isinstance(out, tuple) else out


class LlamaForCausalLM(nn.Module):
    """`model(batch, kv_cache) -> logits [len(batch.logits_indices), vocab_size] float32`.

    Writes the K/V of the batch's new tokens into `kv_cache` at `batch.out_slots` (every
    layer); reads nothing else it does not own. Parameters are allocated uninitialized: fill
    them through `load_weights` (or the loader's dummy init) before the first forward.
    """

    # Checkpoint projection name -> (fused parameter, shard id).
    _FUSED = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # Checkpoint tensors that carry no weights of ours (old Llama checkpoints saved RoPE tables).
    _IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

    def __init__(self, config: ModelConfig, ops: Ops, *, dtype: torch.dtype = torch.float32,
                 device: Device = None, parallel: ParallelContext = ParallelContext()) -> None:
        super().__init__()
        self.config = config
        self.ops = ops
        self.model = LlamaModel(config, ops, parallel, dtype=dtype, device=device)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype=dtype, device=device,
                                      parallel=parallel)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # fp32 RoPE table [max_position, head_dim] (cos | sin). Not a registered buffer: a
        # `model.to(dtype)` would round it to bf16, and it is derived from the config, never loaded.
        self.cos_sin_cache = rope_cos_sin_cache(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        ).to(device=device if device is not None else "cpu")

    def forward(self, batch: ForwardBatch, kv_cache: KVCache, logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the `batch.logits_indices` rows; written into `logits_out` (fp32, that
        shape) when given, which is returned (CUDA graphs of every batch size share one)."""
        hidden = self.model(batch, kv_cache, self.cos_sin_cache)
        return self.lm_head(hidden, out=logits_out)

    # ------------------------------------------------------------------------- weight loading

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into the parameters; returns the parameter names
        filled. Raises ValueError for a name this model has no parameter for, or a shape that
        does not match. Checking that every parameter was filled is the caller's job (the loader
        does it, naming what is missing)."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        shards_seen: dict[str, set[object]] = {}
        for name, tensor in weights:
            if name.endswith(self._IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints store the shared matrix twice
            target, shard_id = self.map_weight_name(name)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {self.config.architecture}")
            param = params[target]
            weight_loader = getattr(param, "weight_loader", None)
            if weight_loader is not None:
                weight_loader(param, tensor, shard_id)
            else:
                _copy_plain(param, tensor, name)
            if shard_id is None:
                loaded.add(target)
            else:
                shards_seen.setdefault(target, set()).add(shard_id)
        # A fused parameter counts as loaded only once all of its blocks were (q, k and v).
        loaded.update(t for t, seen in shards_seen.items() if seen >= set(params[t].shard_ids))
        if self.config.tie_word_embeddings and "model.embed_tokens.weight" in loaded:
            loaded.add("lm_head.weight")
        return loaded

    @classmethod
    def map_weight_name(cls, name: str) -> tuple[str, object]:
        """HF checkpoint name -> (our parameter name, shard id or None)."""
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in cls._FUSED:
            fused, shard = cls._FUSED[parts[-2]]
            return ".".join([*parts[:-2], fused, parts[-1]]), shard
        return name, None


def _copy_plain(param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(tensor)
