"""Paths: short names that tell files apart (labels, table rows), and a checkpoint file's presence."""

from __future__ import annotations

import os
from pathlib import Path


def distinct_names(paths: list[tuple[str, ...]]) -> list[str]:
    """The shortest trailing part of each path (given as parts) that no other, different path
    shares: runs/lr1/m and runs/lr2/m are "lr1/m" and "lr2/m", a unique name stays alone."""
    labels = []
    for parts in paths:
        others = [o for o in paths if o != parts]
        n = 1
        while n < len(parts) and any(o[-n:] == parts[-n:] for o in others):
            n += 1
        labels.append(str(Path(*parts[-n:])))
    return labels


def file_present(path: Path, error: type[Exception]) -> bool:
    """Whether ``path`` is a file (False: nothing by that name); ``error`` for a directory or a
    broken symlink there, which loaders passed over as absent ("no tokenizer.json" for a folder
    of that name; a folder named the shard index skipped for the single weight file)."""
    if path.is_file():
        return True
    if path.is_symlink() and not path.exists():
        raise error(f"{path} is a broken symlink (to {os.readlink(path)})")
    if path.exists():
        raise error(f"{path} is a directory, not a file")
    return False
