"""The package layout: one top-level package, and the import layers held by import-linter.

``pip install .`` must put exactly one package, ``tern``, into site-packages (``edge/`` and
``cloud/`` are mapped to ``tern.edge`` and ``tern.cloud``). import-linter reads packages from
the file system, so the contracts in ``pyproject.toml`` are checked on that installed copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install --no-deps --target`` of the repository: what a user's site-packages gets."""
    root = tmp_path_factory.mktemp("install")
    # Build from a copy so the build leaves nothing (build/, *.egg-info) in the work tree.
    source = root / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    target = root / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return target


def run_isolated(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python args`` seeing the installed copy first (not the repository's work tree)."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)


def test_install_has_one_top_level_package(installed: Path) -> None:
    top = sorted(p.name for p in installed.iterdir() if not p.name.endswith(".dist-info"))
    assert top == ["bin", "tern"] or top == ["tern"], top
    dist_info = next(installed.glob("tern-*.dist-info"))
    assert (dist_info / "top_level.txt").read_text().split() == ["tern"]
    record = [line.split(",", 1)[0] for line in (dist_info / "RECORD").read_text().splitlines()]
    packages = {path.split("/", 1)[0] for path in record if path.endswith(".py")}
    assert packages == {"tern"}, packages
    for name in ("edge", "cloud"):
        assert not (installed / name).exists(), f"{name} installed at top level"
        assert (installed / "tern" / name / "__init__.py").is_file()
    assert (installed / "tern" / "core" / "schemas" / "kafka-reading.schema.json").is_file()


def test_installed_copy_imports(installed: Path, tmp_path: Path) -> None:
    proc = run_isolated(installed, "-c", "import tern.edge.cli, tern.cloud.cli, tern.core.codec; "
                        "print(tern.edge.__file__); print(tern.cloud.__file__)", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all(line.startswith(str(installed)) for line in proc.stdout.split()), proc.stdout
    for legacy in ("edge", "cloud"):
        gone = run_isolated(installed, "-c", f"import {legacy}", cwd=tmp_path)
        assert gone.returncode != 0 and "ModuleNotFoundError" in gone.stderr


def lint_imports(site: Path, cwd: Path) -> subprocess.CompletedProcess:
    return run_isolated(site, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                        "sys.exit(lint_imports_command())",
                        "--config", str(REPO / "pyproject.toml"), "--no-cache", cwd=cwd)


def test_import_contracts_hold(installed: Path, tmp_path: Path) -> None:
    proc = lint_imports(installed, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize(("module", "forbidden"), [
    ("tern/core/codec.py", "import tern.edge.outbox"),     # the core reaching up
    ("edge/outbox/__init__.py", "import tern.cloud.bridge"),  # the gateway reaching into the bridge
    ("cloud/config.py", "import tern.harness.stack"),      # the product leaning on the lab
])
def test_a_forbidden_import_breaks_a_contract(installed: Path, tmp_path: Path, module: str, forbidden: str) -> None:
    site = tmp_path / "site"
    shutil.copytree(installed, site)
    # In the installed copy edge/ and cloud/ sit inside tern/.
    target = site / module if module.startswith("tern/") else site / "tern" / module
    target.write_text(target.read_text() + f"\n{forbidden}  # added by the test\n")
    proc = lint_imports(site, tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "BROKEN" in proc.stdout
