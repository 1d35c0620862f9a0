"""Capacity: ENOSPC past the volume's capacity, df, and live resize."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    Cli,
    MiB,
    Mounter,
    assert_one_line_error,
    file_sha256,
    rand_bytes,
    sha256,
    wait_until,
    write_file,
)


def _fill(path: Path, total: int, seed: str) -> tuple[int, OSError | None]:
    """Write up to ``total`` bytes in 1 MiB writes, then fsync and close; return how many
    bytes write() accepted and the error (from write, fsync or close) if any."""
    written, error = 0, None
    data = rand_bytes(total, seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while written < total:
            written += os.write(fd, data[written:written + MiB])
        os.fsync(fd)
    except OSError as exc:
        error = exc
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            error = error or exc
    return written, error


def _df(path: Path) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize


def test_writes_past_capacity_fail_with_enospc(mounter: Mounter, cli: Cli) -> None:
    cli.create_volume("tiny", "8MiB")
    m = mounter.mount("tiny")
    keep = rand_bytes(5 * MiB, "keep")
    write_file(m / "keep", keep)
    # once the mount knows the usage (df shows it), write() itself refuses the overflow
    wait_until(lambda: _df(m.path)[1] >= 5 * MiB, 10, what="df to show the used space")
    written, error = _fill(m / "overflow", 6 * MiB, "overflow")
    assert error is not None and error.errno == errno.ENOSPC, f"no ENOSPC: {error!r}"
    assert written <= 3 * MiB, f"write() accepted {written} bytes past the capacity"
    assert cli.used("tiny") <= 8 * MiB
    size, used = _df(m.path)
    assert size == 8 * MiB and used <= 8 * MiB
    assert file_sha256(m / "keep") == sha256(keep), "data written before ENOSPC was damaged"
    # many small (inline) files count too
    errors = []
    for i in range(400):
        try:
            write_file(m / f"small{i}", rand_bytes(10_000, i), fsync=False)
        except OSError as exc:
            errors.append(exc.errno)
            break
    assert errors == [errno.ENOSPC]
    # freeing space makes room again
    os.unlink(m / "overflow")
    for i in range(400):
        if (m / f"small{i}").exists():
            os.unlink(m / f"small{i}")
    wait_until(lambda: cli.used("tiny") <= 5 * MiB + 100, 10, what="space to be freed")
    write_file(m / "fits", rand_bytes(2 * MiB, "fits"))
    assert file_sha256(m / "fits") == sha256(rand_bytes(2 * MiB, "fits"))
    # nothing of the refused writes lingers: no dirty bytes, no phantom usage, clean unmount
    st = m.status()
    assert st["dirty_bytes"] == 0, st
    assert _df(m.path)[1] <= 7 * MiB + 4096  # df counts 4 KiB blocks; names cost bytes too
    log = m.log_file
    mounter.umount(m)
    assert "flush at unmount failed" not in log.read_text()


def test_resize_takes_effect_on_a_live_mount(mounter: Mounter, cli: Cli) -> None:
    cli.create_volume("grow", "6MiB")
    m = mounter.mount("grow")
    assert _df(m.path)[0] == 6 * MiB
    _, error = _fill(m / "a", 8 * MiB, "a")
    assert error is not None and error.errno == errno.ENOSPC
    os.unlink(m / "a")
    cli.run("volume", "resize", "grow", "--capacity", "24MiB")
    wait_until(lambda: _df(m.path)[0] == 24 * MiB, 10, what="df to show the new capacity")
    data = rand_bytes(12 * MiB, "big")
    write_file(m / "big", data)  # would not have fitted before
    assert file_sha256(m / "big") == sha256(data)
    # shrinking below what is used is refused and changes nothing
    proc = cli.run("volume", "resize", "grow", "--capacity", "4MiB", check=False)
    assert_one_line_error(proc)
    assert cli.info("grow")["capacity"] == 24 * MiB
    # shrinking to a size that still fits works, also live
    cli.run("volume", "resize", "grow", "--capacity", "16MiB")
    wait_until(lambda: _df(m.path)[0] == 16 * MiB, 10, what="df to show the smaller capacity")
    _, error = _fill(m / "more", 8 * MiB, "more")
    assert error is not None and error.errno == errno.ENOSPC
