"""Turns a sampled token into a request's output: grammar, detokenization, stop checks.

Called by the engine loop once per sampled request per step, on the engine thread. The order
matters and is the same for every request:

    sampled token -> grammar consumes it (and may force more tokens: fast-forward)
                  -> stop token / EOS? -> detokenize -> stop string? -> max_tokens / context?
                  -> one StreamDelta with the new text, ids and logprobs

Stop tokens never reach the text; a matched stop string is cut from it (unless the request
asked to include it); text held back by the stop checker is flushed when the request ends.

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
    params = req.params
    matcher = req.matcher
    if matcher is not None and matcher.is_error():
        # Went into error while filling this step's mask: the token (EOS, the only one the
        # mask allowed) is not output.
        return final_delta(req, "error", grammar_error_message(matcher))
    new_ids = [token_id]
    # None when the request asked for no log-probabilities: nothing is built for them.
    new_logprobs = None if req.logprobs is None else ([logprob] if logprob is not None else [])
    finish: FinishReason | None = None
    stop_reason: str | int | None = None

    ended_by_token = False
    if token_id in params.stop_token_ids:
        finish, stop_reason, ended_by_token = "stop", token_id, True
    elif token_id in limits.eos_token_ids and not params.ignore_eos:
        finish, ended_by_token = "stop", True
    elif matcher is not None:
        finish, error = _advance_grammar(req, new_ids, new_logprobs)
        if finish == "error":
            return final_delta(req, "error", error)

    output_ids = req.output_ids
    if len(new_ids) > 1:  # forced tokens never overrun max_tokens or the context
        budget = min(params.max_tokens - len(output_ids), limits.max_model_len - req.num_tokens)
        del new_ids[max(budget, 1) :]
        if new_logprobs is not None:
            del new_logprobs[len(new_ids) :]
    output_ids.extend(new_ids)
    if new_logprobs is not None:
        req.logprobs.extend(new_logprobs)

    # A stop token or EOS ends the text without appearing in it.
    text, matched = ("", None) if ended_by_token else req.stop_checker.feed(req.detokenizer.push(new_ids))
    if matched is not None:
        finish, stop_reason = "stop", matched
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
