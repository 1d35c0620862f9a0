"""The "application" of the container tests: writes, fsyncs and reads back records.

Run inside a container (``python3 app_writer.py DATA CTL``) with the volume at DATA and a
host directory at CTL. Record ``n`` (RECORD bytes, content derived from ``n``) is
written at offset ``n * RECORD`` and fsync'd; only then is ``n`` acknowledged: a line
``n <unix time>`` is appended to CTL/acks. Every few records an earlier acknowledged
record is read back and checked. An I/O error (a dead mount) is logged to CTL/errors and
the file is reopened by path, so a re-established mount is picked up; the failed record
is written again. Stops when CTL/stop appears, then writes CTL/summary.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time

RECORD = 4096
PAUSE = 0.02  # between records: a steady, modest load


def record(n: int) -> bytes:
    head = f"record {n:08d}\n".encode()
    seed = hashlib.sha256(head).digest()
    return (head + seed * (RECORD // len(seed) + 1))[:RECORD]


def main(data: str, ctl: str) -> int:
    path = os.path.join(data, "app.log")
    acks = open(os.path.join(ctl, "acks"), "a", buffering=1)  # noqa: SIM115
    errors = open(os.path.join(ctl, "errors"), "a", buffering=1)  # noqa: SIM115
    fd = -1
    n = reads = bad_reads = 0
    rng = random.Random(7)
    while not os.path.exists(os.path.join(ctl, "stop")):
        try:
            if fd < 0:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            os.pwrite(fd, record(n), n * RECORD)
            os.fsync(fd)
            acks.write(f"{n} {time.time():.6f}\n")
            n += 1
            if n % 5 == 0:
                k = rng.randrange(n)
                reads += 1
                if os.pread(fd, RECORD, k * RECORD) != record(k):
                    bad_reads += 1
                    errors.write(f"{time.time():.6f} bad read of record {k}\n")
        except OSError as exc:
            errors.write(f"{time.time():.6f} {exc.errno} {exc.strerror} (record {n})\n")
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                fd = -1
            time.sleep(0.05)
        time.sleep(PAUSE)
    with open(os.path.join(ctl, "summary.json"), "w") as f:
        json.dump({"acked": n, "reads": reads, "bad_reads": bad_reads}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
