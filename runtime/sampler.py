"""Batched token sampling for one engine step: penalties, grammar mask, filters, seeded draws.

The engine builds one `SamplingBatch` per step on the host from the rows' `SamplingParams`
(and, only when some row uses penalties, their token histories), and `Sampler.sample` turns the
step's logits `[S, V]` into one token per row without reading anything back from the device.
The pipeline, per row, in this order:

    logits -> grammar mask (-inf) -> penalties -> [logprobs are taken here]
           -> greedy rows: argmax
           -> other rows: / temperature -> top-k -> top-p -> softmax -> min-p -> exponential race

Log-probabilities are reported from the distribution *before* temperature and the top-k /
top-p / min-p filters (but after the grammar mask and the penalties): they describe what the
model thinks of each token, independent of how adventurously we sample from it, which is what
OpenAI's API returns and what scoring (`select`, prompt logprobs) needs to be comparable across
requests with different sampling settings.

Sampling uses the exponential race: with E_i ~ Exp(1) independent, argmax_i p_i / E_i is
distributed as Categorical(p). It needs no cumulative sums or per-row `multinomial` calls, so
the whole batch is one argmax, and each seeded row fills its own noise row from its own
`torch.Generator`, which makes its tokens independent of batch size and position. Each step
costs every non-greedy row V exponential draws, so a seeded request's generator advances the
same way whatever else is in the batch.

No function on the sampling path reads device values on the host (no `.item()`, `.tolist()`,
boolean-mask indexing or `nonzero`): the only device-to-host transfer is
`SampleOutput.to_host`, once per step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Sequence

import numpy as np
import torch

from radixserve.runtime.outputs import TokenLogprob
from radixserve.runtime.sampling_params import SamplingParams

__all__ = [
    "PenaltyState",
    "SamplingBatch",
    "SampleOutput",
    "HostSampleOutput",
    "Sampler",
    "make_generator",
    "prompt_logprobs",
]

# Padding value of the token-history tensors; replaced on the device by V, an extra scatter
# column that is dropped afterwards, so padded slots count nothing.
_PAD = -1
# Exponential noise is clamped away from 0: a filtered token has p = 0 and 0 / 0 = NaN would
# win the argmax. The smallest normal float32 keeps p / E finite for every p <= 1.
_TINY = torch.finfo(torch.float32).tiny
# Rows of log_softmax computed at once by `prompt_logprobs` (bounds its temporary memory).
_PROMPT_LOGPROB_CHUNK = 512
_UINT64_MASK = (1 << 64) - 1


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for one seeded request, on the device its logits live on.

    Create it once per request (per continuation when n > 1: give each a distinct seed) and
    pass the same object to every step's `SamplingBatch.build`: its state carries the
    request's random stream from step to step.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) & _UINT64_MASK)
    return generator


@dataclass(frozen=True)
class PenaltyState:
    """Token histories of the rows that use penalties, as padded id tensors.

    `rows[j]` is the batch row of history j. `output_ids[j]` holds that row's generated tokens
    (for frequency/presence penalties), `seen_ids[j]` its prompt and generated tokens (for the
    repetition penalty); both are padded with -1. `seen_ids` is None when no row uses a
    repetition penalty, and the frequency/presence tensors are all zero when none uses those.
    """

    rows: torch.Tensor  # [R] int64
    output_ids: torch.Tensor  # [R, Lo] int64, padded with -1
    seen_ids: torch.Tensor | None  # [R, Lp + Lo] int64, padded with -1
    repetition: torch.Tensor  # [R] float32
    frequency: torch.Tensor  # [R] float32
    presence: torch.Tensor  # [R] float32
    use_repetition: bool
    use_frequency_presence: bool

    def to(self, device: torch.device | str) -> PenaltyState:
        return _move_tensors(self, device)


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling settings of one step, in tensors (row i = logits row i).

    Built on the host by `build`; `Sampler.sample` moves it to the logits' device if needed.
    Host flags (`all_greedy`, `use_top_k`, ...) let the sampler skip whole stages without
    looking at tensor values. Invariants: every tensor has `num_rows` rows; greedy rows have
    temperature 1.0 (never divided by zero) and no generator; `top_k <= 0` means no top-k;
    `generators[i]` is not None exactly for seeded non-greedy rows; `num_logprobs[i]` is the
    row's requested number of top alternatives (None: no logprobs), `max_logprobs` their max
    (None when no row asked).
    """

    num_rows: int
    temperature: torch.Tensor  # [S] float32
    greedy: torch.Tensor  # [S] bool
    top_k: torch.Tensor  # [S] int64, <= 0 disables
    top_p: torch.Tensor  # [S] float32
    min_p: torch.Tensor  # [S] float32
    all_greedy: bool
    any_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    max_top_k: int
    generators: tuple[torch.Generator | None, ...]
    penalties: PenaltyState | None
    num_logprobs: tuple[int | None, ...]
    max_logprobs: int | None

    @property
    def device(self) -> torch.device:
        return self.temperature.device

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        output_token_ids: Sequence[Sequence[int]] | None = None,
        *,
        device: torch.device | str | None = None,
        vocab_size: int | None = None,
    ) -> SamplingBatch:
        """Build the batch for the rows `params` (one entry per logits row) on the host, and
        move it to `device` if given (asynchronously; `Sampler.sample` would do it otherwise).

        `generators[i]` must be the request's own generator (see `make_generator`) for every
        seeded row that is not greedy; it is ignored for other rows. `prompt_token_ids` /
        `output_token_ids` are the rows' histories; they are read only for rows that use
        penalties (None is fine when no row does). `vocab_size`, if given, is the logits'
        width, checked against top-k here rather than on the device: larger k means no top-k.
        """
        num_rows = len(params)
        if generators is not None and len(generators) != num_rows:
            raise ValueError(f"generators: expected {num_rows} entries, got {len(generators)}")
        if vocab_size is not None and vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")

        row_generators: list[torch.Generator | None] = []
        for i, p in enumerate(params):
            if p.seed is None or p.greedy:
                row_generators.append(None)
                continue
            generator = generators[i] if generators is not None else None
            if generator is None:
                raise ValueError(
                    f"row {i} has seed={p.seed} but no generator: create one per request with "
                    "make_generator(seed, device) and pass it every step"
                )
            row_generators.append(generator)

        # k >= V keeps every token: treat it as disabled so the top-k stage can be skipped.
        top_k_values = [
            0 if vocab_size is not None and p.top_k >= vocab_size else p.top_k for p in params
        ]
        use_top_k = any(k > 0 for k in top_k_values)
        logprob_counts = tuple(p.logprobs for p in params)
        requested = [k for k in logprob_counts if k is not None]
        greedy_flags = [p.greedy for p in params]

        batch = cls(
            num_rows=num_rows,
            temperature=torch.tensor(
                [1.0 if p.greedy else p.temperature for p in params], dtype=torch.float32
            ),
            greedy=torch.tensor(greedy_flags, dtype=torch.bool),
            top_k=torch.tensor(top_k_values, dtype=torch.int64),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32),
            # Filters only matter for rows that actually sample.
            all_greedy=num_rows > 0 and all(greedy_flags),
            any_greedy=any(greedy_flags),
            use_top_k=any(k > 0 and not p.greedy for k, p in zip(top_k_values, params)),
            use_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
            use_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
            max_top_k=max(top_k_values) if use_top_k else 0,
            generators=tuple(row_generators),
            penalties=_build_penalties(params, output_token_ids, prompt_token_ids),
            num_logprobs=logprob_counts,
            max_logprobs=max(requested) if requested else None,
        )
        return batch if device is None else batch.to(device)

    def to(self, device: torch.device | str) -> SamplingBatch:
        """The same batch with its tensors on `device` (asynchronous host-to-device copies)."""
        moved = _move_tensors(self, device)
        if self.penalties is not None:
            moved = replace(moved, penalties=self.penalties.to(device))
        return moved


class HostSampleOutput(NamedTuple):
    """One step's sampled tokens on the host. `logprobs` is None when no row asked for them;
    otherwise `logprobs[i]` is None for the rows that did not."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None] | None


@dataclass(frozen=True)
class SampleOutput:
    """Device-side result of `Sampler.sample`; valid until the next step.

    `token_ids[i]` is row i's token. When some row asked for logprobs: `logprobs[i]` is the
    chosen token's log-probability and `top_ids[i]` / `top_logprobs[i]` the K best tokens
    (K = the largest number requested in the batch, best first), all under the distribution
    after mask and penalties, before temperature and filters.
    """

    token_ids: torch.Tensor  # [S] int64
    logprobs: torch.Tensor | None = None  # [S] float32
    top_ids: torch.Tensor | None = None  # [S, K] int64
    top_logprobs: torch.Tensor | None = None  # [S, K] float32
    num_logprobs: tuple[int | None, ...] = ()

    def to_host(self) -> HostSampleOutput:
        """Copy to Python values with a single device-to-host transfer.

        Alternatives whose log-probability is -inf (excluded by the grammar mask) are dropped
        from `top`, so it may hold fewer entries than asked for.
        """
        if self.logprobs is None:
            return HostSampleOutput(self.token_ids.tolist(), None)
        # Pack everything into one float64 tensor: ids below 2**53 are exact in float64 and
        # float32 logprobs widen exactly, so one copy brings back the whole step.
        columns = [self.token_ids.double()[:, None], self.logprobs.double()[:, None]]
        if self.top_ids is not None and self.top_logprobs is not None:
            columns += [self.top_ids.double(), self.top_logprobs.double()]
        packed = torch.cat(columns, dim=1).cpu().tolist()
        k = 0 if self.top_ids is None else self.top_ids.shape[1]
        token_ids: list[int] = []
        logprobs: list[TokenLogprob | None] = []
        for row, wanted in zip(packed, self.num_logprobs):
            token_id = int(row[0])
            token_ids.append(token_id)
            if wanted is None:
                logprobs.append(None)
                continue
            logprobs.append(TokenLogprob(token_id, row[1], _top_pairs(row, 2, k, wanted)))
        return HostSampleOutput(token_ids, logprobs)


class Sampler:
    """Draws one token per row from a step's logits. Holds only the shared random generator
    of unseeded rows (one per device, created on first use)."""

    def __init__(self, device: torch.device | str | None = None, seed: int | None = None) -> None:
        """`seed` seeds the shared generator of unseeded rows (None: nondeterministic);
        `device`, if given, creates that device's generator now rather than on first use."""
        self._seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}
        if device is not None:
            self._shared_generator(torch.device(device))

    def sample(
        self,
        logits: torch.Tensor,
        batch: SamplingBatch,
        allowed_mask: torch.Tensor | None = None,
    ) -> SampleOutput:
        """Sample one token per row of `logits` [S, V].

        `allowed_mask` (bool [S, V], True = allowed) comes from grammar constraints; rows
        without a constraint are all True, and every row must allow at least one token.
        `logits` is not modified. Makes no device synchronization.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [S, V], got shape {tuple(logits.shape)}")
        num_rows, vocab = logits.shape
        if num_rows != batch.num_rows:
            raise ValueError(f"logits have {num_rows} rows but the batch has {batch.num_rows}")
        device = logits.device
        if batch.device != device:
            batch = batch.to(device)
        for i, generator in enumerate(batch.generators):
            if generator is not None and generator.device.type != device.type:
                raise ValueError(
                    f"row {i}: generator is on {generator.device}, logits on {device}"
                )
        logits = logits.float()

        if allowed_mask is not None:
            if allowed_mask.shape != logits.shape or allowed_mask.dtype != torch.bool:
                raise ValueError(
                    f"allowed_mask must be bool {tuple(logits.shape)}, got "
                    f"{allowed_mask.dtype} {tuple(allowed_mask.shape)}"
                )
            logits = logits.masked_fill(~allowed_mask, float("-inf"))
        if batch.penalties is not None:
            logits = _apply_penalties(logits, batch.penalties)

        logprobs = top_ids = top_logprobs = None
        all_logprobs = None
        if batch.max_logprobs is not None:
            all_logprobs = torch.log_softmax(logits, dim=-1)
            k = min(batch.max_logprobs, vocab)
            if k > 0:
                top_logprobs, top_ids = torch.topk(all_logprobs, k, dim=-1)

        if num_rows == 0:
            token_ids = torch.empty(0, dtype=torch.int64, device=device)
        elif batch.all_greedy:
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = self._draw(logits, batch)
            if batch.any_greedy:
                token_ids = torch.where(batch.greedy, logits.argmax(dim=-1), token_ids)

        if all_logprobs is not None:
            logprobs = all_logprobs.gather(1, token_ids[:, None]).squeeze(1)
        return SampleOutput(token_ids, logprobs, top_ids, top_logprobs, batch.num_logprobs)

    def _draw(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Temperature, filters and the exponential race for every row (greedy rows get
        temperature 1 here; their result is replaced by the caller)."""
        scaled = logits / batch.temperature[:, None]
        scaled = _apply_top_k_top_p(scaled, batch)
        probs = torch.softmax(scaled, dim=-1)
        if batch.use_min_p:
            # min-p is relative to the most likely token, so it is unaffected by the
            # renormalization after top-k/top-p (the top token always survives those).
            threshold = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = self._exponential(probs.shape, batch.generators, probs.device)
        return probs.div_(noise).argmax(dim=-1)

    def _exponential(
        self,
        shape: torch.Size,
        generators: tuple[torch.Generator | None, ...],
        device: torch.device,
    ) -> torch.Tensor:
        noise = torch.empty(shape, dtype=torch.float32, device=device)
        if any(g is None for g in generators):
            noise.exponential_(generator=self._shared_generator(device))
        # Seeded rows overwrite their row from their own stream: row i's draws depend only on
        # its generator, not on where it sits in the batch or what else is there.
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        return noise.clamp_min_(_TINY)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._shared.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed & _UINT64_MASK)
            self._shared[device] = generator
        return generator


def prompt_logprobs(
    logits: torch.Tensor, target_ids: torch.Tensor, top: int
) -> list[TokenLogprob]:
    """Log-probabilities of given tokens under raw logits, with the `top` best alternatives.

    Row n of `logits` [N, V] is the model's output at some position p, and `target_ids[n]` the
    token that actually follows p (the prompt token at p + 1). No sampling parameter applies:
    this is the model's own distribution. Reads back once (a sync: call it where the step
    reads its tokens back anyway). Temporary memory is bounded by computing in row chunks.
    """
    if logits.dim() != 2 or target_ids.shape != (logits.shape[0],):
        raise ValueError(
            f"expected logits [N, V] and target_ids [N], got {tuple(logits.shape)} and "
            f"{tuple(target_ids.shape)}"
        )
    if top < 0:
        raise ValueError(f"top must be non-negative, got {top}")
    num_rows, vocab = logits.shape
    k = min(top, vocab)
    target_ids = target_ids.to(device=logits.device, dtype=torch.int64)
    chunks = []
    for start in range(0, num_rows, _PROMPT_LOGPROB_CHUNK):
        rows = logits[start : start + _PROMPT_LOGPROB_CHUNK].float().log_softmax(dim=-1)
        targets = target_ids[start : start + _PROMPT_LOGPROB_CHUNK, None]
        columns = [targets.double(), rows.gather(1, targets).double()]
        if k > 0:
            values, ids = torch.topk(rows, k, dim=-1)
            columns += [ids.double(), values.double()]
        chunks.append(torch.cat(columns, dim=1))
    if not chunks:
        return []
    packed = torch.cat(chunks).cpu().tolist()
    return [TokenLogprob(int(row[0]), row[1], _top_pairs(row, 2, k, k)) for row in packed]


def _top_pairs(row: list[float], start: int, k: int, wanted: int) -> tuple[tuple[int, float], ...]:
    """The first `wanted` (id, logprob) pairs of a packed row laid out as
    [... ids (k) ... logprobs (k) ...] from `start`, skipping -inf alternatives."""
    ids = row[start : start + k]
    values = row[start + k : start + 2 * k]
    return tuple(
        (int(i), v) for i, v in zip(ids[:wanted], values[:wanted]) if v != float("-inf")
    )


def _apply_penalties(logits: torch.Tensor, state: PenaltyState) -> torch.Tensor:
    """Repetition penalty (HF: over prompt + output, divide positive logits, multiply negative
    ones), then frequency/presence penalties (OpenAI: over output tokens only,
    logit -= frequency * count + presence * (count > 0)). Only the penalized rows are touched;
    returns a new tensor."""
    vocab = logits.shape[1]
    rows = logits.index_select(0, state.rows)
    if state.use_repetition and state.seen_ids is not None:
        seen = _token_counts(state.seen_ids, vocab) > 0
        penalty = state.repetition[:, None]
        penalized = torch.where(rows > 0, rows / penalty, rows * penalty)
        rows = torch.where(seen, penalized, rows)
    if state.use_frequency_presence:
        counts = _token_counts(state.output_ids, vocab)
        rows = (
            rows
            - state.frequency[:, None] * counts
            - state.presence[:, None] * (counts > 0).float()
        )
    return logits.index_copy(0, state.rows, rows)


def _token_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Occurrence counts [R, V] float32 of padded id rows [R, L]. Padding (-1) and ids outside
    the logits' vocabulary go to an extra column that is dropped, so they count nowhere."""
    index = torch.where((ids < 0) | (ids >= vocab), vocab, ids)
    counts = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab]


def _apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p nucleus to -inf (ties at the k-th value are
    kept). Rows with top_k <= 0 and top_p == 1 are unchanged."""
    if not (batch.use_top_k or batch.use_top_p):
        return logits
    vocab = logits.shape[1]
    # Disabled or oversize k becomes V, which keeps everything.
    k = torch.where((batch.top_k <= 0) | (batch.top_k > vocab), vocab, batch.top_k)
    if not batch.use_top_p:
        # Only top-k: a partial top-k of the largest k is cheaper than a full sort.
        k_max = min(batch.max_top_k, vocab)
        top_values = torch.topk(logits, k_max, dim=-1).values  # descending
        kth = top_values.gather(1, (k.clamp(max=k_max) - 1)[:, None])
        kth = torch.where((k >= vocab)[:, None], float("-inf"), kth)
        return logits.masked_fill(logits < kth, float("-inf"))

    # Ascending sort: row r's k-th largest value sits at column V - k.
    #   sorted:  [ smallest ........ | V-k ... largest ]
    #   cumsum of probs from the left; drop while the dropped mass stays <= 1 - top_p,
    #   so the kept (right) part is the smallest set with mass >= top_p.
    sorted_logits, order = torch.sort(logits, dim=-1)
    if batch.use_top_k:
        kth = sorted_logits.gather(1, (vocab - k)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1.0 - batch.top_p)[:, None]
    drop[:, -1] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _build_penalties(
    params: Sequence[SamplingParams],
    output_token_ids: Sequence[Sequence[int]] | None,
    prompt_token_ids: Sequence[Sequence[int]] | None,
) -> PenaltyState | None:
    rows = [i for i, p in enumerate(params) if p.uses_penalties]
    if not rows:
        return None
    use_repetition = any(params[i].repetition_penalty != 1.0 for i in rows)
    use_frequency_presence = any(
        params[i].frequency_penalty != 0.0 or params[i].presence_penalty != 0.0 for i in rows
    )
    if output_token_ids is None or len(output_token_ids) != len(params):
        raise ValueError("penalties need output_token_ids with one history per row")
    if use_repetition and (prompt_token_ids is None or len(prompt_token_ids) != len(params)):
        raise ValueError("repetition_penalty needs prompt_token_ids with one history per row")
    seen = None
    if use_repetition and prompt_token_ids is not None:
        seen = _pad([[prompt_token_ids[i], output_token_ids[i]] for i in rows])
    return PenaltyState(
        rows=torch.tensor(rows, dtype=torch.int64),
        output_ids=_pad([[output_token_ids[i]] for i in rows]),
        seen_ids=seen,
        repetition=torch.tensor([params[i].repetition_penalty for i in rows], dtype=torch.float32),
        frequency=torch.tensor([params[i].frequency_penalty for i in rows], dtype=torch.float32),
        presence=torch.tensor([params[i].presence_penalty for i in rows], dtype=torch.float32),
        use_repetition=use_repetition,
        use_frequency_presence=use_frequency_presence,
    )


def _pad(histories: list[list[Sequence[int]]]) -> torch.Tensor:
    """Rows of token ids (each row the concatenation of its parts) padded with -1 into one
    int64 tensor [R, max(1, longest)]. One numpy conversion of all ids at once: per-row
    `torch.tensor` calls cost several times more at hundreds of rows."""
    lengths = np.array([sum(len(part) for part in row) for row in histories], dtype=np.int64)
    width = max(1, int(lengths.max()) if len(lengths) else 0)
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.chain.from_iterable(histories)),
        dtype=np.int64,
        count=int(lengths.sum()),
    )
    out = np.full((len(histories), width), _PAD, dtype=np.int64)
    # Row-major boolean assignment fills each row's first lengths[r] slots in order.
    out[np.arange(width)[None, :] < lengths[:, None]] = flat
    return torch.from_numpy(out)


def _move_tensors(value, device: torch.device | str):  # type: ignore[no-untyped-def]
    """Copy a frozen dataclass with every tensor field on `device`. Host tensors are pinned
    first when the target is CUDA, so the copies are truly asynchronous (a copy from pageable
    memory would synchronize the stream)."""
    device = torch.device(device)
    changes = {}
    for f in fields(value):
        item = getattr(value, f.name)
        if isinstance(item, torch.Tensor) and item.device != device:
            if device.type == "cuda" and item.device.type == "cpu":
                item = item.pin_memory()
            changes[f.name] = item.to(device, non_blocking=True)
    return replace(value, **changes)
