"""`@function` programs and the ways to run them: once, in a batch, streaming, or async.

    @function
    def qa(s, question):
        s += user(question)
        s += assistant(gen("answer", max_tokens=64))

    state = qa.run(question="Why is the sky blue?", backend=rt)
    states = qa.run_batch([{"question": q} for q in questions], backend=rt)
    state = qa.run(question="...", backend=rt, stream=True)
    for piece in state.text_iter("answer"): print(piece, end="")
    state = await qa.run_async(question="...", backend=rt)

`backend`, `sampling` (defaults for every `gen` of the run, e.g. `{"temperature": 0}`) and
`stream` are reserved keywords of `run`; everything else goes to the program.

`run_batch` computes the programs' common prefix once before fanning out: it starts the first
program alone, waits until its first engine request has finished (so the prefix it shares with
the others is in the radix cache), then runs the rest, at most `max_concurrency` at a time.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from radixserve.lang.backend import Backend
from radixserve.lang.interpreter import ProgramState, RunContext
from radixserve.lang.primitives import check_sampling_defaults


def _require_backend(backend: Backend | None) -> Backend:
    if backend is None:
        raise TypeError(
            "no backend: pass backend=Runtime(model=...) (in-process engine) or "
            "backend=Endpoint(url) (a radixserve server)"
        )
    for attr in ("generate", "generate_batch", "score", "tokenize", "model_info"):
        if not callable(getattr(backend, attr, None)):
            raise TypeError(f"{backend!r} is not a radixserve.lang backend (no {attr}())")
    return backend


def _split_args(item: Any) -> tuple[tuple, dict]:
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, (list, tuple)):
        return tuple(item), {}
    raise TypeError(f"run_batch: each item must be a dict of keyword arguments or a tuple, got {item!r}")


class Program:
    """A generation program: a function of a state `s` and its arguments. Made by
    `@function`. Calling it with a state (`sub(s, x)`) runs it inside another program."""

    def __init__(self, fn: Callable[..., Any], sampling: Mapping[str, Any] | None = None) -> None:
        self.fn = fn
        self.sampling = dict(sampling or {})
        functools.update_wrapper(self, fn)

    def __call__(self, s: ProgramState, *args: Any, **kwargs: Any) -> Any:
        return self.fn(s, *args, **kwargs)

    def _context(
        self, backend: Backend | None, sampling: Mapping[str, Any] | None, stream: bool = False
    ) -> RunContext:
        merged = dict(self.sampling)
        merged.update(sampling or {})
        return RunContext(_require_backend(backend), check_sampling_defaults(merged), stream=stream)

    @staticmethod
    def _execute(fn: Callable[..., Any], state: ProgramState, ctx: RunContext, args, kwargs) -> None:
        try:
            state.return_value = fn(state, *args, **kwargs)
            ctx.sync_all()
        except BaseException as e:
            if state.error is None:
                state.error = e
            raise
        finally:
            ctx.finish()

    def run(
        self,
        *args: Any,
        backend: Backend | None = None,
        sampling: Mapping[str, Any] | None = None,
        stream: bool = False,
        **kwargs: Any,
    ) -> ProgramState:
        """Run the program and return its state (after it finished, unless `stream`).

        With `stream=True` the program runs in a background thread and the state is returned
        at once: iterate `state.text_iter(name)`; `state.sync()` waits for the end.
        """
        ctx = self._context(backend, sampling, stream)
        state = ProgramState(ctx)
        if not stream:
            self._execute(self.fn, state, ctx, args, kwargs)
            return state
        done = threading.Event()
        state._done = done

        def body() -> None:
            state._owner = threading.get_ident()
            try:
                self._execute(self.fn, state, ctx, args, kwargs)
            except BaseException:  # noqa: BLE001 - kept on state.error, raised by sync()
                pass
            finally:
                done.set()

        threading.Thread(target=body, name="radixserve-lang-program", daemon=True).start()
        return state

    def run_batch(
        self,
        batch: Sequence[Mapping[str, Any] | Sequence[Any]],
        *,
        backend: Backend | None = None,
        sampling: Mapping[str, Any] | None = None,
        max_concurrency: int | None = None,
        progress_bar: bool = True,
        return_exceptions: bool = False,
    ) -> list[ProgramState]:
        """Run the program once per item of `batch` (a dict of keyword arguments, or a tuple
        of positional ones); return the states in order.

        The first program runs alone until its first engine request has finished, so the
        prefix it shares with the rest is computed once and cached; then the others run
        concurrently (`max_concurrency` threads, default min(len(batch), 64)) and the engine
        batches their requests. A failed program raises its error after all have finished,
        unless `return_exceptions`, which leaves it on `state.error`.
        """
        backend = _require_backend(backend)
        items = [_split_args(it) for it in batch]
        if not items:
            return []
        limit = max_concurrency if max_concurrency is not None else min(len(items), 64)
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        contexts = [self._context(backend, sampling) for _ in items]
        states = [ProgramState(ctx) for ctx in contexts]
        bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc=getattr(self.fn, "__name__", "program"), unit="prog")
        bar_lock = threading.Lock()

        def one(i: int) -> None:
            args, kwargs = items[i]
            try:
                self._execute(self.fn, states[i], contexts[i], args, kwargs)
            except BaseException:  # noqa: BLE001 - kept on state.error
                pass
            finally:
                contexts[i].first_request_done.set()
                if bar is not None:
                    with bar_lock:
                        bar.update(1)

        try:
            with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="radixserve-lang-batch") as pool:
                first = pool.submit(one, 0)
                # Gate the rest on the first program's first finished request (or its end).
                contexts[0].first_request_done.wait()
                futures = [first] + [pool.submit(one, i) for i in range(1, len(items))]
                for f in futures:
                    f.result()
        finally:
            if bar is not None:
                bar.close()
        if not return_exceptions:
            for st in states:
                if st.error is not None:
                    raise st.error
        return states

    async def run_async(
        self,
        *args: Any,
        backend: Backend | None = None,
        sampling: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> ProgramState:
        """`await program.run_async(...)`: `run` without blocking the event loop (the program
        runs in a worker thread; its engine requests are batched with everything else)."""
        loop = asyncio.get_running_loop()
        call = functools.partial(self.run, *args, backend=backend, sampling=sampling, **kwargs)
        return await loop.run_in_executor(None, call)

    async def run_batch_async(self, batch, **options: Any) -> list[ProgramState]:
        """`await program.run_batch_async([...])`: `run_batch` for asyncio."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(self.run_batch, batch, **options))

    def __repr__(self) -> str:
        return f"<radixserve.lang program {getattr(self.fn, '__qualname__', self.fn)!r}>"


def function(fn: Callable[..., Any] | None = None, *, sampling: Mapping[str, Any] | None = None):
    """Decorator making a generation program: `@function` or `@function(sampling={...})`.

    The function's first parameter is the program state `s`; the others are the program's
    arguments, passed to `run`/`run_batch` by keyword (or position).
    """
    if sampling is not None:
        check_sampling_defaults(sampling)
    if fn is None:
        return lambda f: Program(f, sampling)
    return Program(fn, sampling)
