"""What users install is the filesystem and the plugins, never the development tools.

The wheel's packages come from pyproject's ``[tool.setuptools.packages.find]``; the image
copies only what ``.dockerignore`` lets through. Development infrastructure (devstack/:
local backends, the walkthrough), the benchmark and the tests must stay out of both, and
no installed module may import them: it would fail with ModuleNotFoundError once installed.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[2]
INSTALLED = ("chunkfs", "csi")
DEVELOPMENT = ("devstack", "bench", "tests")
DEV_MODULE = re.compile(rf"^({'|'.join(DEVELOPMENT)})(\.|$)")


def _wheel_packages() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    return setuptools.find_packages(
        where=str(ROOT / config.get("where", ["."])[0]),
        include=config.get("include", ["*"]), exclude=config.get("exclude", []),
    )  # fmt: skip


def test_the_wheel_holds_chunkfs_and_csi_only():
    # the development packages are real packages (so the filter is what keeps them out)
    everything = setuptools.find_packages(where=str(ROOT))
    assert {"devstack", "bench", "tests"} <= set(everything)
    packages = _wheel_packages()
    assert {"chunkfs", "chunkfs.meta", "chunkfs.blocks", "csi"} <= set(packages)
    assert [p for p in packages if p.split(".")[0] not in INSTALLED] == []


def test_the_image_copies_chunkfs_and_csi_only():
    allowed = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    assert sorted(allowed) == ["!chunkfs/", "!csi/", "!pyproject.toml"]
    copies = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ") and "--from" not in line]
    assert copies == ["pyproject.toml", "chunkfs", "csi"]


def _dev_references(path: Path) -> list[str]:
    """Imports of development packages, and module names of them in strings
    (``import_module("devstack.x")``, ``[python, "-m", "devstack.x"]``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value]
        found += [f"{path}:{node.lineno}: {n}" for n in names if DEV_MODULE.match(n)]
    return found


@pytest.mark.parametrize("package", INSTALLED)
def test_no_installed_module_uses_development_infrastructure(package):
    modules = sorted((ROOT / package).rglob("*.py"))
    assert len(modules) > 10
    assert [ref for path in modules for ref in _dev_references(path)] == []


def test_the_check_sees_every_way_of_using_devstack(tmp_path):
    probe = tmp_path / "probe.py"
    cases = ["from devstack.localstack import BUCKET\n", "import devstack\n", "import bench.run\n",
             "import subprocess\nsubprocess.run(['python', '-m', 'devstack.walkthrough'])\n"]
    for source in cases:
        probe.write_text(source)
        assert _dev_references(probe), source
    probe.write_text("import chunkfs.cli\nNAME = 'devstacks'\n")
    assert _dev_references(probe) == []
