"""The mount's event loop is the one $CHUNKFS_EVENT_LOOP names (chunkfs/eventloop.py)."""

from __future__ import annotations

import asyncio

import pytest

from chunkfs import eventloop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize(("value", "module"), [("uvloop", "uvloop"), ("asyncio", "asyncio"),
                                              (" UVLOOP ", "uvloop")])
def test_the_named_loop_runs_the_mount(monkeypatch: pytest.MonkeyPatch, value: str,
                                       module: str) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.setenv(eventloop.ENV, value)
    assert eventloop.run(_loop_module()).startswith(module)


def test_unset_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.chosen() == eventloop.DEFAULT


def test_an_unknown_loop_is_refused_with_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "tokio")
    with pytest.raises(ValueError, match="uvloop, asyncio"):
        eventloop.chosen()
