"""Write buffers under pressure, a full volume, and two nodes rewriting one file.

- The mount-wide write budget always makes progress: partial blocks of other open files
  are uploaded when the budget is spent, and a wait that makes no progress (S3 stopped)
  ends with EIO instead of leaving the writer stuck in the kernel.
- Capacity is charged at write time, holes included, and freeing space (truncate, O_TRUNC,
  unlink) always works on a full volume.
- Two mounts rewriting one file whole leave one complete version, never a mix.
"""

from __future__ import annotations

import errno
import os

import pytest

from devstack.localstack import LocalStack
from tests.faultproxy import FaultProxy
from tests.integration.fs_fixtures import *  # noqa: F403 - the fixtures
from tests.integration.fs_fixtures import (
    Cli,
    KiB,
    MiB,
    Mounter,
    file_sha256,
    make_env,
    rand_bytes,
    run_bounded,
    sha256,
    wait_until,
)


def test_a_full_write_budget_uploads_partial_blocks_of_other_open_files(
        mounter: Mounter, volume: str) -> None:
    """The issue's repro: 8 MiB of buffers, three open files with 4 MiB - 4 KiB each."""
    m = mounter.mount(volume, options="buffer-size=8MiB")
    bodies = [rand_bytes(4 * MiB - 4 * KiB, f"p{i}") for i in range(3)]
    fds = [os.open(m / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644) for i in range(3)]
    try:
        for fd, body in zip(fds, bodies, strict=True):
            out = run_bounded(lambda fd=fd, body=body: os.write(fd, body), 60)
            assert not out.hung, "a write waited forever on the write budget"
            assert out.error is None, out.error
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    for i, body in enumerate(bodies):
        assert file_sha256(m / f"f{i}") == sha256(body)
    assert m.status()["dirty_bytes"] == 0


def test_many_open_files_with_partial_blocks_share_a_small_budget(mounter: Mounter, volume: str) -> None:
    m = mounter.mount(volume, options="buffer-size=8MiB")
    bodies = [rand_bytes(1 * MiB + 7 * i, f"m{i}") for i in range(12)]
    fds = [os.open(m / f"g{i}", os.O_RDWR | os.O_CREAT, 0o644) for i in range(len(bodies))]
    try:
        for round_ in range(2):  # a second round rewrites blocks that pressure uploaded
            for fd, body in zip(fds, bodies, strict=True):
                out = run_bounded(lambda fd=fd, body=body: os.pwrite(fd, body, 0), 60)
                assert not out.hung and out.error is None, (round_, out.error)
        for fd, body in zip(fds, bodies, strict=True):
            assert os.pread(fd, len(body), 0) == body
    finally:
        for fd in fds:
            os.close(fd)
    for i, body in enumerate(bodies):
        assert file_sha256(m / f"g{i}") == sha256(body)


@pytest.mark.mount_log_allows(
    "s3 retry", "block upload failed", "operation failed",
    reason="S3 replies are held, then connections refused on purpose: uploads wait, fail "
           "and are retried")
@pytest.mark.mount_log_allows(
    "Task exception was never retrieved",
    reason="DEFECT (aiohttp 3.14, chunkfs/objstore.py owner): a connection reset while "
           "aiohttp sends a PUT's headers fails its internal write_bytes task, which nobody "
           "awaits; the PUT itself fails and is retried")
def test_many_open_files_on_a_full_budget_wait_out_a_slow_s3_and_never_hang_on_a_dead_one(
        s3_proxy: FaultProxy, mounter: Mounter, cli: Cli) -> None:
    """A full write buffer shared by many open files while S3 is slow (its replies held,
    inside the io-timeout): every write completes, only later. While S3 refuses every
    connection: each write returns (EIO at worst) within a bounded time, never stuck in
    the kernel. Once S3 is back the same open files take writes and fsyncs again."""
    # (s3_proxy first: torn down after the mounter, it outlives every mount)
    io_timeout = 4
    env = make_env({**cli.env, "AWS_ENDPOINT_URL": s3_proxy.url})
    m = mounter.mount("vol" if "vol" in cli.volume_names() else cli.create_volume("vol"),
                      env=env, options=f"buffer-size=8MiB,io-timeout={io_timeout}")
    n = 10
    fds = [os.open(m / f"g{i}", os.O_RDWR | os.O_CREAT, 0o644) for i in range(n)]

    def write_round(tag: str, limit: float) -> list[BaseException | None]:
        errors = []
        for i, fd in enumerate(fds):
            body = rand_bytes(MiB + 3 * i, f"{tag}{i}")
            out = run_bounded(lambda fd=fd, body=body: os.pwrite(fd, body, 0), limit)
            assert not out.hung, f"{tag}: a write stayed blocked on the write budget"
            errors.append(out.error)
        return errors

    try:
        s3_proxy.hold_replies(2.0)  # slow: 10 MiB written into 8 MiB of buffers
        assert write_round("slow", 60) == [None] * n
        assert s3_proxy.wait_held(0), "no S3 reply was held: the budget never waited"
        s3_proxy.refuse()
        s3_proxy.drop()
        try:
            errors = write_round("dead", 4 * io_timeout + 20)
        finally:
            s3_proxy.pass_through()
        wrong = [e for e in errors if e is not None
                 and not (isinstance(e, OSError) and e.errno == errno.EIO)]
        assert not wrong, f"with S3 refusing connections: expected success or EIO, got {wrong}"
        assert any(errors), "10 MiB went into 8 MiB of buffers with S3 down and nothing failed"
        bodies = [rand_bytes(MiB + 3 * i, f"back{i}") for i in range(n)]
        for i, (fd, body) in enumerate(zip(fds, bodies, strict=True)):
            out = run_bounded(lambda fd=fd, body=body: os.pwrite(fd, body, 0), 60)
            assert not out.hung and out.error is None, out.error
            # the first fsync may still report an upload that failed during the outage
            # (once: its bytes stayed buffered); the next one stores everything
            first = run_bounded(lambda fd=fd: os.fsync(fd), 60)
            assert not first.hung, f"g{i}: fsync stayed blocked after S3 came back"
            if first.error is not None:
                assert isinstance(first.error, OSError) and first.error.errno == errno.EIO
                out = run_bounded(lambda fd=fd: os.fsync(fd), 60)
                assert not out.hung and out.error is None, f"g{i}: {out.error!r}"
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass  # data of the outage that could not be stored: the close says so
    m = mounter.remount(m, cache_dir=mounter.new_dir("cache"), env=env)
    for i, body in enumerate(bodies):
        assert file_sha256(m / f"g{i}") == sha256(body), f"g{i}"


@pytest.mark.mount_log_allows("block upload failed", "operation failed",
                              reason="S3 is stopped on purpose: uploads and the write fail")
def test_a_write_waiting_on_a_full_budget_fails_with_eio_when_s3_takes_nothing(
        mounter: Mounter, volume: str, local_services: LocalStack) -> None:
    s3 = local_services.s3
    assert s3 is not None
    io_timeout = 4
    m = mounter.mount(volume, options=f"buffer-size=8MiB,io-timeout={io_timeout}")
    fd = os.open(m / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        s3.pause()
        try:
            def fill() -> None:
                for i in range(64):
                    os.write(fd, rand_bytes(MiB, i))
            out = run_bounded(fill, 4 * io_timeout + 20)
        finally:
            s3.resume()
        out.wait(60)
        assert not out.hung, "a writer stayed blocked on the write budget while S3 was stopped"
        assert isinstance(out.error, OSError) and out.error.errno == errno.EIO, out.error
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # its data could not be stored during the outage: the close says so


def _df_used(path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_writes_into_holes_get_enospc_at_write_time_and_freeing_space_always_works(
        mounter: Mounter, cli: Cli) -> None:
    """The issue's repro: 8 MiB volume, truncate -s 64M, then 12 MiB written into the hole."""
    cli.create_volume("holes", "8MiB")
    m = mounter.mount("holes")
    f = m / "f"
    with open(f, "wb") as fh:
        fh.truncate(64 * MiB)
    fd = os.open(f, os.O_WRONLY)  # like dd conv=notrunc
    written, error = 0, None
    try:
        data = rand_bytes(12 * MiB, "h")
        while written < len(data):
            written += os.pwrite(fd, data[written:written + MiB], written)
    except OSError as exc:
        error = exc
    finally:
        close_error = None
        try:
            os.close(fd)
        except OSError as exc:
            close_error = exc
    assert error is not None and error.errno == errno.ENOSPC, f"write() accepted {written} bytes"
    assert written <= 8 * MiB
    assert close_error is None, f"what write() accepted must commit: {close_error!r}"
    assert cli.used("holes") <= 8 * MiB
    # the volume is (nearly) full: shrinking, O_TRUNC and unlink still work
    os.truncate(f, 3 * MiB)
    assert os.stat(f).st_size == 3 * MiB
    with open(f, "wb") as fh:  # O_TRUNC
        fh.write(b"small")
    assert f.read_bytes() == b"small"
    os.unlink(f)
    wait_until(lambda: cli.used("holes") == 0, 10, what="the space to be freed")


def test_truncate_works_while_other_data_of_the_file_cannot_commit(mounter: Mounter, cli: Cli) -> None:
    cli.create_volume("full", "8MiB")
    m = mounter.mount("full")
    fd = os.open(m / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, rand_bytes(6 * MiB, "a"), 0)  # accepted, not committed yet
        # the 6 MiB no longer fit (in this process: a subprocess would flush our fd)
        cli.call(lambda svc: svc.resize_volume("full", 5 * MiB))
        os.ftruncate(fd, MiB)  # cuts the uncommitted data: what is left fits
        os.fsync(fd)
        assert os.pread(fd, MiB, 0) == rand_bytes(6 * MiB, "a")[:MiB]
    finally:
        os.close(fd)
    assert cli.used("full") == MiB + len(b"f")  # the data and the entry's name


def test_two_mounts_rewriting_one_file_leave_the_last_closed_version_whole(
        mounter: Mounter, volume: str) -> None:
    a, b = mounter.mount(volume), mounter.mount(volume)
    big, small = rand_bytes(8 * MiB + 100, "big"), rand_bytes(4 * MiB - 5, "small")
    for first, last in ((a, b), (b, a)):
        fa = open(first / "shared", "wb")  # noqa: SIM115 - both open before either closes
        fb = open(last / "shared", "wb")  # noqa: SIM115
        fa.write(big)
        fb.write(small)
        fa.close()
        fb.close()  # closed last: its version wins, whole
        for m in (a, b):
            with open(m / "shared", "rb") as fh:  # close-to-open: a fresh open sees it
                assert sha256(fh.read()) == sha256(small), m
        big, small = small, big


@pytest.mark.mount_log_allows("s3 retry", "block upload failed", "operation failed",
                              reason="S3 refuses connections on purpose: the last close fails")
@pytest.mark.mount_log_allows(
    "Task exception was never retrieved",
    reason="DEFECT (aiohttp 3.14, chunkfs/objstore.py owner): a connection reset while "
           "aiohttp sends a PUT's headers fails its internal write_bytes task, which nobody "
           "awaits; the PUT itself fails and is retried")
def test_an_unlinked_file_whose_data_cannot_be_stored_gives_its_buffers_back_at_purge(
        s3_proxy: FaultProxy, mounter: Mounter, cli: Cli) -> None:
    """The last close of an unlinked file purges it; when its data could not be stored
    (S3 down), the purge drops the buffers, and the budget gets them back."""
    # (s3_proxy first: torn down after the mounter, it outlives every mount)
    env = make_env({**cli.env, "AWS_ENDPOINT_URL": s3_proxy.url})
    m = mounter.mount(cli.create_volume("vol"), env=env, options="buffer-size=8MiB,io-timeout=3")
    fds = [os.open(m / f"gone{i}", os.O_WRONLY | os.O_CREAT, 0o644) for i in range(3)]
    for i, fd in enumerate(fds):
        os.write(fd, rand_bytes(2 * MiB, f"gone{i}"))  # partial blocks: buffered
        os.unlink(m / f"gone{i}")
    assert m.status_direct()["write_buffer"]["used"] >= 6 * MiB
    s3_proxy.refuse()
    s3_proxy.drop()
    try:
        for fd in fds:
            out = run_bounded(lambda fd=fd: os.close(fd), 30)
            assert not out.hung, "the last close of an unlinked file hung"
            assert out.error is None or (isinstance(out.error, OSError)
                                         and out.error.errno == errno.EIO), out.error
        # (RELEASE, which purges, reaches the mount after close() returned)
        wait_until(lambda: (st := m.status_direct())["open_files"] == 0
                   and st["write_buffer"]["used"] == 0 and st["dirty_bytes"] == 0,
                   20, what=lambda: f"the purges to free every buffer: {m.status_direct()}")
    finally:
        s3_proxy.pass_through()
    # the budget is whole again: 8 MiB of new partial blocks fit without waiting on S3
    s3_proxy.refuse()
    s3_proxy.drop()
    try:
        news = [os.open(m / f"new{i}", os.O_WRONLY | os.O_CREAT, 0o644) for i in range(3)]
        for i, fd in enumerate(news):
            out = run_bounded(lambda fd=fd, i=i: os.write(fd, rand_bytes(2 * MiB, f"new{i}")), 30)
            assert not out.hung and out.error is None, out.error
    finally:
        s3_proxy.pass_through()
    for fd in news:
        os.close(fd)
    for i in range(3):
        assert file_sha256(m / f"new{i}") == sha256(rand_bytes(2 * MiB, f"new{i}"))


@pytest.mark.mount_log_allows("writer lease revoked: fencing this mount", "operation failed",
                              reason="the test fences the mount: its flushes fail")
def test_a_fenced_mount_gives_back_the_buffers_of_the_files_it_can_no_longer_commit(
        mounter: Mounter, cli: Cli, volume: str) -> None:
    m = mounter.mount(volume, options="epoch=1,buffer-size=8MiB")
    fds = [os.open(m / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644) for i in range(3)]
    for fd in fds:
        os.write(fd, rand_bytes(2 * MiB, fd))  # buffered, never committed
    assert m.status_direct()["write_buffer"]["used"] >= 6 * MiB
    cli.call(lambda svc: svc.acquire_writer(volume, "another-node"))  # the lease moves on
    wait_until(lambda: m.status_direct()["fenced"], 10, what="the mount to notice the fence")
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:
            assert exc.errno == errno.EIO
    st = m.status_direct()
    assert st["write_buffer"]["used"] == 0 and st["dirty_bytes"] == 0, st
    assert st["open_files"] == 0, st
