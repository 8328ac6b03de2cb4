"""Issue 11 item 6: the tracked tree (the packaged model included) stays under 15 MB."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_the_tracked_tree_stays_under_15_mb():
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    sizes = {name.decode(): (REPO / name.decode()).stat().st_size for name in names
             if name and (REPO / name.decode()).is_file()}
    total = sum(sizes.values())
    largest = sorted(sizes.items(), key=lambda item: -item[1])[:5]
    assert total < 15_000_000, f"tracked tree {total:,} B; largest: {largest}"
    assert sizes["xlstm_metal/assets/default_model/model.safetensors"] > 1_000_000  # the packaged model is counted
