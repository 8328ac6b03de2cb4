"""Short names that tell files apart, for labels and table rows."""

from __future__ import annotations

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
