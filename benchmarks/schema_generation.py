"""Schema-constrained generation on MaskBench schemas: does every output validate?

For each selected schema of the MaskBench sample (data/maskbench-dev) the default model is
asked, through its chat template, to produce a JSON instance of the schema, with the schema
itself as the request's JSON-Schema constraint (exactly the engine's path:
`ConstraintSpec.json_schema` -> `Engine.generate`), greedy. All requests are submitted at once
and the engine batches them. Every finished output is then checked with `jsonschema`, using the
validator of the schema's own draft (`validators.validator_for`, 2020-12 when `$schema` is
absent) with that draft's format checker (formats whose checker needs a package that is not
installed pass unchecked, as in jsonschema itself).

Selection (deterministic): schemas whose compact JSON is at most `--max-schema-chars` long (the
prompt must leave room for the output in the context) are grouped by MaskBench source (the
file-name prefix, see `maskbench.source_of`); the `--count` picks are shared out over the
sources as evenly as their sizes allow, and within a source spread evenly over its sorted
files. Schemas are not pre-filtered by whether they compile: a schema the compiler refuses
is counted as a compile error (a ConstraintError with its message); any other exception at
compile time is a bug and counted apart ("unclear errors", must be 0).

Outcomes per compiled schema: `valid` (finish "stop", json.loads and jsonschema accept),
`invalid` (finish "stop" but the text is not a valid instance: a soundness bug, must be 0),
`cut` (finish "length": max_tokens ended the output before the grammar did), `error` (finish
"error", e.g. a grammar resource limit hit while decoding, with its message).

Whitespace between JSON tokens is capped by the compiler (`ConstraintLimits.
json_max_whitespace`), so a model cannot loop on spaces or newlines; strings and arrays are as
long as the schema allows, so `--max-tokens` is set generously. A small model decoding greedily
still repeats itself inside a value (the same array item, string fragment or property again
and again) until max_tokens cuts it. `--max-string-length`, `--max-items`, `--max-properties`, `--max-integer-digits`
turn on the optional JSON bounds of `ConstraintLimits` (`tighten_schema`: bounds added to the
schema, never loosened, so outputs still validate against the schema as given), given to the
engine as `Engine(constraints=ConstraintLimits(...))`.

`--frequency-penalty` (OpenAI's, cumulative per repeated token) breaks the loops the bounds
cannot reach (a property name repeated inside itself, a string under a `oneOf`); the mask
still decides what is allowed, so outputs stay valid.

Run (about 30-40 minutes for 100 schemas on two shared CPU cores unbounded, most of it outputs
that repeat until max_tokens; about 10 with bounds):

    python -m benchmarks.schema_generation --count 100 --max-tokens 2048 \\
        --outputs build/schema_generation.jsonl --json build/schema_generation.json
    python -m benchmarks.schema_generation --count 100 --max-tokens 1024 --max-string-length 64 \\
        --max-items 4 --max-properties 8 --max-integer-digits 12 --frequency-penalty 0.5

Exit status: 1 if any output is invalid or any compile failure is not a ConstraintError.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from benchmarks.maskbench import data_dir, source_of

SYSTEM = "You are a helpful assistant. You answer with JSON only."
USER = "Produce a JSON instance of this JSON Schema. Reply with the JSON only.\nSchema: {schema}"


def compact(schema: Any) -> str:
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def _spread(items: Sequence[Any], count: int) -> list[Any]:
    """`count` items spread evenly over `items` (all of them when count >= len)."""
    if count >= len(items):
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


def quotas(sizes: dict[str, int], count: int) -> dict[str, int]:
    """Share `count` picks over sources as evenly as their sizes allow: each round gives one
    more pick to every source that has files left (sorted by name), until `count` is reached."""
    given = {name: 0 for name in sizes}
    total = min(count, sum(sizes.values()))
    while sum(given.values()) < total:
        for name in sorted(sizes):
            if given[name] < sizes[name] and sum(given.values()) < total:
                given[name] += 1
    return given


def select_schemas(folder: Path, count: int, max_schema_chars: int) -> tuple[list[tuple[str, str, Any]], int]:
    """((file name, source, schema) picks, number of files skipped for size). Deterministic."""
    by_source: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    skipped = 0
    for path in sorted(folder.glob("*.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))["schema"]
        if len(compact(schema)) > max_schema_chars:
            skipped += 1
            continue
        by_source[source_of(path)].append((path.name, schema))
    share = quotas({name: len(files) for name, files in by_source.items()}, count)
    picks = []
    for name in sorted(by_source):
        for file_name, schema in _spread(by_source[name], share[name]):
            picks.append((file_name, name, schema))
    return picks, skipped


def schema_validator(schema: Any) -> Any:
    """The validator of the schema's own draft (2020-12 by default), with its format checker."""
    import jsonschema

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def check_output(schema: Any, text: str) -> tuple[bool, str]:
    """(valid, why not) for a finished output."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return False, f"not JSON: {exc}"
    try:
        error = jsonschema.exceptions.best_match(schema_validator(schema).iter_errors(value))
    except Exception as exc:  # noqa: BLE001 - e.g. a $ref jsonschema cannot resolve
        return False, f"validator failed: {type(exc).__name__}: {exc}"
    if error is not None:
        return False, f"{error.message} (at {'/'.join(map(str, error.absolute_path)) or 'root'})"
    return True, ""


def build_prompt(engine: Any, schema: Any) -> str:
    from radixserve.runtime.chat_template import render_chat

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER.format(schema=compact(schema))}]
    return render_chat(engine.chat_template, messages)


@dataclass
class Case:
    name: str
    source: str
    outcome: str  # compile_error | unclear_error | valid | invalid | cut | error | too_long
    detail: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    compile_s: float = 0.0
    text: str = ""


def run(engine: Any, picks: Sequence[tuple[str, str, Any]], max_tokens: int, progress: bool = True,
        frequency_penalty: float = 0.0) -> tuple[list[Case], float]:
    """Compile, generate (all requests at once), validate. Returns (cases, generation seconds)."""
    from radixserve.runtime import SamplingParams
    from radixserve.runtime.constraints import ConstraintError, ConstraintSpec

    cases: list[Case] = []
    pending: list[tuple[Case, Any, str, Any]] = []  # case, schema, prompt, params
    for name, source, schema in picks:
        case = Case(name, source, "")
        cases.append(case)
        t0 = time.perf_counter()
        try:
            spec = ConstraintSpec.json_schema(schema)
            engine.constraints.compile(spec)
        except ConstraintError as exc:
            case.outcome, case.detail = "compile_error", exc.message.splitlines()[0]
            case.compile_s = time.perf_counter() - t0
            continue
        except Exception as exc:  # noqa: BLE001 - counted: must not happen
            case.outcome, case.detail = "unclear_error", f"{type(exc).__name__}: {exc}"
            continue
        case.compile_s = time.perf_counter() - t0
        prompt = build_prompt(engine, schema)
        case.prompt_tokens = len(engine.tokenize(prompt))
        budget = min(max_tokens, engine.max_model_len - case.prompt_tokens)
        if budget < max_tokens // 2:
            case.outcome, case.detail = "too_long", f"prompt of {case.prompt_tokens} tokens leaves {budget} for the output"
            continue
        pending.append((case, schema, prompt, SamplingParams(max_tokens=budget, temperature=0.0, frequency_penalty=frequency_penalty,
                                                                    constraint=spec)))

    if progress:
        print(f"generating {len(pending)} outputs (max_tokens {max_tokens}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    done = threading.Event()
    if progress:
        threading.Thread(target=_report_progress, args=(engine, done, len(pending)), daemon=True).start()
    try:
        results = engine.generate([p[2] for p in pending], [p[3] for p in pending]) if pending else []
    finally:
        done.set()
    seconds = time.perf_counter() - t0
    for (case, schema, _, _), result in zip(pending, results):
        out = result.outputs[0]
        case.output_tokens = len(out.token_ids)
        case.text = out.text
        if out.finish_reason == "stop":
            ok, why = check_output(schema, out.text)
            case.outcome, case.detail = ("valid", "") if ok else ("invalid", why)
        elif out.finish_reason == "length":
            case.outcome, case.detail = "cut", f"max_tokens reached after {len(out.token_ids)} tokens"
        else:
            case.outcome, case.detail = "error", f"{out.finish_reason}: {out.error}"
    return cases, seconds


def _report_progress(engine: Any, done: threading.Event, total: int, every_s: float = 30.0) -> None:
    """Print the engine's progress to stderr every `every_s` seconds until `done`."""
    t0 = time.perf_counter()
    first = engine.stats()
    while not done.wait(every_s):
        s = engine.stats()
        finished = s.finished - first.finished
        tokens = s.generation_tokens - first.generation_tokens
        print(f"  {time.perf_counter() - t0:6.0f} s: {finished}/{total} finished, {s.running} running,"
              f" {tokens} tokens generated", file=sys.stderr, flush=True)


OUTCOMES = ("compile_error", "unclear_error", "too_long", "valid", "invalid", "cut", "error")


def summarize(cases: Sequence[Case]) -> dict[str, Any]:
    def counts(cs: Sequence[Case]) -> dict[str, int]:
        c = {o: sum(x.outcome == o for x in cs) for o in OUTCOMES}
        c["schemas"] = len(cs)
        c["compiled"] = len(cs) - c["compile_error"] - c["unclear_error"]
        c["generated"] = c["valid"] + c["invalid"] + c["cut"] + c["error"]
        return c

    by_source: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        by_source[case.source].append(case)
    lengths = [c.output_tokens for c in cases if c.outcome in ("valid", "invalid", "cut", "error")]
    return {
        "total": counts(cases),
        "sources": {name: counts(cs) for name, cs in sorted(by_source.items())},
        "output_tokens": {
            "sum": sum(lengths),
            "p50": statistics.median(lengths) if lengths else 0,
            "max": max(lengths) if lengths else 0,
        },
    }


def format_report(summary: dict[str, Any], cases: Sequence[Case]) -> str:
    cols = ("schemas", "compiled", "compile_error", "generated", "valid", "invalid", "cut", "error")
    heads = ("schemas", "compiled", "compile err", "generated", "valid", "INVALID", "cut off", "error")
    header = f"{'source':<24}" + "".join(f"{h:>12}" for h in heads)
    lines = [header, "-" * len(header)]
    for name, c in summary["sources"].items():
        lines.append(f"{name:<24}" + "".join(f"{c[k]:>12}" for k in cols))
    lines.append("-" * len(header))
    t = summary["total"]
    lines.append(f"{'TOTAL':<24}" + "".join(f"{t[k]:>12}" for k in cols))
    lines.append("")
    lines.append(f"schemas: {t['schemas']}; compiled: {t['compiled']}; compile errors (clear ConstraintError): {t['compile_error']};"
                 f" unclear compile failures: {t['unclear_error']} (must be 0); prompt too long: {t['too_long']}")
    lines.append(f"generated: {t['generated']}; valid (jsonschema, own draft + formats): {t['valid']};"
                 f" INVALID: {t['invalid']} (must be 0); cut off at max_tokens: {t['cut']}; finish error: {t['error']}")
    o = summary["output_tokens"]
    lines.append(f"output tokens: {o['sum']} in all, median {o['p50']}, max {o['max']}")
    for outcome in ("compile_error", "unclear_error", "too_long", "invalid", "cut", "error"):
        listed = [c for c in cases if c.outcome == outcome]
        if listed:
            lines.append("")
            lines.append(f"{outcome} ({len(listed)}):")
            for c in listed:
                lines.append(f"  {c.name}: {c.detail[:160]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", type=Path, default=None, help="MaskBench folder (default: shared/data/maskbench-dev)")
    parser.add_argument("--count", type=int, default=100, help="number of schemas (default 100)")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--max-schema-chars", type=int, default=4000, help="skip schemas whose compact JSON is longer")
    parser.add_argument("--max-string-length", type=int, default=None, help="ConstraintLimits.json_max_string_length (default: off)")
    parser.add_argument("--max-items", type=int, default=None, help="ConstraintLimits.json_max_items (default: off)")
    parser.add_argument("--max-properties", type=int, default=None, help="ConstraintLimits.json_max_properties (default: off)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0,
                        help="OpenAI frequency_penalty of every request (default 0: plain greedy)")
    parser.add_argument("--max-integer-digits", type=int, default=None,
                        help="ConstraintLimits.json_max_integer_digits (default: off)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--outputs", type=Path, default=None, help="write every case (with its output text) here, one JSON a line")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    from radixserve.runtime import Engine
    from radixserve.runtime.constraints import ConstraintLimits

    picks, skipped = select_schemas(args.data or data_dir(), args.count, args.max_schema_chars)
    t_start = time.perf_counter()
    limits = ConstraintLimits(json_max_string_length=args.max_string_length, json_max_items=args.max_items,
                              json_max_properties=args.max_properties, json_max_integer_digits=args.max_integer_digits)
    engine = Engine(args.model, device=args.device, constraints=limits)
    try:
        cases, seconds = run(engine, picks, args.max_tokens, frequency_penalty=args.frequency_penalty)
        device = str(engine.device)
        model = engine.model_name
    finally:
        engine.shutdown()
    summary = summarize(cases)
    summary.update(
        {"model": model, "device": device, "max_tokens": args.max_tokens, "max_schema_chars": args.max_schema_chars,
         "frequency_penalty": args.frequency_penalty,
         "json_bounds": {"max_string_length": args.max_string_length, "max_items": args.max_items,
                         "max_properties": args.max_properties,
                         "max_integer_digits": args.max_integer_digits},
         "skipped_for_size": skipped, "generation_s": seconds, "wall_s": time.perf_counter() - t_start}
    )
    print(f"schema-constrained generation: {len(picks)} MaskBench schemas ({skipped} files over {args.max_schema_chars} chars"
          f" not eligible), model {model} on {device}, greedy, max_tokens {args.max_tokens}, frequency_penalty"
          f" {args.frequency_penalty:g}")
    bounds = summary["json_bounds"]
    print("JSON bounds: " + (", ".join(f"{k} {v}" for k, v in bounds.items() if v is not None) if limits.bounds_json else
                             "off (the schemas as given)"))
    print(format_report(summary, cases))
    print(f"\ngeneration {seconds:.1f} s (all requests batched by the engine); wall {summary['wall_s']:.1f} s")
    if args.outputs:
        args.outputs.parent.mkdir(parents=True, exist_ok=True)
        with args.outputs.open("w", encoding="utf-8") as f:
            for case in cases:
                f.write(json.dumps(asdict(case), ensure_ascii=False) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    t = summary["total"]
    return 1 if t["invalid"] or t["unclear_error"] else 0


if __name__ == "__main__":
    sys.exit(main())
