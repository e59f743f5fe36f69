"""Workload generators from BENCHMARKS.md, as token ids so every system sees identical input.

Prompts are random token ids drawn from the ordinary-text part of the vocabulary (no special
tokens), with a fixed seed. Generation uses `ignore_eos`, so each request produces exactly
its output length and the work is the same for every system.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    max_tokens: int
    group: str = ""


@dataclass(frozen=True)
class GSPShape:
    groups: int
    prompts_per_group: int
    prefix_len: int
    question_len: int
    output_len: int


GSP_SHAPES = {
    "gsp": GSPShape(64, 16, 2048, 128, 256),
    "gsp-cpu": GSPShape(4, 8, 512, 32, 32),
}


def random_ids(rng: random.Random, n: int, low: int, high: int) -> list[int]:
    return [rng.randrange(low, high) for _ in range(n)]


def gsp(shape: GSPShape, vocab: tuple[int, int], seed: int = 0) -> list[BenchRequest]:
    """Groups of prompts sharing a long system prompt, shuffled (SGLang's generated-shared-prefix)."""
    rng = random.Random(seed)
    reqs = []
    for g in range(shape.groups):
        system = random_ids(rng, shape.prefix_len, *vocab)
        for _ in range(shape.prompts_per_group):
            question = random_ids(rng, shape.question_len, *vocab)
            reqs.append(BenchRequest(system + question, shape.output_len, group=f"g{g}"))
    rng.shuffle(reqs)
    return reqs


def gsp_optimal_hit_tokens(shape: GSPShape, page_size: int = 1) -> int:
    """Cached prompt tokens when each group's prefix is computed exactly once."""
    shareable = shape.prefix_len // page_size * page_size
    return shape.groups * (shape.prompts_per_group - 1) * shareable


@dataclass(frozen=True)
class AgentShape:
    agents: int
    turns: int
    first_prompt_len: int
    tool_result_len: int
    output_len: int


AGENT_SHAPES = {
    "agent": AgentShape(32, 8, 256, 200, 64),
    "agent-cpu": AgentShape(8, 4, 256, 100, 32),
}


def tool_results(shape: AgentShape, vocab: tuple[int, int], seed: int = 0) -> list[list[list[int]]]:
    """Per agent, per turn: the new tokens appended to the history before that turn (the task
    for turn 0, a tool result afterwards)."""
    rng = random.Random(seed)
    return [
        [
            random_ids(rng, shape.first_prompt_len if t == 0 else shape.tool_result_len, *vocab)
            for t in range(shape.turns)
        ]
        for _ in range(shape.agents)
    ]
