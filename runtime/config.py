"""Engine configuration: one frozen value, validated once, never mutated.

Everything the engine derives from the loaded model (the KV pool's size when `num_pages` is
None, the context length when `max_model_len` is None) is computed at start-up into the
engine's own fields; the config stays as the user wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from radixserve.radix import EVICTION_POLICIES
from radixserve.runtime.constraints.config import ConstraintLimits

SchedulePolicy = Literal["lpm", "fcfs"]


@dataclass(frozen=True)
class EngineConfig:
    """What to load and how to schedule.

    `max_batch_tokens` is the per-step token budget: decode tokens of running requests first,
    then prefill chunks. None picks it by device (`default_batch_tokens`): 2048 on the CPU; on
    CUDA 16384 with at least 60 GiB of device memory, else 8192 (a prefill chunk's launches
    and weight reads then amortize over more tokens; SGLang's chunked-prefill defaults).
    `kv_cache_bytes` sizes the KV pool when `num_pages` is not given.
    `cuda_graphs` and `overlap` (None: on for CUDA, off on the CPU) switch CUDA graphs for
    decode steps and small prefill steps (runtime/cuda_graphs.py, runtime/prefill_graphs.py)
    and the overlapped engine loop (engine_loop.py).
    `schedule_policy` "lpm" admits waiting requests longest-cached-prefix first (falling back
    to arrival order when more than `lpm_max_waiting` wait, as matching every waiting prompt
    each step would cost more than it saves); "fcfs" is arrival order.
    `constraints` are the limits and options every output constraint is compiled with
    (whitespace cap, optional JSON bounds, parser fuel; see ConstraintLimits).
    `decode_burst` > 1 lets decode batches of at least `decode_burst_min_batch` requests run up
    to that many decode steps per launch where CUDA graphs are on (runtime/scheduler.py): the
    host schedules and folds once per burst, and streams receive that many tokens at a time.
    """

    model: str = "default"
    load_format: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    page_size: int = 1
    num_pages: int | None = None
    kv_cache_bytes: int | None = None
    max_model_len: int | None = None
    max_running: int = 256
    max_waiting: int = 4096
    max_batch_tokens: int | None = None
    enable_prefix_cache: bool = True
    eviction_policy: str = "lru"
    schedule_policy: SchedulePolicy = "lpm"
    lpm_max_waiting: int = 128
    ops: str = "auto"
    cuda_graphs: bool | None = None  # None: on with CUDA and the Triton ops
    overlap: bool | None = None  # None: on with CUDA (schedule step t+1 while step t runs)
    seed: int = 0
    stall_timeout_s: float = 120.0
    decode_burst: int = 8
    decode_burst_min_batch: int = 128
    constraints: ConstraintLimits = field(default_factory=ConstraintLimits)

    def __post_init__(self) -> None:
        if not 1 <= self.page_size <= 64:
            raise ValueError(f"page_size must be in [1, 64], got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages must be positive, got {self.num_pages}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        for name in ("max_running", "max_waiting", "max_batch_tokens", "lpm_max_waiting", "decode_burst",
                     "decode_burst_min_batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ValueError(
                f"eviction_policy must be one of {', '.join(sorted(EVICTION_POLICIES))}, "
                f"got {self.eviction_policy!r}"
            )
        if self.schedule_policy not in ("lpm", "fcfs"):
            raise ValueError(f"schedule_policy must be 'lpm' or 'fcfs', got {self.schedule_policy!r}")
        if not isinstance(self.constraints, ConstraintLimits):
            raise ValueError(f"constraints must be a ConstraintLimits, got {type(self.constraints).__name__}")
        if self.stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be positive")


# The step token budget when `max_batch_tokens` is None (see EngineConfig).
CPU_BATCH_TOKENS = 2048
GPU_BATCH_TOKENS = 8192
LARGE_GPU_BATCH_TOKENS = 16384
LARGE_GPU_BYTES = 60 << 30


def default_batch_tokens(device_type: str, device_memory_bytes: int = 0) -> int:
    """The step token budget of an engine on `device_type` ("cpu", "cuda") with that much
    device memory, for configs that leave `max_batch_tokens` None."""
    if device_type != "cuda":
        return CPU_BATCH_TOKENS
    return LARGE_GPU_BATCH_TOKENS if device_memory_bytes >= LARGE_GPU_BYTES else GPU_BATCH_TOKENS
