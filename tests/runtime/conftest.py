"""Shared fixtures for engine-level tests: one engine per page size for the whole session, and
transformers' own model over the same weights as the reference."""

from __future__ import annotations

import pytest

from radixserve.runtime import Engine


@pytest.fixture(scope="session")
def engine_p1() -> Engine:
    engine = Engine(model="default", page_size=1, max_batch_tokens=1024)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def engine_p16() -> Engine:
    engine = Engine(model="default", page_size=16, max_batch_tokens=1024)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def hf_model(engine_p1: Engine):
    """transformers' LlamaForCausalLM over the folder the engine loaded (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(engine_p1.model_path), dtype="float32")
    model.eval()
    return model


@pytest.fixture(scope="session")
def pool_at_rest():
    """Returns a check that no page is private or locked once every request ended."""
    return assert_pool_at_rest


@pytest.fixture(scope="session")
def eager_graphs():
    """Returns enable(engine, max_bs, max_steps=1) -> runner: the engine's decode batches then go
    through the CUDA-graph input path (padded static buffers, bursts up to max_steps), run
    eagerly on the CPU."""
    return enable_eager_graphs


def enable_eager_graphs(engine: Engine, max_bs: int, max_steps: int = 1):  # noqa: ANN201 - a ModelRunner
    runner, config = engine._loop.runner, engine.model_config
    engine.call_on_loop(lambda: runner.enable_cuda_graphs(
        max_bs=max_bs, max_model_len=engine.max_model_len, dummy_page=engine.kv_cache.num_pages - 1,
        num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, use_graphs=False, max_steps=max_steps))
    return runner


def assert_pool_at_rest(engine: Engine) -> None:
    engine.wait_idle()
    engine.check_integrity()
    stats = engine.stats()
    assert stats.private_pages == 0
    assert stats.locked_pages == 0
    assert stats.free_pages + stats.evictable_pages == stats.total_pages
