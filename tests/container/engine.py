"""A Docker engine of the test session's own, the base image and the chunkfs-csi image.

``DockerEngine.start`` runs Debian's ``dockerd`` with its data and exec roots under one
directory, ``--bridge=none --iptables=false`` (no bridge network, no firewall changes:
every container runs with ``--network host`` and talks to the test services on
loopback), and ``stop`` ends it by PID. The data root is kept between sessions (under
``.docker-test/`` of the checkout) so that the base image and the build cache survive;
a lock file keeps two sessions of one checkout from sharing it.

No registry is reachable on the development machines, so the base image the Dockerfile
names (``debian:bookworm-slim``) is made with ``debootstrap --variant=minbase bookworm``
from the apt mirror this machine uses and ``docker import``-ed under that tag, unless the
engine already has it. The Dockerfile itself is the one users build anywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

BASE_IMAGE = "debian:bookworm-slim"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


class EngineUnavailable(Exception):
    """No Docker engine can run here (the reason is the message)."""


def _docker_cli() -> str | None:
    # Debian's client matches Debian's engine (a newer client may need buildx for BuildKit)
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class DockerEngine:
    """One dockerd and its client; every container it runs is removed by ID at stop."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.pidfile = root / "docker.pid"
        self.log = root / "dockerd.log"
        self.cli = _docker_cli()
        self.proc: subprocess.Popen[bytes] | None = None
        self.containers: list[str] = []
        self._lock: int | None = None

    # -- lifetime --

    def start(self, timeout: float = 60.0) -> DockerEngine:
        if os.geteuid() != 0:
            raise EngineUnavailable("dockerd needs root")
        dockerd = shutil.which("dockerd")
        if dockerd is None or self.cli is None:
            raise EngineUnavailable("dockerd/docker not installed (Debian's docker.io; "
                                    "scripts/setup.sh installs it)")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.root / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            self._lock = None
            raise EngineUnavailable(f"another test session uses {self.root}") from None
        self._stop_leftover()
        argv = [dockerd, "--data-root", str(self.root / "data"),
                "--exec-root", str(self.root / "exec"), "--pidfile", str(self.pidfile),
                "--host", f"unix://{self.socket}", "--bridge=none", "--iptables=false",
                "--ip6tables=false", "--log-level=warn"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise EngineUnavailable(f"dockerd exited ({self.proc.returncode}): "
                                        + self.log_tail())
            if self.socket.exists() and self.docker("version", check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise EngineUnavailable("dockerd did not answer: " + self.log_tail())
            time.sleep(0.2)
        self._remove_stale_containers()
        return self

    def _stop_leftover(self) -> None:
        """A dockerd of an earlier session on this root that was not stopped (killed)."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        if _pid_alive(pid) and str(self.root / "data") in _cmdline(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    def _remove_stale_containers(self) -> None:
        ids = self.docker("ps", "-aq", check=False).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False)

    def stop(self) -> None:
        for cid in reversed(self.containers):
            self.docker("rm", "-f", cid, check=False)
        self.containers.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        # dockerd leaves its default network namespace bind-mounted under the exec root
        exec_root = str(self.root / "exec") + "/"
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            leftovers = [ln.split()[4] for ln in f if ln.split()[4].startswith(exec_root)]
        for path in sorted(leftovers, reverse=True):
            subprocess.run(["umount", "-l", path], capture_output=True, check=False)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- the client --

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "1"}

    def docker(self, *args: str, check: bool = True, timeout: float = 120.0,
               input_: bytes | None = None) -> subprocess.CompletedProcess[str]:
        assert self.cli is not None
        proc = subprocess.run([self.cli, *args], env=self.env, capture_output=True,
                              timeout=timeout, check=False, text=input_ is None,
                              input=input_)
        if isinstance(proc.stdout, bytes):
            proc = subprocess.CompletedProcess(proc.args, proc.returncode,
                                               proc.stdout.decode(errors="replace"),
                                               proc.stderr.decode(errors="replace"))
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:3])} failed ({proc.returncode}): "
                                 f"{proc.stderr.strip()[-2000:]}")
        return proc

    def run(self, args: Sequence[str]) -> str:
        """``docker run -d ARGS``; the container is removed at stop."""
        cid = self.docker("run", "-d", *args).stdout.strip()
        self.containers.append(cid)
        return cid

    def remove(self, cid: str) -> None:
        self.docker("rm", "-f", cid, check=False)
        with contextlib.suppress(ValueError):
            self.containers.remove(cid)

    def inspect(self, ref: str, kind: str = "container") -> dict:
        return json.loads(self.docker(kind, "inspect", ref).stdout)[0]

    def has_image(self, ref: str) -> bool:
        return self.docker("image", "inspect", ref, check=False).returncode == 0

    def logs(self, cid: str, tail: int = 60) -> str:
        proc = self.docker("logs", "--tail", str(tail), cid, check=False)
        return (proc.stdout + proc.stderr).strip()

    def running(self, cid: str) -> bool:
        proc = self.docker("inspect", "-f", "{{.State.Running}}", cid, check=False)
        return proc.stdout.strip() == "true"


# --- images ---------------------------------------------------------------------------

def apt_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 or one-line sources)."""
    sources = [Path("/etc/apt/sources.list")]
    sources += sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for path in sources:
        with contextlib.suppress(OSError):
            text = path.read_text()
            for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
                uri = match.group(1).rstrip("/")
                if uri.endswith("/debian"):
                    return uri
    return DEFAULT_MIRROR


def ensure_base_image(engine: DockerEngine, workdir: Path, log: Path) -> None:
    """``debian:bookworm-slim`` in the engine: pulled already, or made by debootstrap."""
    if engine.has_image(BASE_IMAGE):
        return
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise EngineUnavailable(f"no {BASE_IMAGE} image and no debootstrap to make one "
                                "(scripts/setup.sh installs it)")
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=workdir))
    try:
        with open(log, "ab") as out:
            proc = subprocess.run([debootstrap, "--variant=minbase", "bookworm", str(rootfs),
                                   apt_mirror()], stdout=out, stderr=out, timeout=900,
                                  check=False)
        if proc.returncode != 0:
            raise AssertionError(f"debootstrap failed ({proc.returncode}); see {log}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
            (rootfs / junk).mkdir(parents=True, exist_ok=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        imported = subprocess.run([engine.cli or "docker", "import", "-", BASE_IMAGE],
                                  stdin=tar.stdout, env=engine.env, capture_output=True,
                                  timeout=300, check=False)
        tar.stdout.close()
        tar.wait()
        if imported.returncode != 0:
            raise AssertionError(f"docker import failed: {imported.stderr.decode()[-500:]}")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def build_image(engine: DockerEngine, repo: Path, tag: str, log: Path) -> float:
    """``scripts/build-image.sh TAG`` against this engine; returns the seconds it took."""
    env = {**engine.env, "DOCKER": engine.cli or "docker", "BUILD_NETWORK": "host"}
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():  # this machine's CA bundle (pip behind a TLS-intercepting proxy)
        env["PIP_CA_BUNDLE"] = str(bundle)
    started = time.monotonic()
    with open(log, "ab") as out:
        proc = subprocess.run(["bash", str(repo / "scripts/build-image.sh"), tag], env=env,
                              stdout=out, stderr=out, timeout=1800, check=False)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise AssertionError(f"the image build failed ({proc.returncode}):\n{tail}")
    return time.monotonic() - started
