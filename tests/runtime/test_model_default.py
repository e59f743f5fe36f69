"""Our Llama over the paged KV cache against transformers, on the default model's real weights.

The reference is transformers' own LlamaForCausalLM loaded from the same GGUF file
(`from_pretrained(dir, gguf_file=...)`: its dequantization and q/k un-permutation, not ours),
run in fp32 over each whole prompt. Ours runs from the converted cache folder through the
PyTorch reference ops, in every way the scheduler drives it: one full prefill, a prefill in two
chunks over the paged cache, token-by-token decode of two sequences at once, and a batch that
mixes two prefills with a decode row; page sizes 1 and 16; pages deliberately scattered.

Tolerance: max |ours - reference| <= 5e-4 on logits, and equal argmax at every position. Both
sides compute in fp32 from identical weights; they differ only in summation order (fused
q|k|v and gate|up matmuls, paged SDPA per request, row-selected final norm), which moves
logits of magnitude ~30 by about 1e-5 (measured: 3e-5 max). 5e-4 leaves room for other BLAS
builds while still catching any real error (a wrong position, page or mask shifts logits by
far more than 1e-2).
"""

from __future__ import annotations

import random

import pytest
import torch

from radixserve.runtime.forward_batch import SeqStep, build_forward_batch
from radixserve.runtime.kv_cache import KVCache
from radixserve.runtime.loader import default_gguf_path, load_model, resolve_model
from radixserve.runtime.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

ATOL = 5e-4

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old "
    "clockmaker who had never once left the valley. Every morning he",
]


@pytest.fixture(scope="module")
def resolved():
    return resolve_model("default")


@pytest.fixture(scope="module")
def model(resolved):
    return load_model(resolved, "cpu", torch.float32, ops="torch", progress=False)


@pytest.fixture(scope="module")
def prompts(resolved) -> list[list[int]]:
    tok = load_tokenizer(resolved)
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three primary colors."}],
                                   tokenize=False, add_generation_prompt=True)
    return [tok(p)["input_ids"] for p in [*PROMPTS, chat]]


@pytest.fixture(scope="module")
def reference(prompts) -> list[torch.Tensor]:
    """transformers' logits [len(prompt), vocab] for every prompt (loaded once: ~15 s)."""
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        return [hf(torch.tensor([ids])).logits[0].float() for ids in prompts]


class Pages:
    """Hands out scattered page ids so page-table mistakes cannot hide behind identity layouts."""

    def __init__(self, num_pages: int, seed: int = 0) -> None:
        self.free = list(range(1, num_pages))
        random.Random(seed).shuffle(self.free)

    def take(self, n: int) -> list[int]:
        out, self.free = self.free[:n], self.free[n:]
        return out


def new_cache(resolved, page_size: int, tokens: int = 4096) -> KVCache:
    return KVCache.for_model(resolved.config, tokens // page_size + 2, page_size, torch.float32, "cpu")


def run(model, kv: KVCache, steps: list[SeqStep], page_size: int) -> torch.Tensor:
    with torch.no_grad():
        return model(build_forward_batch(steps, page_size, "cpu"), kv)


def check(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"max |logit diff| {diff:.2e} > {ATOL:.0e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("page_size", [1, 16])
def test_full_prefill(model, resolved, prompts, reference, page_size):
    kv, pages = new_cache(resolved, page_size), Pages(4096 // page_size)
    for ids, ref in zip(prompts, reference):
        step = SeqStep(ids, 0, pages.take(-(-len(ids) // page_size)), logits_from=0)
        check(run(model, kv, [step], page_size), ref)


def test_last_token_logits_only(model, resolved, prompts, reference):
    """Default logits_from: one row per request, the last token's, for a batch of prefills."""
    kv, pages = new_cache(resolved, 16), Pages(4096 // 16)
    steps = [SeqStep(ids, 0, pages.take(-(-len(ids) // 16))) for ids in prompts]
    out = run(model, kv, steps, 16)
    check(out, torch.stack([ref[-1] for ref in reference]))


@pytest.mark.parametrize("page_size", [1, 16])
def test_prefill_in_two_chunks(model, resolved, prompts, reference, page_size):
    kv, pages = new_cache(resolved, page_size), Pages(4096 // page_size, seed=page_size)
    for ids, ref in zip(prompts, reference):
        seq_pages = pages.take(-(-len(ids) // page_size))
        cut = len(ids) // 2 + 1  # not on a page boundary for page_size 16: the tail page is shared
        first = run(model, kv, [SeqStep(ids[:cut], 0, seq_pages, logits_from=0)], page_size)
        second = run(model, kv, [SeqStep(ids[cut:], cut, seq_pages, logits_from=0)], page_size)
        check(torch.cat([first, second]), ref)


@pytest.mark.parametrize("page_size", [1, 16])
def test_token_by_token_decode(model, resolved, prompts, reference, page_size):
    """Two sequences of different lengths prefill all but their last DECODE tokens, then
    decode side by side (decode batches of 2), one token per step."""
    decode = 8
    kv, pages = new_cache(resolved, page_size), Pages(4096 // page_size, seed=3)
    seqs = [prompts[1], prompts[2]]
    seq_pages = [pages.take(-(-len(ids) // page_size)) for ids in seqs]
    got = [[run(model, kv, [SeqStep(ids[:-decode], 0, p, logits_from=0)], page_size)]
           for ids, p in zip(seqs, seq_pages)]
    for k in range(decode, 0, -1):
        steps = [SeqStep([ids[-k]], len(ids) - k, p) for ids, p in zip(seqs, seq_pages)]
        assert build_forward_batch(steps, page_size, "cpu").is_decode
        out = run(model, kv, steps, page_size)
        for i in range(len(seqs)):
            got[i].append(out[i : i + 1])
    check(torch.cat(got[0]), reference[1])
    check(torch.cat(got[1]), reference[2])


@pytest.mark.parametrize("page_size", [1, 16])
def test_mixed_batch(model, resolved, prompts, reference, page_size):
    """One step holding a fresh prefill, a prefill over a cached prefix, and a decode row."""
    kv, pages = new_cache(resolved, page_size), Pages(4096 // page_size, seed=7)
    fresh, cont, dec = prompts[1], prompts[2], prompts[3]
    p_fresh = pages.take(-(-len(fresh) // page_size))
    p_cont = pages.take(-(-len(cont) // page_size))
    p_dec = pages.take(-(-len(dec) // page_size))
    cut = 9
    head_cont = run(model, kv, [SeqStep(cont[:cut], 0, p_cont, logits_from=0)], page_size)
    n = len(dec) - 1
    head_dec = run(model, kv, [SeqStep(dec[:n], 0, p_dec, logits_from=0)], page_size)
    steps = [
        SeqStep(fresh, 0, p_fresh, logits_from=0),
        SeqStep(cont[cut:], cut, p_cont, logits_from=0),
        SeqStep(dec[n:], n, p_dec),
    ]
    batch = build_forward_batch(steps, page_size, "cpu")
    assert not batch.is_decode and batch.extend_lens_cpu[-1] == 1
    out = run(model, kv, steps, page_size)
    nf, nc = len(fresh), len(cont) - cut
    check(out[:nf], reference[1])
    check(torch.cat([head_cont, out[nf:nf + nc]]), reference[2])
    check(torch.cat([head_dec, out[nf + nc:]]), reference[3])


def test_resolved_default_config(resolved):
    c = resolved.config
    assert resolved.name == "default" and resolved.load_format == "hf"
    assert (c.architecture, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == \
        ("LlamaForCausalLM", 576, 30, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (1536, 49152, True)
    assert c.rope_theta == 100000.0 and c.rope_scaling is None
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_ops_on_gpu_match_reference(resolved, prompts, reference):
    """The CUDA path (Triton ops) in fp32 and bf16 against transformers' CPU logits."""
    for dtype, atol in ((torch.float32, 2e-2), (torch.bfloat16, 1.0)):
        model = load_model(resolved, "cuda", dtype, ops="triton", progress=False)
        kv = KVCache.for_model(resolved.config, 300, 16, dtype, "cuda")
        pages = Pages(300)
        for ids, ref in zip(prompts, reference):
            seq_pages = pages.take(-(-len(ids) // 16))
            cut = len(ids) - 3
            with torch.no_grad():
                head = model(build_forward_batch([SeqStep(ids[:cut], 0, seq_pages, logits_from=0)], 16, "cuda"), kv)
                rows = [head]
                for t in range(cut, len(ids)):
                    rows.append(model(build_forward_batch([SeqStep([ids[t]], t, seq_pages)], 16, "cuda"), kv))
            out = torch.cat(rows).cpu()
            diff = (out - ref).abs().max().item()
            assert diff <= atol, f"{dtype}: max |logit diff| {diff:.3f}"
            if dtype == torch.float32:
                assert torch.equal(out.argmax(-1), ref.argmax(-1))
