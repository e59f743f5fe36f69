"""The interpreter: program state, how each primitive runs, forks and streaming.

A `ProgramState` (the `s` a program receives) holds the program's text twice: as display text
and as token ids. Appended text is kept pending and tokenized in one piece right before the
next model call, and generated tokens are appended as the engine produced them. So the token
ids a request sends are a pure function of the program's history: two branches of a fork, or
two programs of a batch, send identical ids for their common part, and the engine's radix
cache (which matches token ids) reuses it. Re-tokenizing the growing text instead could merge
tokens across the old/new boundary and silently lose the prefix match.

    s += "A"; s += "B"   pending "AB"            (nothing sent)
    s += gen("x")        ids += tok("AB"); request(ids) -> ids += generated ids
    s += "C"; forks = s.fork(2)
                         ids += tok("C"); prefill(ids) once; each branch copies ids

`select` scoring (token boundaries and normalization):
  * the prefix is committed first (pending text tokenized as above), then every choice is
    tokenized *separately* and appended to the same prefix ids. Tokenizing prefix+choice
    jointly could merge the prefix's last characters with the choice's first ones, giving
    each candidate a different prefix, so no shared cache and a score that includes prefix
    text. The cost: a choice is scored as its own tokenization (e.g. "yes" after "Answer: "
    is "Ġ" "yes", not "Ġyes"); write the separating space inside the choices (" yes") or
    end the prompt without it when that matters.
  * a choice's score is the mean log-probability of its tokens given the prefix (the sum
    divided by its token count), so longer choices are not penalized for their length;
    ties go to the earlier choice. All choices go to the engine in ONE batched request
    (`max_tokens=0, prompt_logprobs=0, prompt_logprobs_start=len(prefix)`).

Threads: the root state runs each primitive synchronously in the caller's thread. Forked
branches each get a worker thread that executes their primitives in order, so
`for f in forks: f += gen(...)` returns at once and the branches' requests reach the engine
together (and are batched). Reading a branch (`forks[i]["x"]`, `forks.join()`) waits for it;
an error inside a branch is raised there.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from radixserve.lang.backend import Backend, ContinuationScore, Generation
from radixserve.lang.chat import ChatFormat
from radixserve.lang.errors import BackendError, ChatTemplateError, VariableNotFound
from radixserve.lang.primitives import ROLES, ExprLike, Gen, Role, Select, Seq, _check_expr
from radixserve.runtime.sampling_params import SamplingParams


@dataclass
class VarMeta:
    """How a variable was produced. For `gen`: the request's prompt ids and cache usage. For
    `select`: `scores` maps each choice to its normalized log-probability, `choice_scores`
    holds the per-token details and each scoring request's cache usage, and `cached_tokens`
    is the most any candidate reused (one candidate may have computed the shared prefix for
    the others)."""

    kind: str
    prompt_token_ids: list[int]
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    token_ids: list[int] = field(default_factory=list)
    scores: dict[str, float] | None = None
    choice_scores: list[ContinuationScore] | None = None


class RunContext:
    """What all states of one program run share: the backend, the sampling defaults, a
    condition for streaming readers, and the states to close when the run ends."""

    def __init__(
        self, backend: Backend, sampling: Mapping[str, Any] | None = None, *, stream: bool = False
    ) -> None:
        self.backend = backend
        self.sampling = dict(sampling or {})
        # Streaming runs ask the backend for text deltas; others get whole results (cheaper
        # over HTTP), and `text_iter` then yields each generation in one piece.
        self.stream = stream
        self.cond = threading.Condition()
        self.finished = False
        self.first_request_done = threading.Event()
        self._states: list[ProgramState] = []
        self._chat_format: ChatFormat | None = None
        self._lock = threading.Lock()

    def register(self, state: ProgramState) -> None:
        with self._lock:
            self._states.append(state)

    def chat_format(self) -> ChatFormat:
        """The backend's chat format (backends derived from `BackendBase` cache it)."""
        with self._lock:
            if self._chat_format is None:
                getter = getattr(self.backend, "chat_format", None)
                if getter is not None:
                    self._chat_format = getter()
                else:
                    info = self.backend.model_info()
                    if not info.chat_template:
                        raise ChatTemplateError(
                            f"model {info.name!r} has no chat template, so system()/user()/"
                            f"assistant() cannot be used; append plain text instead"
                        )
                    self._chat_format = ChatFormat.from_template(
                        info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token
                    )
            return self._chat_format

    def eos_ids(self) -> frozenset[int]:
        return frozenset(self.backend.model_info().eos_token_ids)

    def sync_all(self) -> None:
        """Wait for every state of the run (branches included); raise the first error."""
        done = 0
        first_error: BaseException | None = None
        while True:  # branches may fork further while we wait
            with self._lock:
                states = list(self._states)
            for st in states[done:]:
                try:
                    st.sync()
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    first_error = first_error or e
            done = len(states)
            with self._lock:
                if len(self._states) == done:
                    break
        if first_error is not None:
            raise first_error

    def finish(self) -> None:
        """End the run: stop the branches' worker threads (later appends run inline) and wake
        streaming readers."""
        with self._lock:
            states = list(self._states)
        for st in states:
            st._stop_worker()
        with self.cond:
            self.finished = True
            self.cond.notify_all()


_STOP = object()


class ProgramState:
    """The state `s` of a running program. See the module docstring.

    Public API: `s += expr`, `s["name"]`, `s.get(name, default)`, `name in s`,
    `s.variables()`, `s.meta(name)`, `s.text()`, `s.token_ids()`, `s.messages()`,
    `s.fork(n)`, `with s.system()/s.user()/s.assistant():`, `s.text_iter(name)`,
    `s.text_iter_async(name)`, `s.sync()`, `s.error`, `s.return_value`.
    """

    def __init__(self, ctx: RunContext, *, threaded: bool = False) -> None:
        self._ctx = ctx
        self._ids: list[int] = []
        self._pending = ""
        self._text: list[str] = []
        self._vars: dict[str, str] = {}
        self._meta: dict[str, VarMeta] = {}
        self._messages: list[dict[str, str]] = []
        self._open_role: tuple[str, int] | None = None  # (role, text length at its start)
        self._text_len = 0
        # Streaming log: everything appended plus in-flight generated deltas, in order.
        self._stream_log: list[str] = []
        self._var_streams: dict[str, list] = {}  # name -> [generation id, text, done]
        self._prefilled_upto = 0  # ids[:n] are known to be in the engine's cache
        self.error: BaseException | None = None
        self.return_value: Any = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        # Set by run(stream=True): the program's thread, and an event set when it ends.
        self._done: threading.Event | None = None
        self._owner: int | None = None
        if threaded:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._worker, name="radixserve-lang-branch", daemon=True)
            self._thread.start()
        ctx.register(self)

    # ---------------------------------------------------------------- appending

    def __iadd__(self, expr: ExprLike) -> ProgramState:
        _check_expr(expr)
        for op in _flatten(expr):
            self._submit(op)
        return self

    def _submit(self, op: tuple) -> None:
        if self._queue is None:
            if self.error is not None:
                raise self.error
            try:
                self._execute(op)
            except BaseException as e:
                self.error = e
                raise
        else:
            self._queue.put(op)

    def _worker(self) -> None:
        q = self._queue
        assert q is not None
        while True:
            op = q.get()
            try:
                if op is _STOP:
                    return
                if self.error is None:
                    self._execute(op)
            except BaseException as e:  # noqa: BLE001 - surfaced by sync()
                self.error = e
                with self._ctx.cond:
                    self._ctx.cond.notify_all()
            finally:
                q.task_done()

    def _stop_worker(self) -> None:
        q = self._queue
        if q is not None:
            q.join()
            self._queue = None
            q.put(_STOP)

    def sync(self) -> ProgramState:
        """Wait until every primitive appended so far has run; raise the state's error.
        On a streaming run's state, read from another thread: wait for the program's end."""
        done = self._done
        if done is not None and threading.get_ident() != self._owner:
            done.wait()
        q = self._queue
        if q is not None:
            q.join()
        if self.error is not None:
            raise self.error
        return self

    def _execute(self, op: tuple) -> None:
        kind = op[0]
        if kind == "text":
            self._append_text(op[1])
        elif kind == "gen":
            self._run_gen(op[1])
        elif kind == "select":
            self._run_select(op[1])
        elif kind == "begin":
            self._begin_role(op[1])
        elif kind == "end":
            self._end_role(op[1])
        else:  # pragma: no cover - _flatten produces only the kinds above
            raise AssertionError(kind)

    # ---------------------------------------------------------------- text and tokens

    def _append_text(self, text: str) -> None:
        if not text:
            return
        with self._ctx.cond:
            self._pending += text
            self._text.append(text)
            self._text_len += len(text)
            self._stream_log.append(text)
            self._ctx.cond.notify_all()

    def _append_generated(self, text: str, ids: list[int]) -> None:
        """Append model output whose tokens are known (no re-tokenization)."""
        with self._ctx.cond:
            self._ids.extend(ids)
            self._text.append(text)
            self._text_len += len(text)
            self._ctx.cond.notify_all()

    def _commit(self) -> list[int]:
        """Tokenize pending text onto the ids; return a copy of the ids (the prompt)."""
        if self._pending:
            ids = self._ctx.backend.tokenize(self._pending)
            with self._ctx.cond:
                self._ids.extend(ids)
                self._pending = ""
        return list(self._ids)

    # ---------------------------------------------------------------- primitives

    def _run_gen(self, g: Gen) -> None:
        ctx = self._ctx
        prompt = self._commit()
        params = g.sampling_params(ctx.sampling)
        gen_id = object()
        streamed: list[str] = []

        def on_text(delta: str) -> None:
            if not delta:
                return
            with ctx.cond:
                streamed.append(delta)
                self._stream_log.append(delta)
                if g.name is not None:
                    entry = self._var_streams.get(g.name)
                    if entry is not None and entry[0] is gen_id:
                        entry[1] += delta
                ctx.cond.notify_all()

        if g.name is not None:
            with ctx.cond:
                self._var_streams[g.name] = [gen_id, "", False]
        try:
            res = ctx.backend.generate(prompt, params, on_text=on_text if ctx.stream else None)
        finally:
            ctx.first_request_done.set()
        if res.finish_reason in ("error", "abort") or res.error:
            reason = res.error or f"the request ended with finish_reason={res.finish_reason!r}"
            raise BackendError(f"gen({g.name!r}) failed: {reason}")
        ids = self._output_ids(res, params)
        with ctx.cond:
            # Keep the streaming log consistent with the final text.
            sent = "".join(streamed)
            if res.text.startswith(sent):
                self._stream_log.append(res.text[len(sent) :])
            self._append_generated(res.text, ids)
            if g.name is not None:
                self._vars[g.name] = res.text
                self._meta[g.name] = VarMeta(
                    kind="gen",
                    prompt_token_ids=prompt,
                    prompt_tokens=res.prompt_tokens or len(prompt),
                    cached_tokens=res.cached_tokens,
                    completion_tokens=res.completion_tokens or len(res.token_ids),
                    finish_reason=res.finish_reason,
                    stop_reason=res.stop_reason,
                    token_ids=list(res.token_ids),
                )
                entry = self._var_streams[g.name]
                if entry[0] is gen_id:
                    entry[1] = res.text
                    entry[2] = True
            ctx.cond.notify_all()

    def _output_ids(self, res: Generation, params: SamplingParams) -> list[int]:
        """The token ids that represent `res.text` in the program.

        The engine's ids can extend past the text: a final EOS / stop token (dropped here, the
        role suffix supplies the template's own end marker), or a matched stop string (the
        text excludes it; its tokens may straddle the boundary, so the text is re-tokenized).
        """
        ids = list(res.token_ids)
        if res.finish_reason == "stop" and isinstance(res.stop_reason, str):
            return self._ctx.backend.tokenize(res.text) if res.text else []
        stops = self._ctx.eos_ids() | set(params.stop_token_ids)
        if res.finish_reason == "stop" and ids and ids[-1] in stops:
            ids.pop()
        return ids

    def _run_select(self, sel: Select) -> None:
        backend = self._ctx.backend
        prefix = self._commit()
        choice_ids = [backend.tokenize(c) for c in sel.choices]
        try:
            scores = backend.score(prefix, choice_ids)
        finally:
            self._ctx.first_request_done.set()
        means = [sc.mean for sc in scores]
        best = max(range(len(means)), key=lambda i: (means[i], -i))
        if math.isinf(means[best]) and means[best] < 0 and len(prefix) == 0:
            raise BackendError(f"select({sel.name!r}) needs some text before it to score the choices")
        choice = sel.choices[best]
        self._append_generated(choice, choice_ids[best])
        with self._ctx.cond:
            # Each candidate prompt was computed in full, so the chosen one is cached.
            self._prefilled_upto = len(self._ids)
            if sel.name is not None:
                self._vars[sel.name] = choice
                self._meta[sel.name] = VarMeta(
                    kind="select",
                    prompt_token_ids=prefix,
                    prompt_tokens=len(prefix),
                    cached_tokens=max(sc.cached_tokens for sc in scores),
                    token_ids=list(choice_ids[best]),
                    scores=dict(zip(sel.choices, means)),
                    choice_scores=scores,
                )
            self._stream_log.append(choice)
            self._ctx.cond.notify_all()

    def _begin_role(self, role: str) -> None:
        if self._open_role is not None:
            raise ValueError(f"cannot open a {role} message inside an open {self._open_role[0]} message")
        fmt = self._ctx.chat_format()
        self._append_text(fmt.role_prefix(role, is_first=not self._messages))
        self._open_role = (role, self._text_len)

    def _end_role(self, role: str) -> None:
        if self._open_role is None or self._open_role[0] != role:
            raise ValueError(f"no open {role} message to close")
        start = self._open_role[1]
        content = "".join(self._text)[start:]
        self._open_role = None
        with self._ctx.cond:
            self._messages.append({"role": role, "content": content})
        self._append_text(self._ctx.chat_format().role_suffix(role))

    # ---------------------------------------------------------------- role blocks

    @contextmanager
    def _role_block(self, role: str) -> Iterator[ProgramState]:
        self._submit(("begin", role))
        yield self
        self._submit(("end", role))

    def system(self):
        """`with s.system(): s += "..."` appends a system message."""
        return self._role_block("system")

    def user(self):
        """`with s.user(): s += "..."` appends a user message."""
        return self._role_block("user")

    def assistant(self):
        """`with s.assistant(): s += gen("reply")` appends an assistant message."""
        return self._role_block("assistant")

    # ---------------------------------------------------------------- fork

    def fork(self, n: int) -> ForkGroup:
        """Make `n` branches that continue from the current text.

        The current text is committed to token ids and prefilled once (one request with
        `max_tokens=0`, skipped when those ids are already known to be cached), so every
        branch's first request finds the whole shared prefix in the radix cache.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"fork(n): n must be a positive integer, got {n!r}")
        self.sync()
        prompt = self._commit()
        if prompt and len(prompt) > self._prefilled_upto:
            try:
                res = self._ctx.backend.generate(prompt, SamplingParams(max_tokens=0))
            finally:
                self._ctx.first_request_done.set()
            if res.finish_reason == "error" or res.error:
                raise BackendError(f"fork({n}): prefilling the shared prefix failed: {res.error}")
            self._prefilled_upto = len(prompt)
        branches = []
        for _ in range(n):
            # After the run ended nobody would stop a worker thread: branches then run inline.
            b = ProgramState(self._ctx, threaded=not self._ctx.finished)
            b._ids = list(self._ids)
            b._text = ["".join(self._text)]
            b._text_len = self._text_len
            b._stream_log = ["".join(self._stream_log)]
            b._vars = dict(self._vars)
            b._meta = dict(self._meta)
            b._messages = [dict(m) for m in self._messages]
            b._open_role = self._open_role
            b._prefilled_upto = self._prefilled_upto
            branches.append(b)
        return ForkGroup(branches)

    # ---------------------------------------------------------------- reading

    def __getitem__(self, name: str) -> str:
        self.sync()
        try:
            return self._vars[name]
        except KeyError:
            raise VariableNotFound(name, self._vars) from None

    def get(self, name: str, default: Any = None) -> Any:
        self.sync()
        return self._vars.get(name, default)

    def __contains__(self, name: str) -> bool:
        self.sync()
        return name in self._vars

    def variables(self) -> dict[str, str]:
        """All captured variables (a copy)."""
        self.sync()
        return dict(self._vars)

    def meta(self, name: str) -> VarMeta:
        """How variable `name` was produced (cache usage, finish reason, select scores)."""
        self.sync()
        try:
            return self._meta[name]
        except KeyError:
            raise VariableNotFound(name, self._meta) from None

    def text(self) -> str:
        """The program's whole text so far."""
        self.sync()
        return "".join(self._text)

    def token_ids(self) -> list[int]:
        """The program's text as the token ids the next request would send."""
        self.sync()
        return self._commit()

    def messages(self) -> list[dict[str, str]]:
        """The chat messages appended through role blocks, as {"role", "content"} dicts."""
        self.sync()
        return [dict(m) for m in self._messages]

    def __repr__(self) -> str:
        return f"ProgramState(variables={sorted(self._vars)!r}, text_chars={self._text_len})"

    # ---------------------------------------------------------------- streaming

    def text_iter(self, name: str | None = None) -> Iterator[str]:
        """Yield text as it is produced: with `name`, the pieces of that variable's
        generation (waiting for it to start); without, everything appended to the state.

        Meant for `program.run(..., stream=True)`, where the program runs in the background.
        Raises `VariableNotFound` if the program ends without generating `name`, and the
        program's error if it fails.
        """
        ctx = self._ctx
        if name is None:
            pos = 0
            while True:
                with ctx.cond:
                    while len(self._stream_log) <= pos and not (ctx.finished or self.error):
                        ctx.cond.wait()
                    chunk = self._stream_log[pos:]
                    pos = len(self._stream_log)
                    over = ctx.finished or self.error is not None
                for piece in chunk:
                    if piece:
                        yield piece
                if over and pos >= len(self._stream_log):
                    break
            if self.error is not None:
                raise self.error
            return
        followed = None
        sent = 0
        while True:
            with ctx.cond:
                while True:
                    entry = self._var_streams.get(name)
                    if followed is None and entry is not None:
                        followed = entry[0]
                    if entry is not None and entry[0] is followed and (len(entry[1]) > sent or entry[2]):
                        break
                    if entry is not None and entry[0] is not followed:
                        return  # the generation we followed was replaced by a newer one
                    if self.error is not None or ctx.finished:
                        break
                    ctx.cond.wait()
                entry = self._var_streams.get(name)
                new = entry[1][sent:] if entry is not None and entry[0] is followed else ""
                sent += len(new)
                done = entry is not None and entry[0] is followed and entry[2]
                error, finished = self.error, ctx.finished
            if new:
                yield new
            if done:
                return
            if error is not None:
                raise error
            if finished and followed is None:
                raise VariableNotFound(name, self._vars)
            if finished:
                return

    async def text_iter_async(self, name: str | None = None):
        """`async for piece in state.text_iter_async("answer")`: `text_iter` for asyncio."""
        import asyncio

        it = self.text_iter(name)
        loop = asyncio.get_running_loop()
        done = object()
        while True:
            piece = await loop.run_in_executor(None, next, it, done)
            if piece is done:
                return
            yield piece


class ForkGroup:
    """The branches made by `s.fork(n)`.

    `forks[i]` is a branch state; `forks["name"]` waits for every branch and returns the list
    of their values of `name`; `forks += expr` appends to every branch; `forks.join()` waits
    for all branches (raising the first error) and returns the group.
    """

    def __init__(self, branches: list[ProgramState]) -> None:
        self._branches = branches

    def __len__(self) -> int:
        return len(self._branches)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self._branches)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            self.join()
            return [b[key] for b in self._branches]
        return self._branches[key]

    def __setitem__(self, index: int, value: ProgramState) -> None:
        # `forks[i] += expr` assigns the (same) branch back; nothing else may be assigned.
        if value is not self._branches[index]:
            raise TypeError("branches of a fork cannot be replaced")

    def __iadd__(self, expr: ExprLike) -> ForkGroup:
        for b in self._branches:
            b += expr
        return self

    def join(self) -> ForkGroup:
        first: BaseException | None = None
        for b in self._branches:
            try:
                b.sync()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                first = first or e
        if first is not None:
            raise first
        return self

    def __repr__(self) -> str:
        return f"ForkGroup({len(self._branches)} branches)"


def _flatten(expr: ExprLike) -> Iterator[tuple]:
    """Expression -> primitive operations, in order."""
    if isinstance(expr, str):
        yield ("text", expr)
    elif isinstance(expr, Seq):
        for item in expr.items:
            yield from _flatten(item)
    elif isinstance(expr, Gen):
        yield ("gen", expr)
    elif isinstance(expr, Select):
        yield ("select", expr)
    elif isinstance(expr, Role):
        if expr.role not in ROLES:
            raise ValueError(f"unknown role {expr.role!r}")
        yield ("begin", expr.role)
        for item in expr.content:
            yield from _flatten(item)
        yield ("end", expr.role)
    else:  # pragma: no cover - _check_expr rejects everything else
        raise TypeError(type(expr).__name__)

