"""The README's first two commands work in a fresh Debian root shell (no sudo there) and
from a user: CI runs exactly the README's test command."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_commands_need_no_sudo():
    commands = readme_commands()
    assert commands == ["bash scripts/local-stack.sh up", "bash scripts/test.sh"]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert readme_commands()[1] in [line.strip() for line in ci]


@pytest.mark.parametrize("script", ["scripts/test.sh", "scripts/local-stack.sh"])
def test_without_root_or_sudo_the_scripts_say_so(script, nonroot_user, tmp_path):
    # a user without sudo on PATH: a clear message, exit 1, nothing run
    if subprocess.run(["bash", "-c", "PATH=/usr/bin:/bin command -v sudo"],
                      capture_output=True).returncode == 0:
        pytest.skip("sudo is installed here: the script would re-run itself through it")
    proc = subprocess.run(
        ["setpriv", f"--reuid={nonroot_user.uid}", f"--regid={nonroot_user.gid}",
         "--clear-groups", "env", "PATH=/usr/bin:/bin", f"HOME={tmp_path}", "bash",
         str(ROOT / script), "env"], capture_output=True, text=True, timeout=30,
        cwd=tmp_path)
    assert proc.returncode == 1
    assert "run as root (no sudo here)" in proc.stderr
