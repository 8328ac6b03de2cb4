"""Small predicates the argument checks share."""

from __future__ import annotations

import numbers
import os
import tempfile
from pathlib import Path


def is_integer(value: object) -> bool:
    """An int or NumPy integer, not a bool (True is no count, seed or token id anyone means, and
    4.0 == 4 passed membership tests as an integer)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def probe_writable(directory: str | Path) -> str | None:
    """None when a file can be made in ``directory``, else the OS's reason. A file is made and
    removed, because os.access says yes to root everywhere (/proc too)."""
    try:
        handle, probe = tempfile.mkstemp(dir=directory, prefix=".xlstm-metal-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        return err.strerror or str(err)
    return None
