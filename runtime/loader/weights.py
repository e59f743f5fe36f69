"""Build a model for a ResolvedModel and fill its weights.

`load_model` allocates the model directly on the target device and dtype (parameters are
uninitialized, nothing is materialized twice), then fills every parameter with the weight
source registered for `resolved.load_format`:

    "hf"     tensors streamed from the safetensors files (straight to the GPU on CUDA) and
             mapped by `model.load_weights` (q/k/v -> qkv_proj, gate/up -> gate_up_proj)
    "dummy"  random values generated on the device, one tensor at a time: normal(0, 0.02) for
             matrices, ones for norm weights, zeros for biases (seeded, reproducible)

and checks that no parameter was left unfilled. With the "cpu" ops backend every projection
then gets a oneDNN-packed copy of its weight (runtime/models/layers.py, `pack_linear_weights`).
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import struct
import sys
import time
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.layers import pack_linear_weights
from ..models.registry import get_model_class
from ..ops import Ops, select_ops
from .resolve import ModelResolveError, ResolvedModel

logger = logging.getLogger(__name__)

__all__ = ["load_model", "WEIGHT_SOURCES", "DUMMY_STD"]

#: Standard deviation of dummy weights (the usual initializer_range of Llama configs).
DUMMY_STD = 0.02


def _iter_safetensors(resolved: ResolvedModel, device: torch.device, bar: tqdm) -> Iterator[tuple[str, torch.Tensor]]:
    if device.type == "cpu":
        for file in resolved.weight_files:
            yield from _read_safetensors_cpu(file, bar)
        return
    from safetensors import safe_open

    # safetensors places tensors on the GPU directly.
    for file in resolved.weight_files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
                bar.update(1)


_SAFETENSORS_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
})


def _read_safetensors_cpu(file: Path, bar: tqdm) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a safetensors file, each read with one `readinto` into a reused scratch
    buffer. The yielded tensor is valid only until the next one is requested (load_weights
    copies it at once).

    Why not mmap (safe_open): copying out of a mapping page-faults every 4 KiB page from user
    space, which on the VMs here costs several times more than the kernel's own copy of the
    same bytes into a buffer (measured: ~2 s vs ~0.5 s for the 540 MB default model).
    File layout: u64 little-endian header length, JSON header {name: {dtype, shape,
    data_offsets: [begin, end)}}, then the data (offsets relative to the end of the header).
    """
    with open(file, "rb", buffering=0) as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ModelResolveError(f"{file} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", head)
        try:
            header = json.loads(fh.read(header_len))
        except ValueError as e:
            raise ModelResolveError(f"{file} is not a safetensors file (bad header: {e})") from e
        base = 8 + header_len
        entries = [(name, info) for name, info in header.items() if name != "__metadata__"]
        if not entries:
            return
        largest = max(info["data_offsets"][1] - info["data_offsets"][0] for _, info in entries)
        scratch = torch.empty(largest, dtype=torch.uint8)
        _prefault(scratch)
        for name, info in entries:
            begin, end = info["data_offsets"]
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ModelResolveError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
            buf = scratch[: end - begin]
            fh.seek(base + begin)
            if fh.readinto(memoryview(buf.numpy())) != end - begin:
                raise ModelResolveError(f"{file} is truncated (tensor {name!r})")
            yield name, buf.view(_SAFETENSORS_DTYPES[info["dtype"]]).view(info["shape"])
            bar.update(1)


def _prefault(t: torch.Tensor) -> None:
    """Best effort: ask Linux to back a CPU tensor's pages now, in one call
    (madvise(MADV_POPULATE_WRITE)), instead of one page fault per 4 KiB page on first write."""
    if t.device.type != "cpu" or sys.platform != "linux":
        return
    madvise = _libc_madvise()
    if madvise is None:
        return
    page = 4096
    ptr, nbytes = t.data_ptr(), t.untyped_storage().nbytes()
    start, end = -(-ptr // page) * page, (ptr + nbytes) // page * page
    if end > start:
        madvise(start, end - start, _MADV_POPULATE_WRITE)  # errors (old kernels) are ignored


_MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux >= 5.14


@functools.cache
def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _count_safetensors(resolved: ResolvedModel) -> int:
    total = 0
    for file in resolved.weight_files:
        with open(file, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            total += sum(1 for name in json.loads(fh.read(header_len)) if name != "__metadata__")
    return total


def _load_hf(model: nn.Module, resolved: ResolvedModel, device: torch.device, progress: bool, seed: int) -> set[str]:
    files = resolved.weight_files
    if not files:
        raise ModelResolveError(f"{resolved.path} has no weights: no *.safetensors file")
    if device.type == "cpu":
        for param in model.parameters():
            _prefault(param)
    with tqdm(total=_count_safetensors(resolved), desc=f"Loading {resolved.name}", unit="tensor",
              disable=not progress) as bar, torch.no_grad():
        return model.load_weights(_iter_safetensors(resolved, device, bar))


def _init_dummy(model: nn.Module, resolved: ResolvedModel, device: torch.device, progress: bool,
                seed: int) -> set[str]:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    params = list(model.named_parameters())  # shared (tied) parameters appear once
    with torch.no_grad():
        for name, param in tqdm(params, desc=f"Random weights {resolved.name}", unit="tensor", disable=not progress):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, DUMMY_STD, generator=generator)
    return {name for name, _ in model.named_parameters(remove_duplicate=False)}


#: load format -> fills the parameters of a freshly built model, returns the names filled.
WEIGHT_SOURCES: Mapping[str, Callable[[nn.Module, ResolvedModel, torch.device, bool, int], set[str]]] = \
    MappingProxyType({"hf": _load_hf, "dummy": _init_dummy})


def load_model(resolved: ResolvedModel, device: torch.device | str, dtype: torch.dtype, *,
               ops: Ops | str = "auto", progress: bool = True, seed: int = 0) -> nn.Module:
    """The model of `resolved` on `device` in `dtype`, weights filled, in eval mode.

    `ops` is an Ops object or a backend name for `select_ops` ("auto": Triton on CUDA, the
    fast CPU ops on the CPU). `seed` seeds dummy weights. Raises ModelResolveError if the checkpoint lacks a
    parameter, ValueError if it holds a tensor the model does not have or of the wrong shape.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if resolved.load_format not in WEIGHT_SOURCES:
        raise ModelResolveError(
            f"cannot load weights of format {resolved.load_format!r}; known: {', '.join(WEIGHT_SOURCES)}"
        )
    t0 = time.perf_counter()
    ops_obj = ops if isinstance(ops, Ops) else select_ops(device, ops)
    model = get_model_class(resolved.config)(resolved.config, ops_obj, dtype=dtype, device=device)
    loaded = WEIGHT_SOURCES[resolved.load_format](model, resolved, device, progress, seed)
    expected = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ModelResolveError(f"{resolved.path}: the checkpoint lacks weights for {shown}")
    model.eval()
    if ops_obj.name == "cpu":
        pack_linear_weights(model)
    logger.info("loaded %s (%s, %.2fB parameters, %s on %s, ops %s) in %.1f s", resolved.name,
                resolved.load_format, resolved.config.num_parameters() / 1e9, dtype, device, ops_obj.name,
                time.perf_counter() - t0)
    return model
