"""A mount's startup steps run together: results in order, and the first failure wins
at once (the others are cancelled, not waited for)."""

from __future__ import annotations

import asyncio
import time

import pytest

from chunkfs.errors import MetaUnavailable, VolumeNotFound
from chunkfs.startup import Timeline, process_age, together


async def test_together_returns_every_result_in_argument_order() -> None:
    async def after(seconds: float, value: str) -> str:
        await asyncio.sleep(seconds)
        return value

    started = time.monotonic()
    assert await together(after(0.05, "a"), after(0.01, "b"), after(0.03, "c")) == ["a", "b", "c"]
    assert time.monotonic() - started < 0.5  # concurrently, not one after the other


async def test_the_first_failure_cancels_the_rest_and_is_raised() -> None:
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def missing() -> None:
        await asyncio.sleep(0.01)
        raise VolumeNotFound("volume 'x' not found")

    started = time.monotonic()
    with pytest.raises(VolumeNotFound):
        await together(slow(), missing())
    assert cancelled.is_set() and time.monotonic() - started < 5


async def test_failures_at_the_same_moment_report_the_first_in_argument_order() -> None:
    async def fail(exc: Exception) -> None:
        raise exc

    with pytest.raises(MetaUnavailable):
        await together(fail(MetaUnavailable("redis")), fail(VolumeNotFound("v")))


async def test_a_cancelled_startup_cancels_its_steps() -> None:
    cancelled = asyncio.Event()

    async def step() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.create_task(together(step()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()


def test_the_timeline_counts_from_the_start_and_knows_the_process_age() -> None:
    clock = Timeline()
    clock.mark("one")
    doc = clock.as_dict()
    assert 0 <= doc["one"] < 1000 and doc["process_age_at_start"] >= 0
    assert process_age() > 0  # this process started before this test
