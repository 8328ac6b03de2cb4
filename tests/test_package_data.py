"""Every file the package reads at run time goes into a wheel: a tracked file under xlstm_metal/
that is not a module of a package must match a [tool.setuptools.package-data] pattern (the lab's
shipped specs, xlstm_metal/lab/specs/*.yaml, were missing: a non-editable install had no
`mad --arch mlstm`, no xlstm_large_block spec)."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "xlstm_metal"


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "xlstm_metal"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / line for line in out.splitlines() if line]


def test_every_data_file_is_package_data():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    covered = {p.resolve() for pattern in patterns["xlstm_metal"] for p in PACKAGE.glob(pattern) if p.is_file()}
    missing = []
    for path in tracked_files():
        if path.suffix == ".py" and (path.parent / "__init__.py").exists():
            continue  # a module of a package
        if path.resolve() not in covered:
            missing.append(str(path.relative_to(REPO)))
    assert not missing, f"not in pyproject's package-data (left out of a wheel): {missing}"
