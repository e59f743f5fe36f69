"""The `json` workload: constrained vs unconstrained decoding on the same prompts, same engine.

Requests ask the model (default: SmolLM2-135M-Instruct, real weights) for a JSON instance of a
JSON Schema from data/maskbench-dev (schemas that compile, small enough for the prompt, spread
over the sources). Each prompt runs twice on one engine, greedy: constrained to its schema, then
unconstrained with `ignore_eos` and `max_tokens` set to the length the constrained output had.
Both runs thus produce the same number of tokens per request with the same batch dynamics (a
constrained request that stops early would otherwise shrink the batch and lower tokens/s for
reasons unrelated to masking); the difference is the cost of the masks against the gain of the
fast-forwarded tokens, which enter the model several per step. Prompts are prefilled once
beforehand so both runs decode with a warm prefix cache; `--rounds` repeats the pair.

Reported: output tokens/s of each mode and their ratio (target >= 1.0: fast-forwarded tokens
pay for the masks), mask time per token p50/p99 (`TokenMatcher.fill_bitmask`, timed by wrapping
it for the duration of the run: nothing is added to the engine's hot path otherwise), the share
of output tokens that were fast-forwarded (forced by the grammar, appended without sampling),
and how many outputs are valid JSON for their schema.

`--json-whitespace N` compiles with `ConstraintLimits(json_max_whitespace=N)` (0 = compact JSON,
which forces more tokens); it replaces the engine's compiler before first use.

Run: `python -m benchmarks.json_bench [--requests 16] [--max-tokens 128] [--device auto]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from benchmarks.maskbench import data_dir, select_subset

SYSTEM = "You are a helpful assistant. You answer with JSON only."
USER = "Write one realistic example of a JSON value that conforms to this JSON Schema. Reply with the JSON only.\nSchema: {schema}"


@dataclass
class Timings:
    """What the wrapped TokenMatcher methods saw during a run."""

    mask_s: list[float] = field(default_factory=list)
    forced_tokens: int = 0
    consumed: int = 0


@contextmanager
def instrument_matchers(timings: Timings) -> Iterator[None]:
    """Time `fill_bitmask` and count forced/consumed tokens of every TokenMatcher while the
    context is open (class-level wrappers, restored on exit)."""
    from radixserve.runtime.constraints.matcher import TokenMatcher

    originals = (TokenMatcher.fill_bitmask, TokenMatcher.forced_tokens, TokenMatcher.consume)

    def fill_bitmask(self: Any, bitmask: Any, row: int) -> None:
        t0 = time.perf_counter()
        originals[0](self, bitmask, row)
        timings.mask_s.append(time.perf_counter() - t0)

    def forced_tokens(self: Any) -> list[int]:
        tokens = originals[1](self)
        timings.forced_tokens += len(tokens)
        return tokens

    def consume(self: Any, token_id: int) -> bool:
        timings.consumed += 1
        return originals[2](self, token_id)

    TokenMatcher.fill_bitmask, TokenMatcher.forced_tokens, TokenMatcher.consume = fill_bitmask, forced_tokens, consume  # type: ignore[method-assign]
    try:
        yield
    finally:
        TokenMatcher.fill_bitmask, TokenMatcher.forced_tokens, TokenMatcher.consume = originals  # type: ignore[method-assign]


def pick_schemas(count: int, max_chars: int = 1200) -> list[tuple[str, dict[str, Any]]]:
    """`count` (name, schema) pairs: compilable-looking, at most `max_chars` of JSON, spread
    evenly over the sorted sample. Compilation is checked by the caller."""
    files = sorted(data_dir().glob("*.json"))
    small = []
    for path in files:
        schema = json.loads(path.read_text(encoding="utf-8"))["schema"]
        text = json.dumps(schema, ensure_ascii=False)
        if len(text) <= max_chars and isinstance(schema, dict):
            small.append((path.name, schema))
    chosen = select_subset([Path(name) for name, _ in small], min(len(small), count * 3))
    by_name = dict(small)
    return [(p.name, by_name[p.name]) for p in chosen]


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json-whitespace", type=int, default=None, help="ConstraintLimits.json_max_whitespace (0 = compact)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (a shared machine is steadier with 1)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    import jsonschema

    from radixserve.runtime import Engine, SamplingParams
    from radixserve.runtime.constraints import ConstraintError, ConstraintLimits, ConstraintSpec

    limits = ConstraintLimits() if args.json_whitespace is None else ConstraintLimits(json_max_whitespace=args.json_whitespace)
    engine = Engine(args.model, device=args.device, constraints=limits)
    try:
        compiler = engine.constraints

        # schemas that compile, with their prompts
        cases: list[tuple[str, dict[str, Any], ConstraintSpec, str]] = []
        for name, schema in pick_schemas(args.requests):
            spec = ConstraintSpec.json_schema(schema)
            try:
                compiler.compile(spec)
            except ConstraintError:
                continue
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER.format(schema=json.dumps(schema, ensure_ascii=False))}]
            prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            cases.append((name, schema, spec, prompt))
            if len(cases) == args.requests:
                break
        prompts = [c[3] for c in cases]
        constrained = [SamplingParams(max_tokens=args.max_tokens, temperature=0.0, constraint=c[2]) for c in cases]

        # warm-up: the prompts enter the prefix cache; the model and masks warm up
        engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0))
        engine.generate(prompts[:2], constrained[:2])

        totals = {"unconstrained": [0, 0.0], "constrained": [0, 0.0]}
        ratios: list[float] = []
        timings = Timings()
        outputs: list[Any] = []
        same_length: list[Any] = []
        for round_index in range(args.rounds):
            # Greedy decoding is deterministic, so the lengths of round 0 hold for every round;
            # the order of the two modes alternates to cancel drift in the machine's speed.
            order = ("constrained", "unconstrained") if round_index % 2 == 0 else ("unconstrained", "constrained")
            seconds: dict[str, float] = {}
            for mode in order:
                if mode == "constrained":
                    with instrument_matchers(timings):
                        t0 = time.perf_counter()
                        results = engine.generate(prompts, constrained)
                        seconds[mode] = time.perf_counter() - t0
                    outputs = results
                    if not same_length:
                        lengths = [max(1, len(r.outputs[0].token_ids)) for r in results]
                        same_length = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
                else:
                    t0 = time.perf_counter()
                    results = engine.generate(prompts, same_length)
                    seconds[mode] = time.perf_counter() - t0
                totals[mode][1] += seconds[mode]
                totals[mode][0] += sum(len(r.outputs[0].token_ids) for r in results)
            ratios.append(seconds["unconstrained"] / seconds["constrained"])

        valid = 0
        for (name, schema, _, _), result in zip(cases, outputs):
            try:
                jsonschema.validate(json.loads(result.outputs[0].text), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
                pass
        finished = sum(r.outputs[0].finish_reason == "stop" for r in outputs)

        device = str(engine.device)
        if engine.device.type == "cuda":
            import torch

            device += f" ({torch.cuda.get_device_name(engine.device)})"
        print(f"json workload: {len(cases)} requests, max_tokens {args.max_tokens}, {args.rounds} round(s), model {engine.model_name} on {device}")
        print(f"{'mode':<15}{'output tokens':>14}{'seconds':>10}{'tokens/s':>11}")
        rates = {}
        for mode, (tokens, seconds) in totals.items():
            rates[mode] = tokens / seconds if seconds else float("nan")
            print(f"{mode:<15}{tokens:>14}{seconds:>10.2f}{rates[mode]:>11.1f}")
        out_tokens = totals["constrained"][0] // max(1, args.rounds)
        timings.forced_tokens //= max(1, args.rounds)
        print(f"mask time per token: p50 {_pct(timings.mask_s, 50) * 1e6:.0f} us, p99 {_pct(timings.mask_s, 99) * 1e6:.0f} us, mean {statistics.fmean(timings.mask_s) * 1e6 if timings.mask_s else float('nan'):.0f} us ({len(timings.mask_s)} masks)")
        print(f"fast-forwarded tokens: {timings.forced_tokens} of {out_tokens} constrained output tokens ({timings.forced_tokens / max(1, out_tokens):.1%})")
        print(f"constrained outputs valid for their schema: {valid} of {len(cases)} ({finished} finished by the grammar, the rest hit max_tokens)")
        print(f"per-round ratios: {', '.join(f'{r:.2f}' for r in ratios)}")
        print(f"constrained / unconstrained output tokens/s: {rates['constrained'] / rates['unconstrained']:.2f}x overall, median round {statistics.median(ratios):.2f}x  (target >= 1.0x)")
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
