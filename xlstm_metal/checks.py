"""Small predicates the argument checks share."""

from __future__ import annotations

import numbers
import os
import tempfile
from pathlib import Path
from typing import Iterable


def is_integer(value: object) -> bool:
    """An int or NumPy integer, not a bool (True is no count, seed or token id anyone means, and
    4.0 == 4 passed membership tests as an integer)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def bad_token_ids(ids: Iterable[object], vocab: int | None = None) -> list:
    """The entries of ``ids`` that are no token id: not an integer (see ``is_integer``), negative,
    or, where ``vocab`` is given, ``>= vocab`` (ids past the vocabulary score garbage or overflow).
    Empty when all are ids; each caller words its own error."""
    return [i for i in ids if not is_integer(i) or i < 0 or (vocab is not None and i >= vocab)]


def check_targets(targets: Iterable[int], width: int) -> None:
    """Refuses target token ids (host integers) that are no column of logits ``width`` wide,
    before ``mx.take_along_axis`` reads them: it does not check its indices (a segmentation fault
    for a model without ``config.vocab_size``, or one whose logits are narrower than it)."""
    top = max(targets, default=-1)
    if top >= width:
        raise ValueError(f"token id {top} is outside the model's logits [0, {width})")


def check_chunk_size(chunk_size: object) -> None:
    """Refuses a prefill ``chunk_size`` that is not a non-negative integer or None (0 and None:
    the model's default); -1 ran no piece and failed on an unset variable."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 0):
        raise ValueError(f"chunk_size must be a positive integer, or None (or 0) for the default, "
                         f"got {chunk_size!r}")


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
