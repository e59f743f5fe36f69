"""Fixtures for the constraint tests: the default model's tokenizer (loaded once), a compiler
for it, and a random walker that samples token by token from the grammar's mask, as the
engine does (mask -> pick an allowed token -> consume -> take the forced tokens)."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder of the repository
    sys.path.insert(0, str(ROOT))

VOCAB_SIZE = 49152


@pytest.fixture(scope="session")
def tokenizer():
    from benchmarks.maskbench import default_tokenizer

    return default_tokenizer()


@pytest.fixture(scope="session")
def compiler(tokenizer):
    from radixserve.runtime.constraints import ConstraintCompiler

    return ConstraintCompiler(tokenizer, VOCAB_SIZE)


class Walker:
    """Random walks through a matcher's mask with the real tokenizer.

    Each step picks uniformly among allowed tokens, except: EOS (when allowed) with
    probability `p_stop`, and after `budget` steps a "closing" token is preferred: EOS if
    allowed, else the first of `closers` (exact token texts, whitespace aside) that is
    allowed, else the shortest allowed token. This keeps unbounded strings and repetitions
    finite so every walk ends and can be checked."""

    def __init__(self, compiler) -> None:
        from radixserve.runtime.constraints import allocate_bitmask

        self.compiler = compiler
        self.lltok = compiler.lltokenizer
        self.eos = compiler.eos_token_ids[0]
        self.bitmask = allocate_bitmask(1, VOCAB_SIZE)
        self._strings = [self.lltok.decode_str([i]) for i in range(VOCAB_SIZE)]
        self._lengths = torch.tensor([len(s) or 99 for s in self._strings])
        self._closers: dict[str, torch.Tensor] = {}

    def closing(self, closer: str) -> torch.Tensor:
        if closer not in self._closers:
            self._closers[closer] = torch.tensor([s.strip(" \t\r\n") == closer for s in self._strings])
        return self._closers[closer]

    def mask(self, matcher) -> torch.Tensor:
        from radixserve.runtime.constraints import unpack_bitmask

        matcher.fill_bitmask(self.bitmask, 0)
        return unpack_bitmask(self.bitmask, VOCAB_SIZE)[0].clone()

    def allowed(self, matcher) -> list[int]:
        return self.mask(matcher).nonzero().flatten().tolist()

    def text(self, ids: list[int]) -> str:
        return self.lltok.decode_bytes(ids).decode("utf-8")

    def walk(
        self,
        matcher,
        rng: random.Random,
        *,
        budget: int = 40,
        max_steps: int = 400,
        p_stop: float = 0.3,
        closers: Sequence[str] = ('"', "}", "]", "@", ".", "com", "null", "0"),
        check: Callable[[list[int], object], None] | None = None,
    ) -> tuple[list[int], int]:
        """Returns (token ids, number of forced tokens). Asserts EOS is in the mask exactly
        when the matcher accepts, and that every picked or forced token is consumed."""
        ids: list[int] = []
        forced_count = 0
        for step in range(max_steps):
            if matcher.is_finished():
                assert not matcher.is_error(), matcher.error()
                return ids, forced_count
            mask = self.mask(matcher)
            assert bool(mask.any()), "empty mask"
            eos_ok = bool(mask[self.eos])
            assert eos_ok == matcher.accepts_eos(), (eos_ok, matcher.accepts_eos(), self.text(ids))
            if eos_ok and (rng.random() < p_stop or step >= budget):
                return ids, forced_count
            mask[self.eos] = False
            if step >= budget:
                for closer in closers:
                    closing = mask & self.closing(closer)
                    if bool(closing.any()):
                        mask = closing
                        break
                else:
                    lengths = torch.where(mask, self._lengths, torch.full_like(self._lengths, 1 << 30))
                    mask = lengths == lengths.min()
            candidates = mask.nonzero().flatten()
            token = int(candidates[rng.randrange(len(candidates))])
            assert matcher.consume(token), matcher.error()
            ids.append(token)
            forced = matcher.forced_tokens()
            if forced:
                assert matcher.consume_tokens(forced), matcher.error()
                ids.extend(forced)
                forced_count += len(forced)
            if check is not None:
                check(ids, matcher)
        raise AssertionError(f"walk did not finish in {max_steps} steps: {self.text(ids)!r}")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The walks run many small tensor ops; on a shared 2-core machine torch's thread pool
    makes each one ~50x slower. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def walker(compiler) -> Walker:
    return Walker(compiler)
