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


@pytest.fixture
def pool_at_rest():
    """Returns a check that no page is private or locked once every request ended."""
    return assert_pool_at_rest


def assert_pool_at_rest(engine: Engine) -> None:
    engine.wait_idle()
    engine.check_integrity()
    stats = engine.stats()
    assert stats.private_pages == 0
    assert stats.locked_pages == 0
    assert stats.free_pages + stats.evictable_pages == stats.total_pages
