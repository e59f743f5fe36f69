"""Turns a sampled token into a request's output: grammar, detokenization, stop checks.

Called by the engine loop once per sampled request per step, on the engine thread. The order
matters and is the same for every request:

    sampled token -> grammar consumes it (and may force more tokens: fast-forward)
                  -> stop token / EOS? -> detokenize -> stop string? -> max_tokens / context?
                  -> one StreamDelta with the new text, ids and logprobs

Stop tokens never reach the text; a matched stop string is cut from it (unless the request
asked to include it); text held back by the stop checker is flushed when the request ends.

A decode burst (several decode steps launched at once, runtime/scheduler.py) hands over all
the tokens it sampled for a request in one call, `process_sampled_burst`: one delta for them,
cut at the first token that ends the request, so the result is what one-token steps give.

A grammar matcher that is in error (llguidance hit a resource limit while computing the mask or
consuming a token: the mask then allows only EOS) ends the request with finish_reason "error"
and the matcher's message, never as a normal "stop" on that EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from radixserve.runtime.outputs import CONSTRAINT_FAILURE_PREFIX, FinishReason, StreamDelta, TokenLogprob
from radixserve.runtime.request import Request


@dataclass(frozen=True)
class OutputLimits:
    """Engine-wide facts the per-token checks need."""

    eos_token_ids: frozenset[int]
    max_model_len: int


def process_sampled_token(
    req: Request, token_id: int, logprob: TokenLogprob | None, limits: OutputLimits
) -> StreamDelta:
    """Append `token_id` (plus any grammar-forced tokens) to `req` and return the delta to
    emit. Sets `req.finish_reason` when the request must end; the caller releases it.

    Runs once per running request per step on the thread that feeds the device, so it reads
    each attribute once, builds log-probability lists only when they were asked for, and
    clips to the token budget only when a grammar forced extra tokens (cost measured by
    benchmarks/host_overhead.py)."""
    return _process(req, [token_id], logprob, limits, ended_at=None)


def process_sampled_burst(req: Request, token_ids: list[int], limits: OutputLimits) -> StreamDelta:
    """`process_sampled_token` for the tokens one decode burst sampled for `req`, in order
    (runtime/scheduler.py: requests in a burst have no grammar, penalties or log-probabilities).

    The burst ran past any token that ends the request: the first stop token or EOS ends it
    there (that token kept in the ids, not in the text, as one step would), a stop string
    ends it at the token that completes it, and the tokens after are dropped, as if the
    request had decoded one token per step. `token_ids` is consumed (cut in place)."""
    stop_ids = req.params.stop_token_ids
    eos = frozenset() if req.params.ignore_eos else limits.eos_token_ids
    ended_at = None
    for k, t in enumerate(token_ids):
        if t in stop_ids or t in eos:
            ended_at = k
            del token_ids[k + 1 :]
            break
    return _process(req, token_ids, None, limits, ended_at=ended_at)


def _process(
    req: Request, new_ids: list[int], logprob: TokenLogprob | None, limits: OutputLimits, ended_at: int | None
) -> StreamDelta:
    """Fold `new_ids` (one sampled token, or a burst's, cut after a token that ends the
    request: `ended_at` is its index) into `req` and build the delta."""
    params = req.params
    matcher = req.matcher
    if matcher is not None and matcher.is_error():
        # Went into error while filling this step's mask: the token (EOS, the only one the
        # mask allowed) is not output.
        return final_delta(req, "error", grammar_error_message(matcher))
    # None when the request asked for no log-probabilities: nothing is built for them.
    new_logprobs = None if req.logprobs is None else ([logprob] if logprob is not None else [])
    finish: FinishReason | None = None
    stop_reason: str | int | None = None

    if len(new_ids) == 1:
        token_id = new_ids[0]
        if token_id in params.stop_token_ids:
            finish, stop_reason, ended_at = "stop", token_id, 0
        elif token_id in limits.eos_token_ids and not params.ignore_eos:
            finish, ended_at = "stop", 0
        elif matcher is not None:
            finish, error = _advance_grammar(req, new_ids, new_logprobs)
            if finish == "error":
                return final_delta(req, "error", error)
    elif ended_at is not None:  # a burst that reached a stop token or EOS
        last = new_ids[ended_at]
        finish, stop_reason = "stop", (last if last in params.stop_token_ids else None)

    output_ids = req.output_ids
    if len(new_ids) > 1:  # forced tokens or a burst: cut at max_tokens and the context
        budget = min(params.max_tokens - len(output_ids), limits.max_model_len - req.num_tokens)
        del new_ids[max(budget, 1) :]
        if new_logprobs is not None:
            del new_logprobs[len(new_ids) :]
        if ended_at is not None and ended_at >= len(new_ids):
            finish, stop_reason, ended_at = None, None, None  # the stop token was cut by the budget

    # A stop token or EOS ends the text without appearing in it.
    text_ids = new_ids if ended_at is None else new_ids[:ended_at]
    text, matched = _text_of(req, text_ids, new_ids)
    if matched is not None:
        finish, stop_reason = "stop", matched
        if new_logprobs is not None:  # forced tokens past the one that completed the match
            del new_logprobs[len(new_ids) :]
    output_ids.extend(new_ids)
    if new_logprobs is not None:
        req.logprobs.extend(new_logprobs)
    num_prompt = len(req.prompt_ids)
    if finish is None and (
        len(output_ids) >= params.max_tokens or num_prompt + len(output_ids) >= limits.max_model_len
    ):
        finish = "length"
    if finish is not None:
        text, stop_reason = _finish_text(req, text, matched, stop_reason)
        req.finish_reason, req.stop_reason = finish, stop_reason
    # The leading fields positionally (request_id, index, text, token_ids, finish_reason,
    # stop_reason, logprobs): parsing a dozen keywords costs twice the rest of the call.
    delta = StreamDelta(
        req.request_id, req.index, text, new_ids, finish, stop_reason, new_logprobs,
        prompt_tokens=num_prompt, cached_tokens=req.cached_tokens or 0, completion_tokens=len(output_ids),
    )
    if finish is not None:
        delta.prompt_logprobs = req.prompt_logprobs
        delta.prompt_token_ids = req.prompt_ids
    return delta


def _text_of(req: Request, text_ids: list[int], new_ids: list[int]) -> tuple[str, str | None]:
    """Detokenize `text_ids` through the stop checker: (text to stream, matched stop string).
    Several tokens with stop strings to look for go one at a time, so a match ends the
    request at the token that completed it: `new_ids` is cut after that token."""
    if not text_ids:
        return "", None
    detokenizer, checker = req.detokenizer, req.stop_checker
    if len(text_ids) == 1 or not checker.watching:
        return checker.feed(detokenizer.push(text_ids))
    parts = []
    for k, t in enumerate(text_ids):
        text, matched = checker.feed(detokenizer.push((t,)))
        parts.append(text)
        if matched is not None:
            del new_ids[k + 1 :]
            return "".join(parts), matched
    return "".join(parts), None


def _finish_text(req: Request, text: str, matched: str | None, stop_reason: str | int | None) -> tuple[str, str | int | None]:
    """The last delta's text and stop reason: unless a stop string already matched, release
    what the detokenizer still holds (half a character) through the stop checker, then what
    the checker held back as a possible stop-string prefix."""
    if matched is None:
        tail, matched = req.stop_checker.feed(req.detokenizer.flush())
        text += tail
        if matched is not None:
            stop_reason = matched
    if matched is None:
        text += req.stop_checker.flush()
    return text, stop_reason


def grammar_error_message(matcher: Any, context: str = "") -> str:
    """The finish "error" message for a matcher in error: llguidance's own words (its first
    line; what follows is a debugging trailer)."""
    message = (matcher.error() or "").strip().splitlines()
    return f"{CONSTRAINT_FAILURE_PREFIX}{context}{message[0] if message else 'the grammar matcher failed'}"


def _advance_grammar(
    req: Request, new_ids: list[int], new_logprobs: list[TokenLogprob] | None
) -> tuple[FinishReason | None, str | None]:
    """Consume the sampled token and append the forced ones (and, unless `new_logprobs` is
    None, their log-probability entries): (finish, error message). The finish is "error" when
    the matcher refused a token or went into error on the way (a resource limit); nothing more
    is appended then."""
    matcher = req.matcher
    if not matcher.consume(new_ids[0]):
        # The mask allowed it, so the grammar contradicts itself on this vocabulary: it needs
        # bytes that no token spells in a way it accepts (e.g. a character whose UTF-8 lead
        # byte has no token of its own).
        return "error", grammar_error_message(
            matcher, f"the grammar refused token {new_ids[0]}, which its own mask allowed (it needs text this "
            "model's vocabulary cannot spell): ")
    if matcher.is_error():
        return "error", grammar_error_message(matcher)
    if matcher.is_finished():
        return "stop", None
    forced = matcher.forced_tokens()
    if matcher.is_error():
        return "error", grammar_error_message(matcher)
    for tok in forced:
        if not matcher.consume(tok):
            return "error", grammar_error_message(matcher, f"forced token {tok} refused: ")
        new_ids.append(tok)
        if new_logprobs is not None:
            new_logprobs.append(TokenLogprob(tok, 0.0))
    return ("stop" if forced and matcher.is_finished() else None), None


def final_delta(req: Request, reason: FinishReason, error: str | None = None) -> StreamDelta:
    """The closing delta of a request ended from outside (abort, error, max_tokens == 0)."""
    req.finish_reason = reason
    req.error = error
    text = req.stop_checker.flush() if req.stop_checker is not None and reason != "error" else ""
    return StreamDelta(
        request_id=req.request_id,
        index=req.index,
        text=text,
        token_ids=[],
        finish_reason=reason,
        prompt_tokens=len(req.prompt_ids),
        cached_tokens=req.cached_tokens or 0,
        completion_tokens=len(req.output_ids),
        prompt_logprobs=req.prompt_logprobs,
        prompt_token_ids=req.prompt_ids,
        error=error,
    )
