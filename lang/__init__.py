"""radixserve.lang: a small language for multi-call generation programs.

A program is a Python function of a state `s`; it appends text and generation primitives, and
reads what was generated::

    from radixserve.lang import function, gen, select, system, user, assistant, Runtime

    @function
    def triage(s, ticket):
        s += system("You sort support tickets.")
        s += user("Ticket: " + ticket + "\\nIs it urgent?")
        s += assistant(select("urgent", choices=["yes", "no"]))
        s += user("Summarize it in one line.")
        s += assistant(gen("summary", max_tokens=32, stop="\\n"))

    rt = Runtime(model="default")
    state = triage.run(ticket="The site is down!", backend=rt, sampling={"temperature": 0})
    print(state["urgent"], state["summary"])

Names:
  function        decorator making a `Program`; `@function` or `@function(sampling={...})`
  Program         `.run(*args, backend=, sampling=, stream=, **kwargs) -> ProgramState`,
                  `.run_batch([{...}, ...], backend=, max_concurrency=, progress_bar=True)`,
                  `await .run_async(...)`, `await .run_batch_async(...)`
  gen             `gen(name, max_tokens=, stop=, temperature=, top_p=, top_k=, min_p=, seed=,
                  regex=, choices=, json_schema=, grammar=)`: generate into variable `name`;
                  a grammar (Lark syntax) is parsed when `gen` is called
  select          `select(name, choices=[...])`: pick the choice with the highest mean token
                  log-probability after the current text (one batched scoring call)
  system, user, assistant
                  role blocks: `s += user("...")`, `s += assistant(gen("a"))`, rendered with
                  the model's chat template; also `with s.user(): ...`
  ProgramState    the `s` of a program: `s += expr`, `s["name"]`, `s.meta(name)` (cache use,
                  finish reason, select scores), `s.text()`, `s.messages()`, `s.fork(n)`,
                  `s.text_iter(name)` (streaming), `s.token_ids()`
  ForkGroup       what `s.fork(n)` returns: `forks[i]`, `forks["name"]` (values of all
                  branches), `forks += expr`, `forks.join()`
  Runtime         backend: an in-process engine, `Runtime(model="default", **engine_kwargs)`
                  or `Runtime(engine=existing_engine)`
  Endpoint        backend: a radixserve server, `Endpoint(url, api_key=None)`
  Backend         the protocol a backend implements (lang/backend.py), with `BackendBase`,
                  `ModelInfo`, `Generation`, `ContinuationScore`
  VariableNotFound, EmptyChoices, GrammarSyntaxError, BackendUnreachable, BackendError,
  ChatTemplateError, LangError
                  errors (lang/errors.py)

See interpreter.py for how text becomes token ids (so forks and batches share cached prefixes
exactly) and how `select` handles token boundaries and normalization.
"""

from radixserve.lang.backend import Backend, BackendBase, ContinuationScore, Generation, ModelInfo
from radixserve.lang.endpoint import Endpoint
from radixserve.lang.errors import (
    BackendError,
    BackendUnreachable,
    ChatTemplateError,
    EmptyChoices,
    GrammarSyntaxError,
    LangError,
    VariableNotFound,
)
from radixserve.lang.interpreter import ForkGroup, ProgramState, VarMeta
from radixserve.lang.primitives import assistant, gen, select, system, user
from radixserve.lang.program import Program, function
from radixserve.lang.runtime_backend import Runtime

__all__ = [
    "Backend",
    "BackendBase",
    "BackendError",
    "BackendUnreachable",
    "ChatTemplateError",
    "ContinuationScore",
    "EmptyChoices",
    "Endpoint",
    "ForkGroup",
    "Generation",
    "GrammarSyntaxError",
    "LangError",
    "ModelInfo",
    "Program",
    "ProgramState",
    "Runtime",
    "VarMeta",
    "VariableNotFound",
    "assistant",
    "function",
    "gen",
    "select",
    "system",
    "user",
]
