"""`chunkfs gc` as an operator runs it: a progress bar on a terminal, one summary line
otherwise, and the run's outcome where `volume info` shows it."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import subprocess
import time

from chunkfs.objstore import block_key
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import Cli


def put_garbage(cli: Cli, n: int) -> None:
    """``n`` block objects nothing references (then old enough for --grace 0)."""
    async def put(svc) -> None:
        for i in range(n):
            body = f"garbage {i} {time.time()}".encode()
            await svc.store.put(block_key(hashlib.sha256(body).hexdigest(), len(body)), body)

    cli.call(put)
    time.sleep(1.1)  # S3 times have whole seconds


def test_gc_on_a_terminal_draws_a_progress_bar_then_prints_its_summary(cli: Cli, volume: str) -> None:
    put_garbage(cli, 3)
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(["chunkfs", "gc", "--grace", "0"], env=cli.env, stdout=subprocess.PIPE,
                              stderr=slave, text=True, timeout=120, check=False)
        os.close(slave)
        slave = -1
        drawn = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, drawn
    screen = drawn.decode()
    assert "gc: deleting" in screen and "[" + "#" * 30 + "] 100% 3/3" in screen, screen
    assert "gc: listing objects" in screen and screen.endswith("\r\x1b[K")  # line cleared
    assert proc.stdout.count("\n") == 1 and "deleted 3 " in proc.stdout


def test_gc_without_a_terminal_prints_only_its_summary(cli: Cli, volume: str) -> None:
    put_garbage(cli, 2)
    out = cli.run("gc", "--grace", "0", "--dry-run")
    assert out.stderr == "" and "\x1b" not in out.stdout
    assert out.stdout.count("\n") == 1 and "would delete 2 " in out.stdout
    out = cli.run("gc", "--grace", "0", "--work-dir", "/nonexistent/dir", check=False)
    assert out.returncode != 0 and "/nonexistent/dir" in out.stderr
    assert out.stderr.count("\n") == 1
    info = json.loads(cli.run("volume", "info", volume, "--json").stdout)
    assert info["last_gc"]["dry_run"] and info["last_gc"]["ok"]
